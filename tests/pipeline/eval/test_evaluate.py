"""Bits per byte equals a hand computation; plain text files are packed and scored as validation shards are."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pico.model import build_model
from pico.model.config import EOS, PAD, ModelConfig
from pico.pipeline.data.eval_packing import text_file_batches
from pico.pipeline.eval.evaluate import evaluate

TINY = ModelConfig(d_local=32, n_heads=2, n_kv_heads=1, window=16, n_in=1, n_out=1, d_latent=64, n_latent=1,
                   n_latent_heads=2, n_latent_kv_heads=1, n_predict=3, max_seq_len=32)


def test_bpb_equals_hand_computation(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    text = bytes(range(32, 127)) * 3 + "naïve café\n".encode()  # multi-byte UTF-8 included
    f = tmp_path / "doc.txt"
    f.write_bytes(text)
    got = evaluate(model, text_file_batches([f], 32, 3, 4), torch.device("cpu"), routing="causal")

    # By hand: the stream is EOS, the document, EOS (as in training); every byte of the document,
    # its first included, and the closing EOS is a next-byte target exactly once; logits come
    # from windows of 32 inputs with stride 32.
    ids = [EOS] + list(text) + [EOS]
    nats, count = 0.0, 0
    for start in range(0, len(ids) - 1, 32):
        window = torch.tensor(ids[start:start + 32])[None]
        with torch.no_grad():
            logits = model(window, routing="causal").logits[0]
        target = torch.tensor(ids[start + 1:start + 33])
        nats += F.cross_entropy(logits[: len(target)], target, reduction="sum").item()
        count += len(target)
    assert got["bytes"] == count == len(text) + 1
    assert math.isclose(got["bpb"], nats / count / math.log(2), rel_tol=1e-5)
    assert got["bpb_head2"] > 0 and got["bpb_head3"] > 0


def test_pad_targets_are_not_scored():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    seq = torch.randint(0, 256, (2, 35))
    full = evaluate(model, [seq], torch.device("cpu"))
    padded = seq.clone()
    padded[1, 20:] = PAD
    part = evaluate(model, [padded], torch.device("cpu"))
    assert part["bytes"] < full["bytes"]
    assert part["bytes"] == 32 + 19


def test_a_batch_of_only_padding_adds_nothing():
    """A rank's last batch can be all PAD (eval_packing evens out batch counts): it must not turn bpb into NaN."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    seq = torch.randint(0, 256, (2, 35))
    alone = evaluate(model, [seq], torch.device("cpu"))
    with_pad = evaluate(model, [seq, torch.full((2, 35), PAD)], torch.device("cpu"))
    assert with_pad == alone and math.isfinite(alone["bpb_head3"])


def test_text_files_and_validation_shards_are_one_measurement(tmp_path):
    """`pico eval` on text files, the quickstart and training's validation pack the same way."""
    from tests.pipeline.data.test_loader import write_dataset

    from pico.pipeline.data.eval_packing import pack_eval
    from pico.pipeline.data.loader import eval_sequences, resolve_shards

    docs = [b"first document", bytes(range(256)) * 2, b"x", "naïve café".encode()]
    files = []
    for i, d in enumerate(docs):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_bytes(d)
    root = write_dataset(tmp_path / "shards", {"train": [docs[:1]], "val": [docs[:2], docs[2:]]})
    from_shards = list(eval_sequences(resolve_shards([str(root)], "val"), 32, 3, 4))
    from_files = list(text_file_batches(files, 32, 3, 4))
    from_docs = list(pack_eval(docs, 32, 3, 4))
    assert len(from_shards) == len(from_files) == len(from_docs) > 1
    for (a, na), (b, nb), (c, nc) in zip(from_shards, from_files, from_docs):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(na, nb) and torch.equal(na, nc)
    assert from_files[0][0][0, :2].tolist() == [EOS, docs[0][0]]  # the first byte is a target, after EOS

    torch.manual_seed(0)
    model = build_model(TINY).eval()
    got = evaluate(model, from_files, torch.device("cpu"))
    assert got["bytes"] == sum(map(len, docs)) + len(docs)  # every byte and one EOS per document
