"""The training loader and validation sequences, on real shards (webdataset tar + zstd), local and on S3."""

from __future__ import annotations

import hashlib
import io
import json
import random
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
import zstandard

from pico.model.config import EOS, PAD
from pico.pipeline.data.loader import ByteBatches, eval_sequences, resolve_shards
from pico.configs.errors import UserError

T, EXTRA, B = 32, 3, 4


def make_docs(n: int, seed: int) -> list[bytes]:
    """Distinct documents of mixed lengths: most shorter than a window, some spanning several."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        length = rng.choice([1, 5, 20, 40, 90, 150])
        body = bytes(rng.randrange(256) for _ in range(length))
        docs.append(f"{seed}:{i}|".encode() + body)
    return docs


def write_dataset(root: Path, shards: dict[str, list[list[bytes]]]) -> Path:
    """Shards in `pico prep`'s format: {split}-NNNNNN.tar of {key}.bin.zst + {key}.json, and manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    zc = zstandard.ZstdCompressor()
    for split, groups in shards.items():
        for index, docs in enumerate(groups):
            name = f"{split}-{index:06d}.tar"
            with wds.TarWriter(str(root / name)) as w:
                for doc in docs:
                    key = hashlib.sha1(doc).hexdigest()[:16]
                    meta = {"source": "test", "id": key, "chunk": 0, "n_chunks": 1, "bytes": len(doc)}
                    w.write({"__key__": key, "bin.zst": zc.compress(doc), "json": json.dumps(meta).encode()})
            entries.append({"name": name, "split": split, "samples": len(docs),
                            "raw_bytes": sum(map(len, docs)), "sha256": ""})
    (root / "manifest.json").write_text(json.dumps({"shards": entries}))
    return root


def split_docs(docs: list[bytes], n_shards: int) -> list[list[bytes]]:
    per = len(docs) // n_shards
    return [docs[i * per:(i + 1) * per] for i in range(n_shards)]


def take(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def stream_of(batches: list[torch.Tensor]) -> list[int]:
    """One worker's token stream, rebuilt from its rows (checking that rows overlap by EXTRA)."""
    rows = [r for b in batches for r in b.tolist()]
    for a, b in zip(rows, rows[1:]):
        assert a[T:] == b[:EXTRA], "consecutive windows must overlap by `extra` tokens"
    return [t for r in rows for t in r[:T]]


def documents_in(stream: list[int], n: int) -> list[bytes]:
    """The first n EOS-terminated documents of a stream."""
    out, cur = [], []
    for t in stream:
        if t == EOS:
            out.append(bytes(cur))
            cur = []
            if len(out) == n:
                return out
        else:
            assert 0 <= t < 256, f"unexpected token {t} in a training row"
            cur.append(t)
    raise AssertionError(f"stream holds only {len(out)} complete documents, wanted {n}")


@pytest.fixture
def dataset(tmp_path):
    docs = make_docs(48, seed=1)
    val = make_docs(20, seed=2)
    root = write_dataset(tmp_path / "ds", {"train": split_docs(docs, 8), "val": split_docs(val, 2)})
    return root, docs, val


# ---------------------------------------------------------------------------------------------
# resolve_shards


def test_resolve_shards_forms(dataset, tmp_path):
    root, _, _ = dataset
    via_manifest = resolve_shards([str(root)], "train")
    assert [Path(s).name for s in via_manifest] == [f"train-{i:06d}.tar" for i in range(8)]
    assert resolve_shards([str(root / "val-*.tar")], "val") == resolve_shards([str(root)], "val")
    assert resolve_shards([str(root / "*.tar")], "train") == via_manifest  # a glob never mixes in val shards
    explicit = str(root / "train-000003.tar")
    assert resolve_shards([explicit, explicit], "train") == [explicit]
    (root / "manifest.json").unlink()  # without a manifest: {split}-*.tar in name order
    assert resolve_shards([str(root)], "train") == via_manifest

    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match=missing):
        resolve_shards([missing], "train")
    with pytest.raises(UserError, match="no val shards"):
        resolve_shards([str(tmp_path / "ds" / "*.nothing")], "val")
    with pytest.raises(UserError, match="does not exist"):
        resolve_shards([str(root / "train-000099.tar")], "train")
    with pytest.raises(UserError, match="another split"):
        resolve_shards([explicit], "val")


# ---------------------------------------------------------------------------------------------
# Training batches


