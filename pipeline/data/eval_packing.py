"""The one evaluation packer: training's validation, `pico eval` and the quickstart score the same way.

What is scored: documents are packed into one stream EOS, doc_0, EOS, doc_1, EOS, ... so every
document starts after an EOS, as in training. Every byte of every document is a next-byte
target exactly once, *including its first byte* (predicted from the EOS before it, the context
a document start has in training), and so is the EOS that ends each document. `bytes` in the
result of `evaluate` counts those targets (document bytes + one EOS per document).

    pack_eval(documents, seq_len, extra)   (batch (B, T + extra), n_valid (B,)) from any documents
    text_file_batches(paths, ...)          each plain file is one document
    loader.eval_sequences(shards, ...)     the documents of validation shards (pipeline/data/loader.py)

PAD fills the windows past the end of the stream; `make_targets` turns PAD targets into the
ignore index, the one place padding is masked.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from pico.configs.errors import UserError
from pico.model.config import EOS, PAD


def pack_eval(documents: Iterable[bytes], seq_len: int, extra: int = 0, batch_size: int = 8, rank: int = 0,
              world_size: int = 1, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic, one pass: (batch (B, T + extra) int64, n_valid (B,) int64).

    The stream is EOS, doc_0, EOS, doc_1, EOS, ... Window k is stream[kT : kT + T + extra] padded
    with PAD, and goes to rank k % world_size. Its next-byte targets are row[1:T+1]: every stream
    position after the first (every document byte and every EOS) is a next-byte target exactly
    once across ranks.

    Ignoring padding: targets equal to PAD are not data (for head h, targets row[h:T+h]); for
    the next-byte head, equivalently, only the first n_valid[i] targets of row i count. Rows of
    all PAD (n_valid 0) fill the last batch, and every rank yields the same number of batches
    (so collective ops in the forward pass stay in step): each rank reads every document, and
    stops after max_batches batches when given. For bits per byte over bytes only, also ignore
    targets equal to EOS.
    """
    T, width, world = seq_len, seq_len + extra, world_size
    limit = None if max_batches is None else max_batches * batch_size * world
    ids = np.array([EOS], dtype=np.uint16)
    k = 0  # next window index
    rows: list[np.ndarray] = []
    valid: list[int] = []
    yielded = 0

    def window(n_valid: int) -> None:
        nonlocal ids, k
        if k % world == rank:
            row = np.full(width, PAD, dtype=np.uint16)
            part = ids[:width]
            row[:len(part)] = part
            rows.append(row)
            valid.append(n_valid)
        k += 1
        ids = ids[T:]

    def flush(pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal rows, valid
        while len(rows) < pad_to:
            rows.append(np.full(width, PAD, dtype=np.uint16))
            valid.append(0)
        out = torch.from_numpy(np.stack(rows).astype(np.int64)), torch.tensor(valid, dtype=torch.long)
        rows, valid = [], []
        return out

    for doc in documents:
        arr = np.frombuffer(doc, dtype=np.uint8)
        ids = np.concatenate([ids, arr, np.array([EOS], dtype=np.uint16)], dtype=np.uint16)
        while len(ids) >= width and (limit is None or k < limit):
            window(T)
            if len(rows) == batch_size:
                yield flush(batch_size)
                yielded += 1
        if limit is not None and k >= limit:
            return
    while len(ids) > 1 and (limit is None or k < limit):  # the tail: windows with fewer than T targets
        window(min(T, len(ids) - 1))
        if len(rows) == batch_size:
            yield flush(batch_size)
            yielded += 1
    per_rank_max = -(-k // world)  # rank 0 has the most windows
    total = -(-per_rank_max // batch_size)
    if max_batches is not None:
        total = min(total, max_batches)
    while yielded < total:
        yield flush(batch_size)
        yielded += 1


def text_file_batches(paths: list[Path], seq_len: int, extra: int, batch_size: int,
                      max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Plain files scored as documents (one file, one document), packed by `pack_eval`."""
    def documents() -> Iterator[bytes]:
        for path in paths:
            data = Path(path).read_bytes()
            if not data:
                raise UserError(f"{path} is empty; there is nothing to score")
            yield data

    return pack_eval(documents(), seq_len, extra=extra, batch_size=batch_size, max_batches=max_batches)
