"""Running a prep job on Ray: plan units, run each as a task, assemble the manifest.

A job is cut into units: consecutive runs of input files (in input order), each up to
--unit-bytes as stored. A unit is one Ray task. It reads its files, writes its own shards
under `_work/u{unit:06d}/` and, last, a completion marker `done.json` with its counts and shard
records. What a unit writes depends only on its files and the options, never on which worker
runs it or when, so a rerun after a kill -9 (of the driver or a worker) redoes only the units
without a marker and ends with the same bytes. When every unit is done, the driver numbers the
shards in unit order, moves them to their final names and writes manifest.json last.

With --dedup a first pass hashes every document (one task per unit, `hashes.bin` as its
marker); the driver then keeps the first occurrence of each content hash in input order and
hands every unit the ordinals it must drop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from typing import Callable, Iterator

from pico.data_prep.config import PrepConfig
from pico.data_prep.shards import TarShardWriter, compressor, sample_key, shard_name, split_of, SHARD_NAME
from pico.data_prep.sources import (Doc, InputFile, Skip, declared_split, expand_inputs, is_url, iter_documents,
                                    portable_text)
from pico.data_prep.store import Store
from pico.configs.errors import UserError
from pico.configs.lock import hold

MANIFEST = "manifest.json"
WORK = "_work"
MAX_LISTED_SKIPS = 1000  # skipped documents a unit lists (with source, line, reason); the counts hold them all
MAX_WARNINGS = 20  # failures printed on stderr; the manifest lists all of them


def unit_dir(unit: int) -> str:
    return f"{WORK}/u{unit:06d}"


def plan_units(files: list[InputFile], unit_bytes: int) -> list[list[InputFile]]:
    """Consecutive runs of files of at most unit_bytes (a larger file is a unit on its own)."""
    units: list[list[InputFile]] = []
    size = 0
    for f in files:
        if not units or (units[-1] and size + f.size > unit_bytes):
            units.append([])
            size = 0
        units[-1].append(f)
        size += f.size
    return units


# ---------------------------------------------------------------------------------------------
# The work of one unit (runs inside a Ray task)


def _read_ahead(items: Iterator, batch_items: int = 256, batch_bytes: int = 4 << 20, depth: int = 4) -> Iterator:
    """`items`, produced by a reader thread a few batches ahead of the consumer.

    Reading and decompressing the inputs (file reads, gzip, xz, zstd; all release the GIL) then
    overlaps with compressing and writing the shards in the caller's thread, so a task with a
    core to spare spends its wall time compressing. Items travel in lists of up to batch_items
    or batch_bytes (a queue operation per document would cost as much as compressing a small
    one); order is kept; an error in the reader is raised in the consumer at the same point.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        batch, size = [], 0
        try:
            for item in items:
                batch.append(item)
                size += getattr(item[1], "held", 0)  # bytes it holds in memory (a whole file read later: 0)
                if len(batch) >= batch_items or size >= batch_bytes:
                    if not put(batch):
                        return
                    batch, size = [], 0
            if batch and not put(batch):
                return
            put(done)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    t = threading.Thread(target=reader, name="pico-prep-reader", daemon=True)
    t.start()
    try:
        while True:
            got = q.get()
            if got is done:
                return
            if isinstance(got, BaseException):
                raise got
            yield from got
    finally:
        stop.set()
        t.join(timeout=5)


def _unit_items(cfg: PrepConfig, files: list[list]) -> Iterator[tuple[int | None, Doc | Skip]]:
    """(ordinal, Doc) for every readable document, (None, Skip) for the rest, in input order."""
    ordinal = 0
    for entry in files:  # [url, size, portable name]
        for item in iter_documents(InputFile(*entry), cfg.format, cfg.text_field, cfg.id_field, cfg.chunk_bytes,
                                   cfg.max_expansion):
            if isinstance(item, Doc):
                yield ordinal, item
                ordinal += 1
            else:
                yield None, item