@pytest.mark.parametrize("n_shards, docs_per_shard", [(8, 6), (3, 8)], ids=["shard-split", "sample-split"])
def test_two_ranks_two_workers_cover_an_epoch_exactly_once(tmp_path, n_shards, docs_per_shard):
    """Reassemble every worker's stream from its rows: the first epoch holds each document once, on one rank."""
    docs = make_docs(n_shards * docs_per_shard, seed=3)
    shards = resolve_shards([str(write_dataset(tmp_path, {"train": split_docs(docs, n_shards)}))], "train")
    world, workers = 2, 2
    # Both cases give every worker the same number of documents per epoch: 8 shards -> 2 whole
    # shards each; 3 shards of 8 -> 2 samples of each shard each.
    per_slot = len(docs) // (world * workers)
    longest = max(map(len, docs)) + 1
    n_batches = workers * (per_slot * longest // (B * T) + 2)
    seen = []
    for rank in range(world):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader = ByteBatches(shards, seq_len=T, batch_size=B, extra=EXTRA, rank=rank, world_size=world,
                                 num_workers=workers, seed=7, shuffle_buffer=4, worker_chunk=2)
        assert any("every worker reads every shard" in str(w.message) for w in caught) == (n_shards < 4)
        batches = take(loader, n_batches)
        assert all(b.shape == (B, T + EXTRA) and b.dtype == torch.long for b in batches)
        for w in range(workers):  # workers take turns of worker_chunk batches: 0, 0, 1, 1, 0, 0, ...
            mine = [b for i, b in enumerate(batches) if i // 2 % workers == w]
            seen += documents_in(stream_of(mine), per_slot)
        assert loader.stats["documents"] >= per_slot * workers
    assert Counter(seen) == Counter(docs)


def test_exact_resume_with_workers(dataset):
    """Run, save, continue; a new loader (2 workers) loaded with the state yields the same batches bit for bit."""
    root, docs, _ = dataset
    shards = resolve_shards([str(root)], "train")
    kw = dict(seq_len=T, batch_size=B, extra=EXTRA, rank=1, world_size=2, seed=5, shuffle_buffer=3, worker_chunk=3)
    first = ByteBatches(shards, num_workers=2, **kw)
    it = iter(first)
    batches, states = [], []
    for _ in range(40):  # runs past the end of the first epoch
        batches.append(next(it))
        states.append(json.loads(json.dumps(first.state_dict())))  # what a checkpoint stores
    assert first.stats["epoch"] >= 1
    assert max(len(json.dumps(s)) for s in states) < 4000
    # Workers take turns of 3 batches and prefetch ahead: resume inside worker 1's turn, at the
    # end of worker 1's turn, and inside worker 0's turn.
    for n in (4, 6, 7):
        resumed = ByteBatches(shards, num_workers=2, **kw)
        resumed.load_state_dict(states[n - 1])
        got = take(resumed, 40 - n)
        assert all(torch.equal(a, b) for a, b in zip(got, batches[n:])), f"resume after {n} batches"
        assert resumed.state_dict() == states[-1]

    other = ByteBatches(shards, num_workers=1, **kw)
    with pytest.raises(UserError, match="num_workers"):
        other.load_state_dict(states[0])


def test_exact_resume_in_process(dataset):
    root, _, _ = dataset
    shards = resolve_shards([str(root)], "train")
    kw = dict(seq_len=T, batch_size=B, extra=EXTRA, seed=2, shuffle_buffer=5)
    first = ByteBatches(shards, **kw)
    it = iter(first)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [next(it) for _ in range(25)]
    resumed = ByteBatches(shards, **kw)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, take(resumed, 25)))


@pytest.mark.parametrize("buffer_bytes", [1 << 20, 150], ids=["count-bound", "byte-bound"])
def test_resume_from_every_position(tmp_path, buffer_bytes):
    """Save after each of many batches (mid-document, mid-shard, across the epoch end); every resume is exact."""
    docs = make_docs(24, seed=6)
    shards = resolve_shards([str(write_dataset(tmp_path, {"train": split_docs(docs, 3)}))], "train")
    # Short windows with a long overlap (extra > seq_len), one per batch: many states hold the
    # tail of one epoch's last document together with the next epoch's first.
    kw = dict(seq_len=8, batch_size=1, extra=20, seed=9, shuffle_buffer=4, shuffle_buffer_bytes=buffer_bytes)
    loader = ByteBatches(shards, **kw)
    it = iter(loader)
    n = sum(len(d) + 1 for d in docs) // 8 + 4  # a little past the first epoch
    batches, states = [], []
    for _ in range(n + 2):
        batches.append(next(it))
        states.append(json.loads(json.dumps(loader.state_dict())))
    epochs_pending = [{e for e, _, _ in s["workers"][0]["pending"]} for s in states]
    assert any(len(e) == 2 for e in epochs_pending), "some state should straddle the epoch boundary"
    assert sorted(documents_in(stream_of_plain(batches, 8), len(docs))) == sorted(docs)
    for i in range(n):
        resumed = ByteBatches(shards, **kw)
        resumed.load_state_dict(states[i])
        again = take(resumed, 2)
        assert torch.equal(again[0], batches[i + 1]), f"resume after batch {i}"
        assert torch.equal(again[1], batches[i + 2]), f"resume after batch {i}"


