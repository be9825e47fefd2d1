"""Loader throughput: packed training bytes per second from real shards, num_workers 0 vs 2.

    nice python benchmarks/bench_loader.py [--corpus /work/shared/corpus] [--shapes 512x8,2048x16]

Shards are written into a temporary directory from the shared corpus (one sample per document,
in `pico prep`'s format). Three measurements, one JSON line each, side by side:

- `read_decode`: the floor under any loader, streaming every shard and decompressing every
  sample in one process, no shuffling or packing;
- `loader` with num_workers=0 and num_workers=2, for each batch shape (seq_len x batch_size):
  ByteBatches over one epoch's worth of bytes;
- `resume`: seconds to the first batch of a fresh loader and of one resumed mid-epoch.

Timing starts at the first batch (worker start-up is reported separately as `startup_s`). Each
measurement runs `--repeat` times and reports the fastest (`runs_bytes_per_s` lists all): the
cores are shared, and the fastest run is the one least disturbed by other work. All lines are
also written to benchmarks/results/loader_throughput.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import webdataset as wds
import zstandard

from pico.data_prep.shards import decode_sample, read_shard
from pico.pipeline.data.loader import ByteBatches, resolve_shards

RESULTS = Path(__file__).resolve().parent / "results" / "loader_throughput.json"


def corpus_documents(corpus: Path):
    """(id, bytes) of every document in the shared corpus: novels, then the two JSON Lines files."""
    dctx = zstandard.ZstdDecompressor()
    for path in sorted((corpus / "novels").glob("*.txt.zst")):
        with open(path, "rb") as f:
            yield path.name, dctx.stream_reader(f).read()
    for name, opener in (("python-docs.jsonl.gz", lambda p: gzip.open(p, "rb")),
                         ("sympy-code.jsonl.zst", lambda p: dctx.stream_reader(open(p, "rb")))):
        with opener(corpus / name) as f:
            for line in f.read().splitlines():
                record = json.loads(line)
                yield f"{name}:{record['id']}", record["text"].encode()


def write_shards(corpus: Path, out: Path, shard_bytes: int) -> dict:
    """Train shards of about `shard_bytes` raw bytes each, plus manifest.json; returns totals."""
    zc = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True)
    entries, writer, index, docs, total = [], None, 0, 0, 0
    for doc_id, doc in corpus_documents(corpus):
        if writer is None:
            name = f"train-{index:06d}.tar"
            writer, entry = wds.TarWriter(str(out / name)), {"name": name, "split": "train", "samples": 0,
                                                               "raw_bytes": 0, "sha256": ""}
        key = hashlib.sha256(doc_id.encode()).hexdigest()[:24]
        meta = {"source": "corpus", "id": doc_id, "chunk": 0, "n_chunks": 1, "bytes": len(doc)}
        writer.write({"__key__": key, "bin.zst": zc.compress(doc), "json": json.dumps(meta).encode()})
        entry["samples"] += 1
        entry["raw_bytes"] += len(doc)
        docs, total = docs + 1, total + len(doc)
        if entry["raw_bytes"] >= shard_bytes:
            writer.close()
            entries.append(entry)
            writer, index = None, index + 1
    if writer is not None:
        writer.close()
        entries.append(entry)
    (out / "manifest.json").write_text(json.dumps({"shards": entries}))
    return {"shards": len(entries), "documents": docs, "raw_bytes": total}


def bench_read_decode(shards: list[str]) -> dict:
    dctx = zstandard.ZstdDecompressor()
    start, n = time.perf_counter(), 0
    for url in shards:
        for _, sample in read_shard(url):
            n += len(decode_sample(sample, dctx)[0])
    seconds = time.perf_counter() - start
    return {"what": "read_decode", "bytes": n, "seconds": round(seconds, 3), "bytes_per_s": round(n / seconds)}


def bench_loader(shards: list[str], target_bytes: int, num_workers: int, seq_len: int, batch_size: int,
                 args: argparse.Namespace) -> dict:
    loader = ByteBatches(shards, seq_len=seq_len, batch_size=batch_size, extra=args.extra,
                         num_workers=num_workers, seed=0, shuffle_buffer=args.shuffle_buffer)
    per_batch = batch_size * seq_len  # new input bytes per batch (the extra bytes repeat)
    n_batches = max(1, target_bytes // per_batch)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    t2 = time.perf_counter()
    del it
    n = n_batches * per_batch
    return {"what": "loader", "num_workers": num_workers, "seq_len": seq_len, "batch_size": batch_size,
            "worker_chunk": loader.worker_chunk, "extra": args.extra, "shuffle_buffer": args.shuffle_buffer,
            "batches": n_batches, "bytes": n,
            "startup_s": round(t1 - t0, 3), "seconds": round(t2 - t1, 3), "bytes_per_s": round(n / (t2 - t1))}


def bench_resume(shards: list[str], num_workers: int, args: argparse.Namespace) -> dict:
    """Seconds to the first batch: a fresh loader, and one resumed mid-epoch (it re-reads its buffer's shards)."""
    kw = dict(seq_len=512, batch_size=8, extra=args.extra, num_workers=num_workers, shuffle_buffer=args.shuffle_buffer)
    first = ByteBatches(shards, **kw)
    it = iter(first)
    t0 = time.perf_counter()
    next(it)
    fresh = time.perf_counter() - t0
    for _ in range(5000):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = ByteBatches(shards, **kw)
    t0 = time.perf_counter()
    resumed.load_state_dict(state)
    next(iter(resumed))
    return {"what": "resume", "num_workers": num_workers, "fresh_first_batch_s": round(fresh, 3),
            "resumed_first_batch_s": round(time.perf_counter() - t0, 3), "state_json_bytes": len(json.dumps(state))}


def best_of(n: int, measure) -> dict:
    runs = [measure() for _ in range(n)]
    best = max(runs, key=lambda r: r["bytes_per_s"])
    return {**best, "runs_bytes_per_s": [r["bytes_per_s"] for r in runs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "corpus")
    p.add_argument("--shapes", default="512x8,2048x16", help="comma-separated seq_len x batch_size")
    p.add_argument("--extra", type=int, default=4)
    p.add_argument("--shuffle-buffer", type=int, default=256)
    p.add_argument("--shard-mb", type=float, default=8.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    env = {"host_cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
           "python": platform.python_version(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    lines = []
    with tempfile.TemporaryDirectory(prefix="pico-bench-loader-") as tmp:
        data = write_shards(args.corpus, Path(tmp), int(args.shard_mb * 2**20))
        shards = resolve_shards([tmp], "train")
        results = [best_of(args.repeat, lambda: bench_read_decode(shards))]
        for shape in args.shapes.split(","):
            seq_len, batch_size = map(int, shape.split("x"))
            for workers in (0, 2):
                results.append(best_of(args.repeat, lambda: bench_loader(shards, data["raw_bytes"], workers,
                                                                         seq_len, batch_size, args)))
        results += [bench_resume(shards, workers, args) for workers in (0, 2)]
        for r in results:
            line = {**r, **data, **env}
            lines.append(line)
            print(json.dumps(line), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    os.replace(tmp_out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
