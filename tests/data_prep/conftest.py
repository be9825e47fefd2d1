"""Inputs in every format pico prep reads, and a reader that turns shards back into documents."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
from pathlib import Path

import pytest
import zstandard


def words(seed: int, n: int) -> bytes:
    """n words of deterministic, compressible English-like text."""
    rng = random.Random(seed)
    vocab = ["the", "byte", "model", "shard", "router", "depth", "of", "and", "a", "zstd", "ray", "täst", "ß"]
    return " ".join(rng.choice(vocab) for _ in range(n)).encode()


COMPRESS = {"": lambda b: b, ".gz": lambda b: gzip.compress(b, mtime=0), ".xz": lzma.compress,
            ".bz2": bz2.compress, ".zst": lambda b: zstandard.ZstdCompressor(level=3).compress(b)}


def write_corpus(root: Path) -> dict[str, bytes]:
    """Files of every format under root; returns the expected documents by id (a file's id: its path from
    root's parent, as `pico prep --input ROOT` names it)."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, bytes] = {}

    def name(p: Path) -> str:
        return f"{root.name}/{p.relative_to(root)}"
    for i, (suffix, compress) in enumerate(COMPRESS.items()):
        # one document per file (text and binary), and JSON Lines with and without an id field
        text = words(i, 300 + 50 * i)
        p = root / f"doc{i}.txt{suffix}"
        p.write_bytes(compress(text))
        expected[name(p)] = text
        blob = bytes(random.Random(100 + i).randrange(256) for _ in range(2000)) + b"\0\xff\xfe"
        p = root / "bin" / f"blob{i}.bin{suffix}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(compress(blob))
        expected[name(p)] = blob
        lines, p = [], root / "jsonl" / f"part{i}.jsonl{suffix}"
        p.parent.mkdir(exist_ok=True)
        for j in range(5):
            text = words(1000 * i + j, 20 + j).decode() + " \u00e9\u4e2d\U0001f600"
            if j % 2:
                lines.append(json.dumps({"id": f"p{i}-{j}", "text": text}))
                expected[f"p{i}-{j}"] = text.encode()
            else:
                lines.append(json.dumps({"text": text, "meta": {"n": j}}))
                expected[f"{name(p)}#{j + 1}"] = text.encode()
        p.write_bytes(compress(("\n".join(lines) + "\n").encode()))
    return expected


@pytest.fixture
def corpus_dir(tmp_path) -> tuple[Path, dict[str, bytes]]:
    return tmp_path / "in", write_corpus(tmp_path / "in")


def read_documents(out: str) -> dict[str, bytes]:
    """Every document in the shards at `out` (local path or URL), chunks joined, by id."""
    import fsspec

    from pico.data_prep.shards import decode_sample, iter_tar_samples

    fs, root = fsspec.core.url_to_fs(out)
    chunks: dict[str, dict[int, bytes]] = {}
    sizes: dict[str, int] = {}
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    for shard in manifest["shards"]:
        with fs.open(f"{root}/{shard['name']}", "rb") as f:
            for sample in iter_tar_samples(f):
                raw, meta = decode_sample(sample)
                assert meta["bytes"] == len(raw)
                chunks.setdefault(meta["id"], {})[meta["chunk"]] = raw
                sizes[meta["id"]] = meta["n_chunks"]
    for doc_id, parts in chunks.items():
        assert sorted(parts) == list(range(sizes[doc_id])), doc_id
    return {k: b"".join(v[i] for i in sorted(v)) for k, v in chunks.items()}