def test_missing_shard_error_names_it(dataset):
    root, _, _ = dataset
    shards = resolve_shards([str(root)], "train")
    (root / "train-000004.tar").unlink()
    with pytest.raises(UserError, match=r"train-000004\.tar.*cannot open"):
        take(ByteBatches(shards, seq_len=T, batch_size=B), 200)
    loader = ByteBatches(shards, seq_len=T, batch_size=B, skip_corrupt=True)
    take(loader, 60)
    assert loader.stats["corrupt_skipped"] >= 1


def test_too_few_samples_for_the_slots_is_an_error(tmp_path):
    shards = resolve_shards([str(write_dataset(tmp_path, {"train": [make_docs(3, seed=8)]}))], "train")
    with pytest.warns(UserWarning, match="every worker reads every shard"):
        loader = ByteBatches(shards, seq_len=T, batch_size=B, rank=3, world_size=4)
    with pytest.raises(UserError, match="no readable documents"):
        take(loader, 1)


def test_deterministic_by_seed(dataset):
    root, _, _ = dataset
    shards = resolve_shards([str(root)], "train")
    run = lambda seed: torch.stack(take(ByteBatches(shards, seq_len=T, batch_size=B, seed=seed), 12))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_epochs_reshuffle_and_never_pad(dataset):
    root, docs, _ = dataset
    shards = resolve_shards([str(root)], "train")
    total = sum(len(d) + 1 for d in docs)
    loader = ByteBatches(shards, seq_len=T, batch_size=B, seed=0, shuffle_buffer=8)
    stream = stream_of_plain(take(loader, 2 * total // (B * T) + 2))
    epoch0, epoch1 = documents_in(stream, len(docs)), documents_in(stream, 2 * len(docs))[len(docs):]
    assert sorted(epoch0) == sorted(docs) == sorted(epoch1)
    assert epoch0 != epoch1  # reshuffled per epoch
    assert PAD not in stream
    assert loader.stats["epoch"] == 2 or loader.stats["epoch"] == 1


def stream_of_plain(batches: list[torch.Tensor], seq_len: int = T) -> list[int]:
    return [t for b in batches for r in b.tolist() for t in r[:seq_len]]


# ---------------------------------------------------------------------------------------------
# Corrupt input


def test_corrupt_sample_error_and_counted_skip(tmp_path):
    docs = make_docs(12, seed=4)
    root = write_dataset(tmp_path, {"train": split_docs(docs, 2)})
    bad_key = hashlib.sha1(docs[2]).hexdigest()[:16]
    rewrite_member(root / "train-000000.tar", f"{bad_key}.bin.zst", b"this is not zstd")
    shards = resolve_shards([str(root)], "train")

    with pytest.raises(UserError, match=rf"train-000000\.tar, member {bad_key}\.bin\.zst"):
        take(ByteBatches(shards, seq_len=T, batch_size=B), 30)
    loader = ByteBatches(shards, seq_len=T, batch_size=B, skip_corrupt=True, num_workers=1)
    good = [d for i, d in enumerate(docs) if i != 2]
    n = sum(len(d) + 1 for d in good) // (B * T)
    stream = stream_of_plain(take(loader, n))
    assert loader.stats["corrupt_skipped"] == 1
    assert set(documents_in(stream, len(good) - 3)) <= set(good)


@pytest.mark.parametrize("cut", ["inside-member", "between-members"])
def test_truncated_shard_error_names_shard(tmp_path, cut):
    import tarfile

    docs = make_docs(12, seed=5)
    root = write_dataset(tmp_path, {"train": split_docs(docs, 2)})
    path = root / "train-000001.tar"
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    # a copy cut off within the 4th member, or exactly where the 5th begins (a valid-looking tar)
    size = members[3].offset_data + 10 if cut == "inside-member" else members[4].offset
    path.write_bytes(path.read_bytes()[:size])
    shards = resolve_shards([str(root)], "train")
    with pytest.raises(UserError, match=r"train-000001\.tar"):
        take(ByteBatches(shards, seq_len=T, batch_size=B, num_workers=1), 40)
    loader = ByteBatches(shards, seq_len=T, batch_size=B, skip_corrupt=True)
    take(loader, 20)
    assert loader.stats["corrupt_skipped"] >= 1  # once per epoch that reached the shard


def rewrite_member(tar_path: Path, member: str, data: bytes) -> None:
    import tarfile

    members = []
    with tarfile.open(tar_path) as tf:
        for info in tf:
            members.append((info, data if info.name == member else tf.extractfile(info).read()))
    with tarfile.open(tar_path, "w") as tf:
        for info, payload in members:
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


# ---------------------------------------------------------------------------------------------
# Validation sequences


@pytest.mark.parametrize("world", [1, 2])
def test_eval_covers_every_byte_once(dataset, world):
    root, _, val = dataset
    shards = resolve_shards([str(root)], "val")
    expected = [EOS] + [t for d in val for t in (*d, EOS)]
    per_rank = [list(eval_sequences(shards, T, EXTRA, B, rank=r, world_size=world)) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1, "every rank must yield the same number of batches"
    windows = {}
    for r, batches in enumerate(per_rank):
        for b, (x, n_valid) in enumerate(batches):
            assert x.shape == (B, T + EXTRA)
            for i in range(B):
                k = (b * B + i) * world + r
                windows[k] = (x[i].tolist(), int(n_valid[i]))
    targets, stream = [], []
    for k in sorted(windows):
        row, n = windows[k]
        if n == 0:
            assert all(t == PAD for t in row)
            continue
        stream += row[:T]
        targets += row[1:1 + n]
        assert all(t == PAD for t in row[1 + n:T + 1])
    assert targets == expected[1:]  # every validation byte (and separator) is a target exactly once
    assert stream[:len(expected)] == expected

    capped = [list(eval_sequences(shards, T, EXTRA, B, rank=r, world_size=world, max_batches=2)) for r in range(world)]
    assert [len(c) for c in capped] == [2] * world
    assert all(torch.equal(a[0], b[0]) for a, b in zip(capped[0], per_rank[0]))


# ---------------------------------------------------------------------------------------------
# S3


@pytest.mark.s3
def test_s3_shards_match_local(dataset, s3_server):
    import fsspec

    root, _, val = dataset
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server})
    fs.mkdir("pico-test")
    fs.put(str(root) + "/", "pico-test/ds/", recursive=True)
    fsspec.filesystem("s3").invalidate_cache()

    remote = resolve_shards(["s3://pico-test/ds"], "train")
    assert remote[0] == "s3://pico-test/ds/train-000000.tar" and len(remote) == 8
    assert resolve_shards(["s3://pico-test/ds/val-*.tar"], "val") == ["s3://pico-test/ds/val-000000.tar",
                                                                      "s3://pico-test/ds/val-000001.tar"]
    local = resolve_shards([str(root)], "train")
    kw = dict(seq_len=T, batch_size=B, extra=EXTRA, seed=1, num_workers=2)
    pairs = zip(take(ByteBatches(remote, **kw), 10), take(ByteBatches(local, **kw), 10))
    assert all(torch.equal(a, b) for a, b in pairs)
    got = [x for x, _ in eval_sequences(resolve_shards(["s3://pico-test/ds"], "val"), T, EXTRA, B)]
    want = [x for x, _ in eval_sequences(resolve_shards([str(root)], "val"), T, EXTRA, B)]
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
    with pytest.raises(UserError, match="s3://pico-test/missing"):
        resolve_shards(["s3://pico-test/missing"], "train")


# ---------------------------------------------------------------------------------------------
# What `pico prep` writes


@pytest.mark.ray
@pytest.mark.slow  # starting Ray takes most of it
def test_reads_what_pico_prep_writes(ray_local, tmp_path):
    """Documents through the real prep job (chunked, split, sharded); one epoch of training plus the val pass."""
    prepare = pytest.importorskip("pico.data_prep").prepare
    src = tmp_path / "src"
    src.mkdir()
    docs = make_docs(30, seed=11) + [bytes(random.Random(12).randrange(256) for _ in range(2500))]
    for i, doc in enumerate(docs):
        (src / f"doc{i:03d}.bin").write_bytes(doc)
    out = tmp_path / "shards"
    manifest = prepare([str(src)], str(out), val_fraction=0.3, shard_bytes=4096, chunk_bytes=1000, progress=False)
    train, val = resolve_shards([str(out)], "train"), resolve_shards([str(out)], "val")
    n_train = sum(s["samples"] for s in manifest["shards"] if s["split"] == "train")
    assert len(train) > 1 and val

    loader = ByteBatches(train, seq_len=T, batch_size=B, extra=EXTRA, num_workers=1)
    train_bytes = sum(s["raw_bytes"] + s["samples"] for s in manifest["shards"] if s["split"] == "train")
    seen = documents_in(stream_of(take(loader, train_bytes // (B * T) + 2)), n_train)
    val_stream = [t for x, n in eval_sequences(val, T, EXTRA, B) for r, k in zip(x.tolist(), n.tolist())
                  for t in r[1:1 + k]]
    seen += documents_in(val_stream, val_stream.count(EOS))
    pieces = [d[i:i + 1000] for d in docs for i in range(0, len(d), 1000)]  # prep's chunks of chunk_bytes
    assert Counter(seen) == Counter(pieces)
