"""`router: chunk`: learned dynamic chunking after H-Net (Hwang, Wang, Gu 2025, arXiv 2507.07955, section 2.2).

H-Net learns where chunks start from the *change* between neighbouring positions:

- **Boundary probability** p_t = 0.5 * (1 - cos(W_q x_t, W_k x_{t-1})), with W_q and W_k
  initialised to the identity (so at the start a boundary is where the residual turns by more than
  90 degrees), p_0 = 1 (a sequence starts a chunk), and a boundary where p_t >= 0.5. The decision at
  t reads x_{t-1} and x_t only, so training and generation route the same way: no top-k, no
  calibration. Decoding keeps the router input at the last committed byte as its state.
- **Ratio loss** (their section 2.3) holds the boundary rate near a target 1/N (pico's `capacity`):
  N/(N-1) * ((N-1) F G + (1-F)(1-G)), with F the fraction of positions that are boundaries (a count,
  no gradient) and G the mean boundary probability. At F = G = 1/N it equals 1.
- Without dechunking the latent output returns at the boundaries scaled by p_t (the language loss
  teaches the scorer through it); with `dechunk` the EMA and the confidence estimator read p
  (model/latent.py).

Pico's own choice: a cap of ceil(chunk_cap * max_seq_len) boundaries per sequence (`chunk_cap`,
default 2 x capacity) bounds the latent blocks' memory. Boundaries past it are not routed (those
bytes join the last routed chunk) and are counted: `chunk_overflow`, `chunk_overflow_frac`,
`chunk_overflow_seqs`. The cap is a prefix rule, so it is causal too; decoding slides it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pico.model.config import ModelConfig, n_routed
from pico.model.routers.base import Router, Routing, Step, StepRouting, capped, chunk_lengths, packed, register


class ChunkScorer(nn.Module):
    """Boundary probabilities p_t = 0.5 * (1 - cos(W_q x_t, W_k x_{t-1})), W_q = W_k = I at init."""

    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity projections: the first boundaries are where the residual stream turns."""
        with torch.no_grad():
            self.q_proj.weight.copy_(torch.eye(self.q_proj.weight.shape[0]))
            self.k_proj.weight.copy_(torch.eye(self.k_proj.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """p (B, T) for residuals x (B, T, d) of a sequence that starts at x[:, 0] (p = 1 there)."""
        p = self.pair(x[:, 1:], x[:, :-1])
        return torch.cat([p.new_ones(p.shape[0], 1), p], dim=1)

    def pair(self, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
        """p (B, C) of residuals x (B, C, d) whose predecessors are x_prev (B, C, d)."""
        cos = F.cosine_similarity(self.q_proj(x).float(), self.k_proj(x_prev).float(), dim=-1)
        return (0.5 * (1 - cos)).clamp(0.0, 1.0)


def ratio_loss(boundaries: torch.Tensor, p: torch.Tensor, capacity: float) -> torch.Tensor:
    """H-Net's ratio loss toward a boundary rate of `capacity` = 1/N, over all positions of the batch.

    F (fraction of boundaries) carries no gradient; G (mean probability) does. capacity = 1
    (N = 1, every byte a boundary) has no finite form; 1 - G pulls every probability up instead."""
    f = boundaries.float().mean()
    g = p.float().mean()
    if capacity >= 1.0:
        return 1.0 - g
    n = 1.0 / capacity
    return n / (n - 1) * ((n - 1) * f * g + (1 - f) * (1 - g))


def chunk_rate(cfg: ModelConfig) -> float:
    """The cap on boundaries per byte: model.chunk_cap, or 2 x capacity (at most 1) when it is 0."""
    return cfg.chunk_cap if cfg.chunk_cap > 0 else min(1.0, 2 * cfg.capacity)


@register
class ChunkRouter(Router):
    """H-Net's cosine boundary scorer, capped at chunk_rate(cfg) boundaries per byte."""

    name = "chunk"
    options = ("chunk_cap",)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.chunk = ChunkScorer(cfg.d_local)

    def init_weights(self) -> None:
        self.chunk.reset_parameters()  # W_q = W_k = I

    @classmethod
    def validate(cls, cfg: ModelConfig) -> None:
        if not cfg.capacity <= chunk_rate(cfg) <= 1.0:
            raise ValueError(f"model config: model.chunk_cap={cfg.chunk_cap} must be in [model.capacity={cfg.capacity}, "
                             "1]: a cap below the target boundary rate would drop boundaries on every sequence "
                             "(0 = 2 x capacity)")

    @classmethod
    def macs(cls, cfg: ModelConfig) -> float:
        return 2 * cfg.d_local * cfg.d_local  # W_q and W_k

    @classmethod
    def params(cls, cfg: ModelConfig) -> int:
        return 2 * cfg.d_local * cfg.d_local

    @classmethod
    def max_rate(cls, cfg: ModelConfig) -> float:
        return chunk_rate(cfg)

    @classmethod
    def describe(cls, cfg: ModelConfig) -> str:
        return (f"chunk (H-Net's learned boundaries, target rate {cfg.capacity:g} held by a ratio loss, at most "
                f"{chunk_rate(cfg):g} of the bytes)")

    def forward(self, x: torch.Tensor, ids: torch.Tensor, routing: str) -> Routing:
        p = self.chunk(x)  # (B, T); p[:, 0] = 1
        boundaries = p >= 0.5
        mask = capped(boundaries, n_routed(chunk_rate(self.cfg), self.cfg.max_seq_len))
        idx, pos, valid, _ = packed(mask, x)
        gate = (p.gather(1, idx) * valid).to(x.dtype)
        return Routing(idx, pos, gate, mask, prob=p, extra={"boundaries": boundaries})

    def aux_loss(self, r: Routing) -> torch.Tensor:
        return ratio_loss(r.extra["boundaries"], r.prob, self.cfg.capacity)

    def stats(self, r: Routing) -> dict[str, torch.Tensor]:
        """The boundary rate and chunk lengths, and what the cap dropped (never silently)."""
        b = r.extra["boundaries"]
        dropped = b & ~r.mask
        lengths = chunk_lengths(r.mask).float()
        q = torch.quantile(lengths, torch.tensor([0.5, 0.9], device=lengths.device))
        return {"boundary_frac": b.float().mean(), "boundary_prob_mean": r.prob.float().mean(),
                "chunk_len_mean": lengths.mean(), "chunk_len_p50": q[0], "chunk_len_p90": q[1],
                "chunk_overflow": dropped.sum(), "chunk_overflow_frac": dropped.sum() / b.sum().clamp(min=1),
                "chunk_overflow_seqs": dropped.any(1).float().mean()}

    def init_state(self, batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": like.new_zeros(batch, self.cfg.d_local)}  # the router input at the last committed byte

    def step(self, x: torch.Tensor, s: Step, state: dict[str, torch.Tensor]) -> StepRouting:
        p = torch.where(s.pos == 0, 1.0, self.chunk.pair(x, s.before(x, state["x"])))  # p = 1 at position 0
        mask = s.sliding_cap(s.real(p >= 0.5), n_routed(chunk_rate(self.cfg), s.context))
        return StepRouting(mask, p.to(x.dtype), p, carry={"x": x})