def split_for(source: str, identity: bytes, val_fraction: float, declared_val: bool) -> str:
    """The split of one document: its file's declared Hugging Face split where that decides, else by hash."""
    declared = declared_split(source)
    if declared == "val" or (declared == "train" and declared_val):
        return declared
    return split_of(identity, val_fraction)


def _clear_partial(store: Store, prefix: str) -> None:
    """Remove temporary files a killed attempt of this unit left behind."""
    if not store.remote:
        for name in os.listdir(store.path(prefix)) if os.path.isdir(store.path(prefix)) else []:
            if name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(store.path(prefix), name))


def hash_unit(options: dict, unit: int, files: list[list]) -> dict:
    """Dedup pass: the 16-byte content hash of every readable document of the unit, in order."""
    cfg, store = PrepConfig(**options), Store(options["output"])
    hashes = bytearray()
    for ordinal, item in _unit_items(cfg, files):
        if ordinal is None:
            if cfg.fail_fast and item.kind == "failed":
                return {"unit": unit, "fatal": item.message()}
            continue
        h = hashlib.blake2b(digest_size=16)
        for chunk in item.chunks():
            h.update(chunk)
        hashes += h.digest()
    store.write_bytes(f"{unit_dir(unit)}/hashes.bin", bytes(hashes))
    return {"unit": unit, "hashes": bytes(hashes)}


def run_unit(options: dict, unit: int, files: list[list], drop: list[int], declared_val: bool = False,
             hashed: int | None = None) -> dict:
    """Write the shards of one unit and its completion marker; return the marker's record.

    `declared_val`: the job's inputs include a Hugging Face validation split, so files named as
    the dataset's train split go to train whole (no val carved out of them by --val-fraction);
    files named as its validation split always go to val. `hashed`: the readable documents the
    dedup pass counted in this unit; `drop` names ordinals of that pass, so a unit that reads
    another count (an input changed, a read failed in one pass) fails rather than drop the wrong ones."""
    cpu0 = time.process_time()  # the worker process runs one task at a time; this counts its reader thread too
    cfg, store = PrepConfig(**options), Store(options["output"])
    prefix = unit_dir(unit)
    _clear_partial(store, prefix)
    cctx, dropped = compressor(cfg.zstd_level), set(drop)
    writers = {split: TarShardWriter(split, cfg.shard_bytes,
                                     lambda s, j: store.open_write(f"{prefix}/{shard_name(s, j)}"))
               for split in ("train", "val")}
    docs = dict.fromkeys(("read", "written", "deduplicated", "empty", "failed"), 0)
    skipped, raw_bytes = [], 0
    for ordinal, item in _read_ahead(_unit_items(cfg, files)):
        docs["read"] += 1
        if ordinal is None:
            docs[item.kind] += 1
            if len(skipped) < MAX_LISTED_SKIPS:  # a file of a billion bad lines: counted, not listed, past this
                skipped.append(item.record())
            if cfg.fail_fast and item.kind == "failed":
                return {"unit": unit, "fatal": item.message()}
            continue
        if ordinal in dropped:
            docs["deduplicated"] += 1
            continue
        identity = item.identity
        writer = writers[split_for(item.source, identity, cfg.val_fraction, declared_val)]
        n = 0
        for n, chunk in enumerate(item.chunks(), 1):
            meta = {"source": item.source, "id": item.id, "chunk": n - 1, "n_chunks": item.n_chunks, "bytes": len(chunk)}
            writer.write(sample_key(identity, n - 1, item.n_chunks), len(chunk), cctx.compress(chunk),
                         json.dumps(meta, separators=(",", ":")).encode())
            raw_bytes += len(chunk)
        if n != item.n_chunks:
            raise RuntimeError(f"{item.source} changed while it was read ({n} chunks instead of {item.n_chunks})")
        docs["written"] += 1
    readable = docs["read"] - docs["empty"] - docs["failed"]
    if hashed is not None and readable != hashed:
        raise RuntimeError(f"this unit read {readable} documents where its dedup pass read {hashed} (an input "
                           "changed, or a read failed in one pass); rerun to read it again")
    for w in writers.values():
        w.close()
    record = {"unit": unit, "shards": [s.record() for w in writers.values() for s in w.done], "documents": docs,
              "skipped": skipped, "input_bytes": sum(entry[1] for entry in files), "raw_bytes": raw_bytes,
              "cpu_seconds": time.process_time() - cpu0}  # the task's own CPU time, for benchmarks
    store.write_bytes(f"{prefix}/done.json", json.dumps(record).encode())
    return record


