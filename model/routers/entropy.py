"""`router: entropy`: route where the model's own next-byte entropy is high (BLT's criterion, Pagnoni et al.
2024, arXiv 2412.09871, section 2.3, without its separate small model). A research option, not a default.

An early head (RMSNorm + a d_local -> 259 unembedding of its own) reads the byte stream after the
`n_in` local blocks and predicts the next byte; it trains with the others through its cross-entropy
(the router's aux loss, weighted by `aux_loss_weight`), on a stop-gradient copy of the stream, so
the router learns to read the stream without pulling the trunk toward its own objective. The
entropy H_t of its prediction (of byte t + 1) scores position t: in training the top
k = ceil(capacity * T) positions of each sequence route; at inference a position routes when H_t is
above a running estimate of training's k-th largest entropy (the calibrated threshold), which reads
bytes <= t only. Routed outputs return with a gate of 1: the decision carries no gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pico.model.config import PAD, VOCAB_SIZE, ModelConfig, n_routed
from pico.model.layers import RMSNorm
from pico.model.routers.base import Router, Routing, Step, StepRouting, packed, register


@register
class EntropyRouter(Router):
    """Top-k next-byte entropy of an early head in training, a calibrated entropy threshold at inference."""

    name = "entropy"
    lookahead = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.norm = RMSNorm(cfg.d_local, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_local, VOCAB_SIZE, bias=False)
        self.register_buffer("cutoff", torch.zeros(()))
        self.register_buffer("cutoff_seen", torch.zeros(()))

    @classmethod
    def macs(cls, cfg: ModelConfig) -> float:
        return cfg.d_local * VOCAB_SIZE

    @classmethod
    def params(cls, cfg: ModelConfig) -> int:
        return cfg.d_local * VOCAB_SIZE + cfg.d_local

    @classmethod
    def describe(cls, cfg: ModelConfig) -> str:
        return f"entropy (next-byte entropy of an early head: top {cfg.capacity:g} in training, a calibrated threshold at inference)"

    def entropy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Early-head logits (B, T, V) of the stop-gradient stream x and their entropy in nats (B, T, float32)."""
        logits = self.head(self.norm(x.detach()))
        logp = F.log_softmax(logits.float(), dim=-1)
        return logits, -(logp.exp() * logp).sum(-1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, routing: str) -> Routing:
        logits, h = self.entropy(x)
        k = n_routed(self.cfg.capacity, ids.shape[1])
        top = h.topk(k, dim=1).indices.sort(dim=1).values  # (B, k), in position order
        topk_mask = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, top, True)
        if self.training and routing == "topk":
            with torch.no_grad():  # EMA (0.9) of the mean k-th largest entropy; the first batch sets it
                kth = h.topk(k, dim=1).values[:, -1].mean()
                self.cutoff.mul_(0.9 if self.cutoff_seen > 0 else 0.0).add_(
                    (0.1 if self.cutoff_seen > 0 else 1.0) * kth.to(self.cutoff.dtype))
                self.cutoff_seen.add_(1)
        if routing == "topk":
            idx, pos, mask, gate = top, top, topk_mask, torch.ones(top.shape, dtype=x.dtype, device=x.device)
        else:
            mask = h > self.cutoff
            idx, pos, _, gate = packed(mask, x)
        return Routing(idx, pos, gate, mask, extra={"logits": logits, "ids": ids, "entropy": h, "topk_mask": topk_mask})

    def aux_loss(self, r: Routing) -> torch.Tensor:
        """The early head's next-byte cross-entropy (PAD targets ignored)."""
        logits, ids = r.extra["logits"][:, :-1], r.extra["ids"][:, 1:]
        if logits.shape[1] == 0:
            return logits.new_zeros((), dtype=torch.float32)
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), ignore_index=PAD)

    def stats(self, r: Routing) -> dict[str, torch.Tensor]:
        h = r.extra["entropy"]
        return {"entropy_mean": h.mean(), "entropy_cutoff": self.cutoff.float(),
                "causal_agreement": ((h > self.cutoff) == r.extra["topk_mask"]).float().mean()}

    def step(self, x: torch.Tensor, s: Step, state: dict[str, torch.Tensor]) -> StepRouting:
        _, h = self.entropy(x)
        mask = s.real(h > self.cutoff)
        return StepRouting(mask, torch.ones(mask.shape, dtype=x.dtype, device=x.device))
