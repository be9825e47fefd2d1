"""Training and validation bytes: shards from `pico prep` -> packed sequences, per rank and worker, resumable.

    shards = resolve_shards(cfg.data.train, "train")
    loader = ByteBatches(shards, seq_len=512, batch_size=8, extra=n_predict, rank=r, world_size=w)
    for batch in loader: ...            # LongTensor (B, T + extra), endless
    ckpt["data"] = loader.state_dict()  # exact position after the last batch received

Design choices, and why:

- **One stream per worker ("slot").** Rank r's DataLoader worker w is slot r*W + w of
  world_size*W slots. With at least as many shards as slots, each epoch deals the (seeded,
  per-epoch reshuffled) shard list round-robin to slots; with fewer, every slot reads every
  shard and keeps sample j of the p-th shard when (j + p) % slots == slot (correct, but each
  slot then reads all the bytes: prepare many more shards than slots for real runs). Either way
  the slots partition the data: within an epoch each document reaches exactly one slot once. A
  slot's epochs are its own (a slot dealt one shard more than another takes longer), so
  "epoch" is counted per slot and `stats["epoch"]` is the slowest slot's.
- **Shuffle:** per slot, a buffer of at most `shuffle_buffer` documents and about
  `shuffle_buffer_bytes` (documents can be 16 MiB chunks; the byte cap bounds memory). Each
  draw's index is a counter-based hash of (seed, epoch, slot, draw), so the state holds a draw
  count, not an RNG state. The buffer drains at the end of an epoch, so epochs never mix.
- **Packing:** each document is followed by EOS and appended to the slot's stream of byte ids;
  sequences are windows of T + extra ids taken with stride T, so every id of the stream is an
  input exactly once and the `extra` ids are the multi-token-prediction targets past the
  window. The stream never restarts: the tail of epoch e is packed together with the start of
  epoch e+1 (no padding and no dropped bytes in training; the trainer needs no mask).
- **Exact resume:** each worker hands over a few batches at a time with its state after them.
  The main process keeps, per worker, the state after its last item handed out in full, plus
  which worker is next and how many ids of that worker's current item are already out
  (replayed on resume: at most one item). Prefetched batches never advance the state. A worker
  state names documents, not bytes: (epoch, shard position, sample index) for the read cursor,
  for each document in the shuffle buffer and for the documents still being packed (plus an
  offset into the first). Resuming re-reads the few shards those documents come from (bounded:
  about one shuffle buffer's span). The new DataLoader's worker ids are rotated so that its
  first batch comes from the worker that was next.
- **Mixtures** (`data.mix`, `_MixStream`): every source is its own slot stream (own shard
  plan, shuffle, packing and epochs) and each batch row comes from one source, picked by a
  deterministic deficit rule, so byte shares follow the weights within one row per slot and the
  state is the sources' states plus rows taken per source. `row_sources` names each row's source
  for per-source training bpb.
- **Corrupt input:** an unreadable shard or sample stops with a UserError naming the shard and
  member, or, with skip_corrupt, is skipped and counted in `stats["corrupt_skipped"]`.

Validation (`eval_sequences`) is unshuffled and needs no state: see its docstring.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import torch
import zstandard
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pico.configs.errors import UserError
from pico.data_prep.shards import Sample, SampleError, ShardError, decode_sample, read_shard
from pico.pipeline.data.eval_packing import pack_eval
from pico.model.config import EOS

STATE_VERSION = 1
MAX_NAMED = 100  # corrupt shards named per loader slot (the count goes on past it)
_GLOB_CHARS = re.compile(r"[*?\[]")
_SPLIT_NAME = re.compile(r"^(train|val)-\d+\.tar$")
MAX_MANIFEST_BYTES = 256 << 20  # a manifest lists shards and skipped documents: MBs for the largest corpora
_MASK64 = (1 << 64) - 1
_FIX = ("re-run `pico prep` for it, drop it from the data paths, or set data.skip_corrupt=true "
        "to skip and count corrupt samples")
# Evaluation reads every byte of its split and never skips, so its fix does not offer data.skip_corrupt.
_EVAL_FIX = "re-run `pico prep` for it, or leave it out of the validation data"

DocId = tuple[int, int, int]  # (epoch, position of the shard in the slot's plan, sample index in the shard)


# ---------------------------------------------------------------------------------------------
# Finding shards


def resolve_shards(paths: list[str], split: str) -> list[str]:
    """Shard URLs of `split` from directories, globs, or explicit `.tar` paths/URLs (local or s3://).

    A directory contributes the shards its `manifest.json` lists for `split` (in manifest order),
    or, without a manifest, its `{split}-*.tar` files in name order. A glob keeps the .tar files
    it matches except those named for the other split (`val-000003.tar` when split is train),
    and naming such a shard explicitly is an error; other .tar names are taken as given. A
    shard named twice is kept once. Raises UserError naming the path when a path matches nothing.
    """
    if not paths:
        raise UserError(f"no {split} data paths given: set data.{split} to a shard directory, glob or .tar URL")
    out: list[str] = []
    for path in paths:
        found = _resolve_one(str(path), split)
        if not found:
            raise UserError(f"{path}: no {split} shards found (expected {split}-*.tar files, a manifest.json "
                            f"listing {split} shards, or a glob matching .tar files)")
        out.extend(found)
    return list(dict.fromkeys(out))


def _resolve_one(path: str, split: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(path)
    local = "file" in _protocols(fs)

    def url(p: str) -> str:
        return p if local else fs.unstrip_protocol(p)

    if _GLOB_CHARS.search(path):  # `shards/*.tar` must not hand the val shards to training
        return sorted(url(p) for p in fs.glob(root) if p.endswith(".tar") and _of_split(os.path.basename(p), split))
    if path.endswith(".tar"):
        if not fs.exists(root):
            raise UserError(f"shard {path} does not exist")
        if not _of_split(os.path.basename(root), split):
            raise UserError(f"shard {path} is named for another split than {split}; list {split} shards here")
        return [url(root)]
    if not fs.isdir(root):
        raise UserError(f"{path} does not exist (expected a directory written by `pico prep`, a glob, or a .tar shard)")
    root = root.rstrip("/")
    manifest = f"{root}/manifest.json"
    if fs.exists(manifest):
        try:
            with fs.open(manifest, "rb") as f:  # read to the bound, whatever size the store reports (HTTP: none)
                raw = f.read(MAX_MANIFEST_BYTES + 1)
            if len(raw) > MAX_MANIFEST_BYTES:
                raise ValueError(f"over {MAX_MANIFEST_BYTES:,} bytes")
            entries = json.loads(raw)["shards"]
            names = [e["name"] for e in entries if e.get("split") == split]
            odd = next((n for n in names if not isinstance(n, str) or not _SPLIT_NAME.match(n)), None)
            if odd is not None:  # a name like ../../x would read outside the folder
                raise ValueError(f"shard name {str(odd)[:80]!r} is not train-NNNNNN.tar or val-NNNNNN.tar")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise UserError(f"{url(manifest)} is not a valid manifest ({str(e)[:200]}); re-run `pico prep`") from None
        if not names:
            splits = sorted({str(e.get("split")) for e in entries})
            raise UserError(f"{url(manifest)} lists no {split} shards (it has: {', '.join(splits) or 'none'})")
        return [url(f"{root}/{n}") for n in names]
    return sorted(url(p) for p in fs.glob(f"{root}/{split}-*.tar"))


def _of_split(name: str, split: str) -> bool:
    """False only for a shard named for another split (val-000003.tar when split is train)."""
    m = _SPLIT_NAME.match(name)
    return m is None or m.group(1) == split


def _protocols(fs: Any) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


# ---------------------------------------------------------------------------------------------
# Reading one shard (the format, its reader and its checks are data_prep/shards.py's)


def _decode(url: str, sample: Sample, dctx: zstandard.ZstdDecompressor) -> bytes:
    """The document of one sample; a SampleError becomes a ShardError that names the shard too."""
    try:
        return decode_sample(sample, dctx)[0]
    except SampleError as e:
        raise ShardError(f"shard {url}, {e}") from None


def _hash_index(n: int, *keys: int) -> int:
    """A uniform-enough index in [0, n) from integer keys (splitmix64 finaliser, chained)."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (k & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h % n


# ---------------------------------------------------------------------------------------------
# One worker's stream: shards -> documents -> shuffle buffer -> packed windows -> batches


class _SlotStream:
    """The endless batch stream of slot `slot` of `n_slots`; its state is a few small lists."""

    def __init__(self, shards: list[str], slot: int, n_slots: int, seq_len: int, extra: int, batch_size: int,
                 seed: int, shuffle_buffer: int, shuffle_buffer_bytes: int, skip_corrupt: bool,
                 state: dict | None = None, source: str | None = None):
        self.shards, self.slot, self.n_slots = shards, slot, n_slots
        self.source = source  # the data.mix source these shards are, named in errors
        self.seq_len, self.extra, self.batch_size = seq_len, extra, batch_size
        self.seed, self.buffer_size, self.skip_corrupt = seed, shuffle_buffer, skip_corrupt
        self.buffer_max_bytes = shuffle_buffer_bytes
        self._dctx = zstandard.ZstdDecompressor()
        self._plans: dict[int, list[tuple[str, int]]] = {}
        # read cursor and counters
        self.epoch = self.pos = self.sample = self.draws = self.epoch_docs = 0
        self.docs = self.bytes = self.corrupt = 0
        self.corrupt_shards: list[str] = []  # names of the shards corrupt samples were skipped in
        self.buffer_ids: list[DocId] = []  # kept apart from the bytes so a state snapshot is one list copy
        self.buffer_docs: list[bytes] = []
        self.buffer_bytes = 0
        # packing: `tokens` is the unconsumed stream; it starts `offset` tokens into pending[0]
        self.pending: deque[tuple[DocId, int]] = deque()  # (doc id, its length + 1 for EOS)
        self.offset = 0
        self.tokens = np.empty(0, dtype=np.uint16)
        if state is not None:
            self._restore(state)
        self._docs = self.documents()

    def plan(self, epoch: int) -> list[tuple[str, int]]:
        """This slot's (shard URL, phase) list for an epoch; phase -1 = the whole shard, else samples j % n == phase."""
        if epoch not in self._plans:
            order = list(self.shards)
            random.Random(f"pico-shards:{self.seed}:{epoch}").shuffle(order)
            n = self.n_slots
            if len(order) >= n:
                plan = [(u, -1) for u in order[self.slot::n]]
            else:
                plan = [(u, (self.slot - p) % n) for p, u in enumerate(order)]
            self._plans = {epoch: plan, **{e: p for e, p in self._plans.items() if e >= epoch - 1}}
        return self._plans[epoch]

    def _read(self, url: str, phase: int, start: int) -> Iterator[tuple[int, bytes | None]]:
        """(sample index, document) this slot takes from a shard; None for a skipped corrupt sample or shard."""
        try:
            for j, sample in read_shard(url, start):
                if phase >= 0 and j % self.n_slots != phase:
                    continue
                try:
                    doc = _decode(url, sample, self._dctx)
                except ShardError as e:
                    if not self.skip_corrupt:
                        raise UserError(f"corrupt sample in {e}; {_FIX}") from None
                    doc = None
                yield j, doc
        except ShardError as e:
            if not self.skip_corrupt:
                raise UserError(f"corrupt {e}; {_FIX}") from None
            yield -1, None

    def _take(self) -> tuple[DocId, bytes]:
        """Remove and return a random document of the shuffle buffer."""
        ids, docs = self.buffer_ids, self.buffer_docs
        i = _hash_index(len(ids), self.seed, self.epoch, self.slot, self.draws)
        self.draws += 1
        ids[i], ids[-1] = ids[-1], ids[i]
        docs[i], docs[-1] = docs[-1], docs[i]
        self.buffer_bytes -= len(docs[-1])
        return ids.pop(), docs.pop()

    def documents(self) -> Iterator[tuple[DocId, bytes]]:
        """Documents in shuffled order, epoch after epoch; the cursor fields always describe what is left."""
        while True:
            plan = self.plan(self.epoch)
            while self.pos < len(plan):
                url, phase = plan[self.pos]
                for j, doc in self._read(url, phase, self.sample):
                    if doc is None:
                        self.corrupt += 1
                        if os.path.basename(url) not in self.corrupt_shards and len(self.corrupt_shards) < MAX_NAMED:
                            self.corrupt_shards.append(os.path.basename(url))
                        if j >= 0:
                            self.sample = j + 1
                        continue
                    # Make room, then take the document in. The cursor moves past it only
                    # after the draws, so a resume from any of these yields redoes the same draws.
                    while self.buffer_ids and (len(self.buffer_ids) >= self.buffer_size
                                               or self.buffer_bytes + len(doc) > self.buffer_max_bytes):
                        yield self._take()
                    self.sample = j + 1
                    self.docs, self.bytes, self.epoch_docs = self.docs + 1, self.bytes + len(doc), self.epoch_docs + 1
                    self.buffer_ids.append((self.epoch, self.pos, j))
                    self.buffer_docs.append(doc)
                    self.buffer_bytes += len(doc)
                self.pos, self.sample = self.pos + 1, 0
            while self.buffer_ids:  # end of epoch: drain in random order
                yield self._take()
            if self.epoch_docs == 0:
                raise UserError(self._nothing_read())
            self.epoch, self.pos, self.sample, self.draws, self.epoch_docs = self.epoch + 1, 0, 0, 0, 0

    def _nothing_read(self) -> str:
        where = f"data.mix source {self.source!r}: " if self.source else ""
        if self.corrupt_shards:  # issue 28: with skip_corrupt, an all-corrupt source was not named
            skipped = ", ".join(self.corrupt_shards[:5]) + (", ..." if len(self.corrupt_shards) > 5 else "")
            return (f"{where}loader slot {self.slot} of {self.n_slots} found no readable documents in epoch "
                    f"{self.epoch}: every sample it read was corrupt and skipped (data.skip_corrupt), in {skipped}; "
                    "re-run `pico prep` for these shards or drop them from the data paths")
        return (f"{where}loader slot {self.slot} of {self.n_slots} (rank * num_workers + worker) found no readable "
                f"documents in epoch {self.epoch}: {len(self.shards)} shard(s) hold too few samples; use fewer ranks "
                "or workers, or more shards")

    def _push(self, doc_id: DocId, doc: bytes) -> None:
        arr = np.frombuffer(doc, dtype=np.uint8)
        self.tokens = np.concatenate([self.tokens, arr, np.array([EOS], dtype=np.uint16)], dtype=np.uint16)
        self.pending.append((doc_id, len(doc) + 1))

    def _consume(self, n: int) -> None:
        self.tokens = self.tokens[n:]
        self.offset += n
        while self.pending and self.offset >= self.pending[0][1]:
            self.offset -= self.pending.popleft()[1]

    def batches(self) -> Iterator[np.ndarray]:
        """Batches (B, T + extra) uint16, forever; between two, `state()` is the position after the last."""
        T, width, B = self.seq_len, self.seq_len + self.extra, self.batch_size
        rows: list[np.ndarray] = []
        while True:
            n = min((len(self.tokens) - self.extra) // T, B - len(rows)) if len(self.tokens) >= width else 0
            if n > 0:
                rows.extend(self.tokens[i * T:i * T + width] for i in range(n))
                self._consume(n * T)
                if len(rows) == B:
                    batch = np.stack(rows)
                    rows = []
                    yield batch
                continue
            self._push(*next(self._docs))

    def advance(self, n_tokens: int) -> None:
        """Move the stream on by n_tokens inputs, as if batches holding that many had been taken."""
        while len(self.tokens) < n_tokens:
            self._push(*next(self._docs))
        self._consume(n_tokens)

    def counters(self) -> dict:
        return {"epoch": self.epoch, "docs": self.docs, "bytes": self.bytes, "corrupt": self.corrupt,
                "corrupt_shards": list(self.corrupt_shards)}

    def state(self) -> dict:
        """A snapshot, cheap enough to take after every batch (doc ids stay tuples until state_dict)."""
        return {"epoch": self.epoch, "pos": self.pos, "sample": self.sample, "draws": self.draws,
                "epoch_docs": self.epoch_docs, "docs": self.docs, "bytes": self.bytes, "corrupt": self.corrupt,
                "corrupt_shards": list(self.corrupt_shards), "buffer": self.buffer_ids.copy(), "pending": [d for d, _ in self.pending], "offset": self.offset}

    def _restore(self, s: dict) -> None:
        for k in ("epoch", "pos", "sample", "draws", "epoch_docs", "docs", "bytes", "corrupt", "offset"):
            setattr(self, k, int(s[k]))
        self.corrupt_shards = list(s.get("corrupt_shards", []))  # absent in states of earlier versions
        buffer_ids = [tuple(d) for d in s["buffer"]]
        pending_ids = [tuple(d) for d in s["pending"]]
        docs = self._fetch(set(buffer_ids) | set(pending_ids))
        self.buffer_ids = buffer_ids
        self.buffer_docs = [docs[d] for d in buffer_ids]
        self.buffer_bytes = sum(map(len, self.buffer_docs))
        self.pending = deque((d, len(docs[d]) + 1) for d in pending_ids)
        parts = [np.frombuffer(docs[d], dtype=np.uint8).astype(np.uint16) for d in pending_ids]
        stream = np.concatenate([x for p in parts for x in (p, np.array([EOS], np.uint16))] or [np.empty(0, np.uint16)])
        self.tokens = stream[self.offset:]

    def _fetch(self, ids: set[DocId]) -> dict[DocId, bytes]:
        """Re-read the documents a saved state refers to (grouped by shard, each shard read up to its last one)."""
        by_shard: dict[tuple[int, int], set[int]] = {}
        for e, p, j in ids:
            by_shard.setdefault((e, p), set()).add(j)
        out: dict[DocId, bytes] = {}
        try:
            for (e, p), wanted in sorted(by_shard.items()):
                self._fetch_shard(e, p, wanted, out)
        except ShardError as e:
            raise UserError(f"cannot resume the loader: corrupt {e}") from None
        return out

    def _fetch_shard(self, e: int, p: int, wanted: set[int], out: dict[DocId, bytes]) -> None:
        """Re-read the wanted samples of shard p of epoch e's plan into `out`."""
        plan = self.plan(e)
        if p >= len(plan):
            raise UserError(f"cannot resume the loader: its state names shard {p} of epoch {e}, but this slot "
                            f"has {len(plan)}; the shard list changed since the checkpoint")
        url, _ = plan[p]
        for j, sample in read_shard(url, min(wanted)):
            if j in wanted:
                out[(e, p, j)] = _decode(url, sample, self._dctx)
                wanted.discard(j)
                if not wanted:
                    break
        if wanted:
            raise UserError(f"cannot resume the loader: shard {url} no longer has sample(s) {sorted(wanted)}; "
                            "the shards changed since the checkpoint")


class _MixStream:
    """Rows from several weighted sources for one slot; same interface as `_SlotStream`.

    Each source is its own `_SlotStream` of one-row batches (own shard plan, shuffle, packing
    and epochs, so a small source repeats while a large one goes on). Row k of the slot's output
    comes from the source furthest below its share: argmax_i (w_i * (k + 1) - rows_i), ties to
    the first. Rows all hold seq_len inputs, so each source's share of training bytes stays
    within one row of its weight at every point, with no randomness to store: the state is the
    sources' states and the rows taken from each.
    """

    def __init__(self, sources: list[tuple[str, list[str], float]], slot: int, n_slots: int, seq_len: int,
                 extra: int, batch_size: int, seed: int, shuffle_buffer: int, shuffle_buffer_bytes: int,
                 skip_corrupt: bool, state: dict | None = None):
        total = sum(w for _, _, w in sources)
        self.names = [name for name, _, _ in sources]
        self.weights = [w / total for _, _, w in sources]
        self.seq_len, self.batch_size = seq_len, batch_size
        sub = state["sources"] if state is not None else [None] * len(sources)
        self.streams = [None if w == 0 else
                        _SlotStream(shards, slot, n_slots, seq_len, extra, 1, seed, shuffle_buffer,
                                    shuffle_buffer_bytes, skip_corrupt, sub[i], source=name)
                        for i, (name, shards, w) in enumerate(sources)]
        self.rows = list(state["rows"]) if state is not None else [0] * len(sources)
        self._rows = [None if s is None else s.batches() for s in self.streams]
        self.row_sources: list[int] = []  # the source of each row of the last batch

    def _next_row(self) -> np.ndarray:
        k = sum(self.rows) + 1
        i = max(range(len(self.weights)), key=lambda j: (self.weights[j] * k - self.rows[j], -j))
        self.rows[i] += 1
        self.row_sources.append(i)
        return next(self._rows[i])[0]

    def batches(self) -> Iterator[np.ndarray]:
        while True:
            self.row_sources = []
            batch = np.stack([self._next_row() for _ in range(self.batch_size)])
            yield batch

    def advance(self, n_tokens: int) -> None:
        self.row_sources = []
        for _ in range(n_tokens // self.seq_len):
            self._next_row()

    def counters(self) -> dict:
        live = [s.counters() for s in self.streams if s is not None]
        per = {name: {"rows": r, "epoch": s.epoch if s is not None else 0}
               for name, r, s in zip(self.names, self.rows, self.streams)}
        return {"epoch": min(c["epoch"] for c in live), "docs": sum(c["docs"] for c in live),
                "bytes": sum(c["bytes"] for c in live), "corrupt": sum(c["corrupt"] for c in live),
                "corrupt_shards": sorted({n for c in live for n in c["corrupt_shards"]}),
                "sources": per, "row_sources": list(self.row_sources)}

    def state(self) -> dict:
        return {"sources": [None if s is None else s.state() for s in self.streams], "rows": list(self.rows)}


def _stream(a: dict, slot: int, n_slots: int, state: dict | None):
    """The stream of one slot: of the one shard list, or of the weighted sources of data.mix."""
    common = (a["seq_len"], a["extra"], a["batch_size"], a["seed"], a["shuffle_buffer"], a["shuffle_buffer_bytes"],
              a["skip_corrupt"], state)
    if a.get("mix"):
        return _MixStream(a["mix"], slot, n_slots, *common)
    return _SlotStream(a["shards"], slot, n_slots, *common)


# ---------------------------------------------------------------------------------------------
# The loader the trainer uses


def _as_is(item: Any) -> Any:
    """DataLoader collate_fn that leaves worker output alone (the default would make tensors in the worker)."""
    return item


def _plain(state: dict) -> dict:
    """A worker state with lists instead of tuples: what JSON gives back, so saved and live states compare equal."""
    if "sources" in state:  # a _MixStream's
        return {"sources": [None if x is None else _plain(x) for x in state["sources"]], "rows": list(state["rows"])}
    return {k: [list(d) for d in v] if isinstance(v, list) else v for k, v in state.items()}


def _exit_with_parent(worker_id: int, poll_s: float = 0.5) -> None:
    """DataLoader worker_init_fn: end this worker as soon as its trainer is gone (kill -9, OOM killer).

    torch's own check runs only between batches, and a worker that then exits with batches still
    queued for a dead reader blocks forever flushing its queue; os._exit skips that flush."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="pico-exit-with-parent", daemon=True).start()


class _WorkerStreams(IterableDataset):
    """DataLoader side: each worker runs one slot and yields (worker, batches, counters, state after them).

    A worker hands over `chunk` batches per DataLoader item, with one state for the lot (a
    DataLoader item costs far more than packing a small batch), and per-batch counters. The
    first worker in this DataLoader's order, logical worker `rotation`, was stopped in the middle
    of an item when `skip` > 0: it restores the state from before that item, moves on by the
    `skip` ids already handed out, and finishes the item with `first` batches.
    """

    def __init__(self, args: dict, states: list[dict | None], rotation: int, skip: int, first: int, chunk: int):
        self.args, self.states, self.rotation = args, states, rotation
        self.skip, self.first, self.chunk = skip, first, chunk

    def __iter__(self):
        info = get_worker_info()
        n = len(self.states)
        logical = ((info.id if info else 0) + self.rotation) % n
        a = self.args
        try:
            stream = _stream(a, a["rank"] * n + logical, a["world_size"] * n, self.states[logical])
            size = self.chunk
            if logical == self.rotation:
                stream.advance(self.skip)
                size = self.first
            batches, counters = [], []
            for batch in stream.batches():
                batches.append(batch)  # numpy, not a tensor: a pipe is much cheaper than shared memory here
                counters.append(stream.counters())
                if len(batches) == size:
                    yield logical, batches, counters, stream.state()
                    batches, counters, size = [], [], self.chunk
        except UserError as e:  # hand the message to the main process, which raises it cleanly
            yield logical, None, None, str(e)


class ByteBatches:
    """Endless, shuffled, packed training batches (B, seq_len + extra) for one rank; exactly resumable.

    Every id of a row is an input except the last `extra`, which are the next row's first
    `extra` inputs (targets of the MTP heads). Documents end in EOS; training rows hold no PAD.
    `state_dict()` is per rank: save each rank's (a few KB), load it into a loader built with the
    same arguments (shards, shapes, rank, world_size, num_workers, seed, shuffle buffer limits).
    """

    def __init__(self, shards: list[str], seq_len: int, batch_size: int, extra: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 256,
                 skip_corrupt: bool = False, shuffle_buffer_bytes: int = 64 << 20, worker_chunk: int | None = None,
                 mix: list[tuple[str, list[str], float]] | None = None):
        if mix:
            shards = [u for _, src, w in mix if w > 0 for u in src]
        if not shards:
            raise UserError("ByteBatches got no shards; check data.train (resolve_shards finds them)")
        if seq_len < 1 or batch_size < 1 or extra < 0 or shuffle_buffer < 1:
            raise UserError(f"ByteBatches: need seq_len >= 1, batch_size >= 1, extra >= 0, shuffle_buffer >= 1 "
                            f"(got {seq_len}, {batch_size}, {extra}, {shuffle_buffer})")
        if not 0 <= rank < world_size:
            raise UserError(f"ByteBatches: rank {rank} is outside world_size {world_size}")
        self._args = dict(shards=list(shards), rank=rank, world_size=world_size, seq_len=seq_len, extra=extra,
                          batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer,
                          shuffle_buffer_bytes=shuffle_buffer_bytes, skip_corrupt=skip_corrupt,
                          mix=[(name, list(src), float(w)) for name, src, w in mix] if mix else None)
        self.num_workers = num_workers
        slots = world_size * max(1, num_workers)
        smallest = min((len(src) for _, src, w in mix if w > 0), default=0) if mix else len(shards)
        if smallest < slots:
            warnings.warn(f"{smallest} shard(s) for {slots} loader workers (world_size x num_workers): every "
                          "worker reads every shard and keeps its share of the samples; prepare more shards "
                          "(pico prep --shard-bytes) so that each worker reads only its own", stacklevel=2)
        # Each DataLoader item costs a pickle and two process wake-ups (milliseconds on busy cores),
        # so workers hand over about 256 KB of batches at a time.
        self.worker_chunk = worker_chunk or min(64, max(1, (1 << 18) // (batch_size * (seq_len + extra) * 2)))
        """Batches a worker hands over at a time (turns go worker 0, 1, ...)."""
        self._states: list[dict | None] = [None] * max(1, num_workers)
        self._counters: list[dict | None] = [None] * max(1, num_workers)  # fresher than _states with workers
        # Per worker, the state after its last item handed out in full; the next worker may be
        # part way through an item: `_skip` input tokens of it handed out, `_left` batches to go.
        self._next = 0
        self._skip = 0
        self._left = 0
        self._batches = 0
        self._row_sources: list[int] | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        a, n = self._args, len(self._states)
        if self.num_workers == 0:
            stream = _stream(a, a["rank"], a["world_size"], self._states[0])
            for batch in stream.batches():
                self._states[0] = stream.state()
                self._counters[0] = stream.counters()
                self._row_sources = self._counters[0].get("row_sources")
                self._batches += 1
                yield torch.from_numpy(batch.astype(np.int64))
            return
        chunk, tokens_per_batch = self.worker_chunk, a["batch_size"] * a["seq_len"]
        streams = _WorkerStreams(a, list(self._states), self._next, self._skip, self._left or chunk, chunk)
        loader = DataLoader(streams, batch_size=None, num_workers=self.num_workers, prefetch_factor=4,
                            collate_fn=_as_is, worker_init_fn=_exit_with_parent)
        for logical, batches, counters, state in loader:
            if batches is None:
                raise UserError(state)
            for i, batch in enumerate(batches):
                self._counters[logical] = counters[i]
                self._row_sources = counters[i].get("row_sources")
                if i + 1 < len(batches):
                    self._next, self._skip, self._left = logical, self._skip + tokens_per_batch, len(batches) - 1 - i
                else:
                    self._states[logical] = state
                    self._next, self._skip, self._left = (logical + 1) % n, 0, 0
                self._batches += 1
                yield torch.from_numpy(batch.astype(np.int64))

    def state_dict(self) -> dict:
        """The position after the last batch handed out: small and JSON-serialisable."""
        return {"version": STATE_VERSION, **self._identity(), "next_worker": self._next, "next_skip": self._skip,
                "next_left": self._left, "batches": self._batches,
                "counters": [None if c is None else dict(c) for c in self._counters],
                "workers": [None if s is None else _plain(s) for s in self._states]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next batch is the one an uninterrupted run would have produced next."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"loader state version {state.get('version')} is not {STATE_VERSION}; it was written by "
                            "another pico version")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise UserError(f"cannot resume the loader: the checkpoint has {key}={state.get(key)!r}, this run has "
                                f"{value!r}; resume with the same data paths and data settings, world size and seed")
        self._states = [None if s is None else dict(s) for s in state["workers"]]
        self._counters = list(state.get("counters") or self._states)
        self._next = int(state["next_worker"])
        self._skip = int(state["next_skip"])
        self._left = int(state["next_left"])
        self._batches = int(state["batches"])

    def _identity(self) -> dict:
        a = self._args
        names = "\n".join(os.path.basename(s) for s in a["shards"]).encode()
        return {"rank": a["rank"], "world_size": a["world_size"], "num_workers": self.num_workers,
                "seed": a["seed"], "shuffle_buffer": a["shuffle_buffer"],
                "shuffle_buffer_bytes": a["shuffle_buffer_bytes"], "seq_len": a["seq_len"],
                "extra": a["extra"], "batch_size": a["batch_size"], "worker_chunk": self.worker_chunk,
                "shards": hashlib.sha256(names).hexdigest()[:16],
                **({"mix": [[name, w, len(src)] for name, src, w in a["mix"]]} if a["mix"] else {})}

    @property
    def stats(self) -> dict:
        """Counters as of the last batch handed out: epoch, documents and bytes read from shards so far, ..."""
        started = [s for s in self._counters if s is not None]
        return {"epoch": min((s["epoch"] for s in started), default=0),
                "worker_epochs": [s["epoch"] if s else 0 for s in self._counters],
                "documents": sum(s["docs"] for s in started), "bytes": sum(s["bytes"] for s in started),
                "corrupt_skipped": sum(s["corrupt"] for s in started), "batches": self._batches,
                "corrupt_shards": sorted({n for s in started for n in s.get("corrupt_shards", [])}),
                **({"sources": self._source_stats(started)} if self._args["mix"] else {})}

    def _source_stats(self, started: list[dict]) -> dict:
        """Per mixture source: rows and training bytes (inputs) handed out, and completed epochs (repeats)."""
        T = self._args["seq_len"]
        out = {}
        for name, _, _ in self._args["mix"]:
            per = [s["sources"][name] for s in started if "sources" in s]
            rows = sum(p["rows"] for p in per)
            out[name] = {"rows": rows, "bytes": rows * T, "epoch": min((p["epoch"] for p in per), default=0)}
        return out

    @property
    def row_sources(self) -> list[int] | None:
        """Source index (into the mix) of each row of the last batch handed out; None without data.mix."""
        return self._row_sources


# ---------------------------------------------------------------------------------------------
# Validation


def eval_sequences(shards: list[str], seq_len: int, extra: int = 0, batch_size: int = 8, rank: int = 0,
                   world_size: int = 1, max_batches: int | None = None,
                   skip_corrupt: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation set: the documents of `shards` in order, packed by `pack_eval` (see there)."""
    dctx = zstandard.ZstdDecompressor()
    docs = (doc for url in shards for _, doc in _eval_documents(url, dctx, skip_corrupt))
    return pack_eval(docs, seq_len, extra=extra, batch_size=batch_size, rank=rank, world_size=world_size,
                     max_batches=max_batches)


def _eval_documents(url: str, dctx: zstandard.ZstdDecompressor, skip_corrupt: bool) -> Iterator[tuple[int, bytes]]:
    try:
        for j, sample in read_shard(url):
            try:
                yield j, _decode(url, sample, dctx)
            except ShardError as e:
                if not skip_corrupt:
                    raise UserError(f"corrupt sample in {e}; {_EVAL_FIX}") from None
    except ShardError as e:
        if not skip_corrupt:
            raise UserError(f"corrupt {e}; {_EVAL_FIX}") from None