# ---------------------------------------------------------------------------------------------
# The driver


@contextlib.contextmanager
def ray_session(address: str | None, workers: int | None):
    """This process's Ray if it has one; else connect to `address`, or start a local Ray.

    Only a Ray started (or connected) here is shut down here.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, object_store_memory=200_000_000)
    try:
        yield ray
    finally:
        ray.shutdown()


def _forwarded_env() -> dict[str, str]:
    """The driver's AWS_* settings (endpoint, region, credentials) that tasks run under."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _in_env(env: dict[str, str], fn: Callable, *args):
    """fn(*args) with `env` set in this worker's os.environ, restored afterwards.

    The driver's AWS_* settings travel as a task argument, not as runtime_env: Ray writes a
    runtime_env in plain text to its logs (runtime_env_agent.log, on every node), while task
    arguments go to the worker and are never logged. Workers of a Ray started by this process
    inherit the driver's environment anyway; this reaches workers of an already running Ray too.
    """
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if env and "s3fs" in sys.modules:  # a cached S3 client holds this task's credentials
            sys.modules["s3fs"].S3FileSystem.clear_instance_cache()


class _Task:
    """`fn` as a Ray task of one CPU, retried if its worker dies, run under the driver's AWS_* settings."""

    def __init__(self, ray, fn: Callable):
        self.fn, self.env = fn, _forwarded_env()
        self.remote_fn = ray.remote(num_cpus=1, max_retries=3)(_in_env).options(name=fn.__name__)  # ray::run_unit

    def remote(self, *args):
        return self.remote_fn.remote(self.env, self.fn, *args)


class _Progress:
    """A tqdm bar over input bytes on stderr, with raw output throughput; prints failures above it."""

    def __init__(self, enabled: bool, desc: str, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        file=sys.stderr, disable=not enabled, dynamic_ncols=True)
        self.t0, self.raw, self.warned = time.perf_counter(), 0, 0

    def unit_done(self, record: dict, input_bytes: int) -> None:
        self.raw += record.get("raw_bytes", 0)
        for s in record.get("skipped", []):
            if s["reason"] == "empty document":
                continue
            self.warned += 1
            if self.warned <= MAX_WARNINGS:
                where = s["source"] if s["line"] is None else f"{s['source']} line {s['line']}"
                self.bar.write(f"pico prep: skipped {where}: {s['reason']}", file=sys.stderr)
            elif self.warned == MAX_WARNINGS + 1:
                self.bar.write("pico prep: more documents skipped; manifest.json lists them all", file=sys.stderr)
        rate = self.raw / max(time.perf_counter() - self.t0, 1e-9) / 1e6
        self.bar.set_postfix_str(f"raw {rate:.1f} MB/s", refresh=False)
        self.bar.update(input_bytes)

    def close(self) -> None:
        self.bar.close()


def _run_tasks(ray, remote, args: dict[int, tuple], window: int, sizes: dict[int, int], bar: _Progress) -> dict[int, dict]:
    """Run remote(*args[u]) for every unit u, at most `window` at once, largest first."""
    order = sorted(args, key=lambda u: (-sizes[u], u))
    running: dict = {}
    results: dict[int, dict] = {}
    try:
        while order or running:
            while order and len(running) < window:
                u = order.pop(0)
                running[remote.remote(*args[u])] = u
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                u = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # a RayTaskError's text is the remote traceback: its cause says what
                    raise UserError(f"unit {u} (first input {args[u][2][0][0]}) failed: "
                                    f"{_one_line(getattr(e, 'cause', None) or e)}. Finished units are kept: rerun the "
                                    "same command to resume") from None
                if "fatal" in result:
                    raise UserError(f"{result['fatal']} (stopped by --fail-fast)")
                results[u] = result
                bar.unit_done(result, sizes[u])
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
    return results


