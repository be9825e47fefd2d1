"""`pico prep verify DST`: read every shard back and check it against the manifest.

Every problem is collected (not only the first): missing, extra, truncated or altered shards,
checksum and count mismatches, samples that lack a member, carry bad metadata or do not
decompress to the recorded length.
"""

from __future__ import annotations

import json
import tarfile
from typing import Callable

import zstandard

from pico.data_prep.shards import KEY, SHARD_NAME, HashingReader, SampleError, decode_sample, iter_tar_samples
from pico.data_prep.store import Store

META_FIELDS = ("source", "id", "chunk", "n_chunks", "bytes")


def verify(output: str, on_shard: Callable[[str], None] | None = None) -> list[str]:
    """Every problem found in the shards at `output` (an empty list means all is well)."""
    store = Store(output)
    store.refresh()  # a cached listing or ETag would hide changes made since
    data = store.read_bytes("manifest.json")
    if data is None:
        return [f"{store.display('manifest.json')}: missing; the job has not finished (rerun pico prep) "
                "or this is not a pico prep output"]
    try:
        manifest = json.loads(data)
        listed = {s["name"]: s for s in manifest["shards"]}
        problems = _check_manifest(manifest)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        return [f"{store.display('manifest.json')}: not a valid manifest: {type(e).__name__}: {str(e)[:200]}"]
    present = {n for n in store.list() if SHARD_NAME.match(n)}
    problems += [f"{store.display(n)}: shard not listed in manifest.json" for n in sorted(present - set(listed))]
    for name, entry in listed.items():
        if name not in present:
            problems.append(f"{store.display(name)}: listed in manifest.json but missing")
            continue
        try:
            problems += [f"{store.display(name)}: {p}" for p in check_shard(store, name, entry)]
        except OSError as e:  # unreadable (permissions, a store that went away): that shard's problem
            problems.append(f"{store.display(name)}: cannot be read ({type(e).__name__}: {str(e)[:200]})")
        if on_shard:
            on_shard(name)
    return problems


def _check_manifest(m: dict) -> list[str]:
    problems = []
    d = m.get("documents", {})
    if d.get("read") != sum(d.get(k, 0) for k in ("written", "deduplicated", "empty", "failed")):
        problems.append(f"manifest.json: documents do not add up: {d}")
    for split, t in m.get("totals", {}).items():
        mine = [s for s in m["shards"] if s["split"] == split]
        for k in ("samples", "raw_bytes", "compressed_bytes"):
            if t.get(k) != sum(s[k] for s in mine):
                problems.append(f"manifest.json: totals.{split}.{k}={t.get(k)} but its shards sum to "
                                f"{sum(s[k] for s in mine)}")
    return problems


def check_shard(store: Store, name: str, entry: dict) -> list[str]:
    """Problems of one shard: its sha256, counts and every sample in it."""
    problems: list[str] = []
    samples = raw_bytes = compressed = 0
    with store.open_read(name) as f:
        reader = HashingReader(f)
        try:
            for sample in iter_tar_samples(reader):
                samples += 1
                compressed += len(sample.payload or b"")
                found, n = _check_sample(sample)
                problems += found
                raw_bytes += n
        except (tarfile.TarError, EOFError, OSError) as e:
            problems.append(f"truncated or corrupt tar after {samples} samples: {type(e).__name__}: {e}")
        reader.drain()
    sha = reader.sha.hexdigest()
    if sha != entry.get("sha256"):
        problems.append(f"sha256 {sha} differs from the manifest's {entry.get('sha256')} (the file was altered)")
    for what, got in (("samples", samples), ("raw_bytes", raw_bytes), ("compressed_bytes", compressed)):
        if got != entry.get(what):
            problems.append(f"{what}: read {got}, manifest says {entry.get(what)}")
    return problems


def _check_sample(sample) -> tuple[list[str], int]:
    """Problems of one sample, and its decompressed length (0 when it does not decompress)."""
    problems = []
    if not KEY.match(sample.key):
        problems.append(f"sample {sample.key!r}: key is not 16+ hex digits with an optional _cNNNNN chunk suffix")
    try:
        raw, meta = decode_sample(sample)
    except SampleError as e:
        return problems + [f"sample {sample.key}: {e}"], 0
    if zstandard.frame_content_size(sample.payload) < 0:  # readers accept it; prep always records it
        problems.append(f"sample {sample.key}: the zstd frame does not record its content size")
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        problems.append(f"sample {sample.key}: metadata lacks {', '.join(missing)}")
    elif not 0 <= meta["chunk"] < meta["n_chunks"]:
        problems.append(f"sample {sample.key}: chunk {meta['chunk']} outside 0..{meta['n_chunks'] - 1}")
    return problems, len(raw)
