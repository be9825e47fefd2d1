"""Hashed byte n-gram embeddings (`model.ngram_orders`), after BLT (Pagnoni et al. 2024, arXiv 2412.09871,
section 3.2.1): byte t's embedding gains, for each order n, a row of that order's own table chosen by a
hash of the n bytes ending at t. They give every byte a view of its last few bytes before any attention
runs, at the cost of a table lookup (BLT's ablations and public small-model reproductions report gains
for byte Transformers; pico measures them in issue 30's experiment).

The hash is a polynomial over the byte ids modulo a prime, then modulo `ngram_buckets`. Bytes before a
sequence's first byte are `FILLER` (an id no byte has), in training and in decoding alike. Decoding keeps
the last `max(orders) - 1` committed bytes per sequence as its state.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pico.model.config import VOCAB_SIZE, ModelConfig
from pico.model.routers.base import Step

FILLER = VOCAB_SIZE  # the id hashed for positions before a sequence's start
HASH_BASE, HASH_MOD = 1_000_003, 2_147_483_647  # h = h * base + id mod a prime (fits int64: < 2^51)


class NgramEmbedding(nn.Module):
    """One embedding table per n-gram order; `forward` for whole sequences, `step` for decoding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.orders = list(cfg.ngram_orders)
        self.span = max(self.orders)  # bytes a position's n-grams read, itself included
        self.buckets = cfg.ngram_buckets
        self.tables = nn.ModuleList(nn.Embedding(cfg.ngram_buckets, cfg.d_local) for _ in self.orders)

    def embed(self, hist: torch.Tensor) -> torch.Tensor:
        """Sum of the n-gram embeddings (..., d) from hist (..., span): the last `span` ids ending at each
        position, oldest first."""
        out = None
        for n, table in zip(self.orders, self.tables):
            h = torch.full(hist.shape[:-1], n, dtype=torch.long, device=hist.device)  # the order seeds the hash
            for j in range(self.span - n, self.span):
                h = (h * HASH_BASE + hist[..., j]) % HASH_MOD
            e = table(h % self.buckets)
            out = e if out is None else out + e
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, d) n-gram embeddings of byte ids (B, T)."""
        hist = F.pad(ids, (self.span - 1, 0), value=FILLER).unfold(1, self.span, 1)  # (B, T, span)
        return self.embed(hist)

    def init_state(self, batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The last span - 1 committed ids of each sequence (FILLER before its start)."""
        return {"hist": torch.full((batch, self.span - 1), FILLER, dtype=torch.long, device=like.device)}

    def step(self, s: Step, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, C, d) n-gram embeddings of a decoding step's new bytes, each read along its own past (a chain's
        earlier bytes, a tree node's ancestors, then the committed ones), and each byte's history after it."""
        back = [s.ids]  # back[j]: the id j bytes before each new byte
        for j in range(1, self.span):
            back.append(s.before(back[-1], state["hist"][:, -j]))
        hist = torch.stack(back[::-1], dim=-1)  # (B, C, span), oldest first
        return self.embed(hist), {"hist": hist[..., 1:]}