def _load_json(store: Store, rel: str) -> dict | None:
    data = store.read_bytes(rel)
    try:
        return None if data is None else json.loads(data)
    except ValueError:
        raise UserError(f"{store.display(rel)} is damaged (not JSON); pass --overwrite to start this output over") from None


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


@contextlib.contextmanager
def _output_access(store: Store, doing: str):
    """Turn a failure to reach, read or write the output into one UserError that names it."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if store.remote:
            hint = "check the bucket, the endpoint (AWS_ENDPOINT_URL) and the credentials"
        else:
            hint = "choose a directory this user can write"
        raise UserError(f"cannot {doing} the output {store.display()} ({_one_line(e)}); {hint}") from None


def _check_output(store: Store) -> None:
    if store.remote:
        return
    root = store.root
    while not os.path.exists(root) and os.path.dirname(root) != root:
        root = os.path.dirname(root)  # the nearest existing ancestor must be a directory too
    if not os.path.isdir(root):
        raise UserError(f"--output {store.display()}: {root} is a file, not a directory; choose a directory "
                        "(it is created when missing)")


def _start_or_resume(store: Store, cfg: PrepConfig, plan: dict) -> bool:
    """Check that the output is ours to write; True when an earlier run of this job is resumed."""
    old = _load_json(store, f"{WORK}/plan.json")
    if old is not None:
        if old == plan:
            return True
        if any(len(f) != 3 for unit in old.get("units") or [] for f in unit):
            raise UserError(f"{store.display()} holds an unfinished job of an older pico prep, which named documents "
                            "by their local path; pass --overwrite to start it over")
        changed = PrepConfig.changed(plan["options"], old.get("options") or {})
        what = f"options ({', '.join(changed)})" if changed else "input files"
        raise UserError(f"{store.display()} holds an unfinished job with other {what}. "
                        "Rerun with the same inputs and options to resume it, or pass --overwrite to start over.")
    if any(SHARD_NAME.match(n) for n in store.list()):
        raise UserError(f"{store.display()} already holds shards but no manifest.json; "
                        "choose an empty output or pass --overwrite")
    store.check_writable()
    store.write_bytes(f"{WORK}/plan.json", json.dumps(plan).encode())
    return False


def _clear(store: Store) -> None:
    for name in store.list():
        if SHARD_NAME.match(name) or name == MANIFEST:
            store.remove(name)
    store.remove(WORK)


def _dedup_drops(ray, cfg: PrepConfig, store: Store, units, window: int, progress: bool
                 ) -> tuple[dict[int, list[int]], dict[int, int]]:
    """(ordinals to drop per unit: every document whose content hash an earlier one already had; the
    documents the pass read per unit)."""
    hashes: dict[int, bytes] = {}
    for u in range(len(units)):
        data = store.read_bytes(f"{unit_dir(u)}/hashes.bin")
        if data is not None:
            hashes[u] = data
    options = cfg.to_dict()
    args = {u: (options, u, [[f.url, f.size, f.name] for f in units[u]]) for u in range(len(units)) if u not in hashes}
    sizes = {u: sum(f.size for f in units[u]) for u in range(len(units))}
    bar = _Progress(progress, "prep (dedup pass)", sum(sizes.values()), sum(sizes[u] for u in hashes))
    try:
        for u, r in _run_tasks(ray, _Task(ray, hash_unit), args, window, sizes, bar).items():
            hashes[u] = r["hashes"]
    finally:
        bar.close()
    return duplicate_ordinals([hashes[u] for u in range(len(units))]), {u: len(h) // 16 for u, h in hashes.items()}


def duplicate_ordinals(hashes: list[bytes]) -> dict[int, list[int]]:
    """{unit: [ordinal, ...]} of every 16-byte hash that an earlier (unit, ordinal) already had.

    A sort of all hashes (about 50 bytes a document at its peak) rather than a set of Python objects
    (over 100), so that the driver can dedup a few hundred million documents.
    """
    import numpy as np

    counts = np.array([len(h) // 16 for h in hashes], dtype=np.int64)
    if counts.sum() == 0:
        return {}
    pairs = np.frombuffer(b"".join(hashes), dtype=">u8").reshape(-1, 2)
    position = np.arange(len(pairs))
    order = np.lexsort((position, pairs[:, 1], pairs[:, 0]))  # by hash, then input order
    s = pairs[order]
    repeat = np.zeros(len(s), dtype=bool)
    repeat[1:] = (s[1:] == s[:-1]).all(axis=1)
    dup = np.sort(order[repeat])
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    unit_of = np.searchsorted(starts, dup, side="right") - 1
    drops: dict[int, list[int]] = {}
    for u, pos in zip(unit_of.tolist(), dup.tolist()):
        drops.setdefault(u, []).append(pos - int(starts[u]))
    return drops


def _portable(skip: dict, cfg: PrepConfig, store: Store) -> dict:
    """A skip as the manifest records it: its source and reason name no local path (`portable_text`)."""
    def text(s: str) -> str:
        if not store.remote:  # "this input is the output directory ...": the output by its name
            s = s.replace(store.root, os.path.basename(store.root))
        return portable_text(s, cfg.inputs)
    return dict(skip, source=text(skip["source"]), reason=text(skip["reason"]))


def _finalize(store: Store, cfg: PrepConfig, records: list[dict], input_problems: list[Skip],
              files: list[InputFile]) -> dict:
    """Give shards their final names in unit order, move them there, write the manifest last."""
    shards, moves, next_index = [], [], {"train": 0, "val": 0}
    names = {f.url: f.name for f in files}
    for rec in records:
        for s in rec["shards"]:
            name = shard_name(s["split"], next_index[s["split"]])
            next_index[s["split"]] += 1
            moves.append((f"{unit_dir(rec['unit'])}/{shard_name(s['split'], s['index'])}", name))
            shards.append({"name": name, "split": s["split"], "samples": s["samples"], "raw_bytes": s["raw_bytes"],
                           "compressed_bytes": s["compressed_bytes"], "sha256": s["sha256"]})
    shards.sort(key=lambda s: (s["split"] != "train", s["name"]))
    store.refresh()
    for src, dst in moves:
        if store.exists(src):
            store.move(src, dst)
        elif not store.exists(dst):  # neither in _work nor moved by an earlier, killed finalize
            raise UserError(f"shard {store.display(src)} is missing; rerun with --overwrite to start over")
    totals = {}
    for split in ("train", "val"):
        mine = [s for s in shards if s["split"] == split]
        totals[split] = {"shards": len(mine), **{k: sum(s[k] for s in mine)
                                                 for k in ("samples", "raw_bytes", "compressed_bytes")}}
    documents = {k: sum(r["documents"][k] for r in records)
                 for k in ("read", "written", "deduplicated", "empty", "failed")}
    manifest = {"version": 1, "shards": shards, "totals": totals, "documents": documents,
                # a skipped document by its file's portable name, as the shards name documents (the terminal
                # said its local path)
                "skipped": [_portable(skip, cfg, store) for skip in [p.record() for p in input_problems] + [
                    dict(s, source=names.get(s["source"], s["source"])) for r in records for s in r["skipped"]]],
                "config": cfg.manifest_options(files)}
    store.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode() + b"\n")
    store.remove(WORK)
    return manifest


def run_job(cfg: PrepConfig, progress: bool = True) -> tuple[dict, dict]:
    """Run (or resume, or find finished) the job `cfg`; return its manifest and run statistics.

    A local output is locked for the job (configs/lock.py): a second job on it is refused."""
    store = Store(cfg.output)
    _check_output(store)
    with contextlib.ExitStack() as stack:
        if not store.remote:
            with _output_access(store, "write"):
                stack.enter_context(hold(store.root, "pico prep"))
        return _run_job(cfg, store, progress)


def _run_job(cfg: PrepConfig, store: Store, progress: bool) -> tuple[dict, dict]:
    t0, cpu0 = time.perf_counter(), time.process_time()
    stats = {"output": store.display(), "units": 0, "units_run": 0, "units_resumed": 0}
    with _output_access(store, "open"):
        if cfg.overwrite:
            _clear(store)
        manifest = _load_json(store, MANIFEST)
    files, input_problems = expand_inputs(cfg.inputs, exclude=None if store.remote else store.root)
    if manifest is not None:
        # the manifest's own record, or the one pico prep wrote before manifests named no local path
        recorded = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        if all(PrepConfig.changed(now, recorded) for now in (cfg.manifest_options(files), cfg.output_options())):
            raise UserError(f"{store.display(MANIFEST)} records a finished job with other options or other input "
                            "files (by name and size); choose another output or pass --overwrite")
        store.remove(WORK)  # a finalize killed after the manifest was written
        return manifest, {**stats, "already_complete": True, "seconds": time.perf_counter() - t0}

    if not files:
        raise UserError("no input matched: " + "; ".join(p.message() for p in input_problems))
    for p in input_problems:
        print(f"pico prep: {'' if p.kind == 'excluded' else 'skipped input '}{p.message()}", file=sys.stderr)
    failed = [p for p in input_problems if p.kind == "failed"]
    if cfg.fail_fast and failed:
        raise UserError(f"{failed[0].message()} (stopped by --fail-fast)")
    units = plan_units(files, cfg.unit_bytes)
    # the inputs and the output as places, not as typed (`shards/` and `shards`, or another working directory)
    where = {"inputs": [p if is_url(p) else os.path.abspath(os.path.expanduser(p.removeprefix("file://")))
                        for p in cfg.inputs], "output": store.display()}
    plan = json.loads(json.dumps({"options": {**cfg.output_options(), **where},
                                  "units": [[[f.url, f.size, f.name] for f in u] for u in units]}))
    with _output_access(store, "write"):
        _start_or_resume(store, cfg, plan)

    records: dict[int, dict] = {}
    for u in range(len(units)):
        rec = _load_json(store, f"{unit_dir(u)}/done.json")
        if rec is not None:
            records[u] = rec
    stats.update(units=len(units), units_resumed=len(records))
    sizes = {u: sum(f.size for f in units[u]) for u in range(len(units))}
    if len(records) < len(units):
        t_ray = time.perf_counter()
        with ray_session(cfg.ray_address, cfg.workers) as ray:
            stats["ray_start_seconds"] = time.perf_counter() - t_ray  # ~0 when this process had a Ray
            window = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            drops, hashed = _dedup_drops(ray, cfg, store, units, window, progress) if cfg.dedup else ({}, {})
            options = cfg.to_dict()
            declared_val = any(declared_split(f.url) == "val" for f in files)
            args = {u: (options, u, [[f.url, f.size, f.name] for f in units[u]], drops.get(u, []), declared_val,
                        hashed.get(u)) for u in range(len(units)) if u not in records}
            bar = _Progress(progress, "prep", sum(sizes.values()), sum(sizes[u] for u in records))
            try:
                records.update(_run_tasks(ray, _Task(ray, run_unit), args, window, sizes, bar))
            finally:
                bar.close()
        stats["units_run"] = len(args)
    manifest = _finalize(store, cfg, [records[u] for u in range(len(units))], input_problems, files)
    seconds = time.perf_counter() - t0
    raw = manifest["totals"]["train"]["raw_bytes"] + manifest["totals"]["val"]["raw_bytes"]
    stats.update(seconds=seconds, input_bytes=sum(sizes.values()), raw_bytes=raw,
                 raw_mb_per_s=raw / seconds / 1e6 if seconds else 0.0,
                 task_cpu_seconds=sum(records[u].get("cpu_seconds", 0.0) for u in range(len(units))),
                 driver_cpu_seconds=time.process_time() - cpu0)
    return manifest, stats
