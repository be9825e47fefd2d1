"""Bits per byte equals a hand computation; plain text files are scored byte by byte."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pico.model import build_model
from pico.model.config import EOS, PAD, ModelConfig
from pico.pipeline.eval.evaluate import evaluate, text_file_batches

TINY = ModelConfig(d_local=32, n_heads=2, n_kv_heads=1, window=16, n_in=1, n_out=1, d_latent=64, n_latent=1,
                   n_latent_heads=2, n_latent_kv_heads=1, n_predict=3, max_seq_len=32)


def test_bpb_equals_hand_computation(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    text = bytes(range(32, 127)) * 3 + "naïve café\n".encode()  # multi-byte UTF-8 included
    f = tmp_path / "doc.txt"
    f.write_bytes(text)
    got = evaluate(model, text_file_batches([f], 32, 3, 4), torch.device("cpu"), routing="causal")

    # By hand: the stream is the document then EOS; every byte after the first is a next-byte
    # target exactly once; logits come from windows of 32 inputs with stride 32.
    ids = list(text) + [EOS]
    nats, count = 0.0, 0
    for start in range(0, len(ids) - 1, 32):
        window = torch.tensor(ids[start:start + 32])[None]
        with torch.no_grad():
            logits = model(window, routing="causal").logits[0]
        target = torch.tensor(ids[start + 1:start + 33])
        nats += F.cross_entropy(logits[: len(target)], target, reduction="sum").item()
        count += len(target)
    assert got["bytes"] == count == len(text)
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
