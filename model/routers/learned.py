"""`router: learned`: Mixture-of-Depths expert-choice routing (Raposo et al. 2024).

A scalar score per position, read from the RMS-normalised residual after the `n_in` local blocks.
In training (`routing="topk"`) the top k = ceil(capacity * T) positions of each sequence are
gathered in position order, and their latent output returns multiplied by sigmoid(score) *of the
selected positions* (gathered with the same indices, not the first k weights).

Top-k looks at the future, so the router also learns a causal decision: an auxiliary BCE whose logit
is the score and whose target is top-k membership (MoD section 3.5); at inference a position is
routed when its score is above a cut-off. With `router_calibrate` the cut-off is a running estimate
of training's k-th largest score, so inference routes about `capacity` of the bytes from the first
steps; without it the cut-off is 0. `causal_agreement` measures how often the two decisions agree.

Why the levers: a router that starts from random weights scores positions mostly by the current
byte's identity, and expert choice only ever teaches it about the positions it already routes; in
short CPU runs it locked onto vowels or consonants and never found word boundaries
(benchmarks/results/model_router_probe.md). `router_prior` adds a learned weight of SpaceByte's rule
to the score, so the router can start from the rule and learn where to deviate (the rule is causal).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pico.model.config import ModelConfig, n_routed
from pico.model.layers import RMSNorm
from pico.model.routers.base import Router, Routing, Step, StepRouting, pack_slots, register
from pico.model.spacelike import spacelike_boundaries


@register
class LearnedRouter(Router):
    """MoD top-k in training, a calibrated score threshold at inference."""

    name = "learned"
    options = ("router_prior", "router_calibrate")
    lookahead = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.norm = RMSNorm(cfg.d_local, cfg.norm_eps)
        self.score = nn.Linear(cfg.d_local, 1, bias=True)
        if cfg.router_prior != 0.0:  # learned weight of SpaceByte's rule inside the score
            # shape (1,), not 0-dim: DeepSpeed flattens parameters and cannot view a 0-dim tensor
            self.rule_weight = nn.Parameter(torch.tensor([float(cfg.router_prior)]))
        if cfg.router_calibrate:  # running top-k cut-off for causal routing
            self.register_buffer("cutoff", torch.zeros(()))
            self.register_buffer("cutoff_seen", torch.zeros(()))

    def init_weights(self) -> None:
        nn.init.zeros_(self.score.bias)  # no position is preferred before the language loss says so

    @classmethod
    def macs(cls, cfg: ModelConfig) -> float:
        return cfg.d_local

    @classmethod
    def params(cls, cfg: ModelConfig) -> int:
        return 2 * cfg.d_local + 1 + (cfg.router_prior != 0.0)  # norm, score weight and bias, rule weight

    @classmethod
    def describe(cls, cfg: ModelConfig) -> str:
        prior = f", rule prior {cfg.router_prior:g}" if cfg.router_prior else ""
        return (f"learned (Mixture-of-Depths top-k, capacity {cfg.capacity:g}; causal score threshold at inference"
                f"{', calibrated' if cfg.router_calibrate else ''}{prior})")

    def logits(self, x: torch.Tensor, rule: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, T) and causal logits (B, T; routed where > 0) of residuals x and SpaceByte's rule mask."""
        scores = self.score(self.norm(x)).squeeze(-1)  # (B, T)
        if self.cfg.router_prior != 0.0:
            scores = scores + self.rule_weight * rule
        return scores, (scores - self.cutoff if self.cfg.router_calibrate else scores)

    @torch.no_grad()
    def _track_cutoff(self, scores: torch.Tensor, k: int) -> None:
        """EMA (0.9) of the mean k-th largest score per sequence; the first batch sets it directly."""
        kth = scores.detach().float().topk(k, dim=1).values[:, -1].mean()
        momentum = 0.9 if self.cutoff_seen > 0 else 0.0
        self.cutoff.mul_(momentum).add_((1 - momentum) * kth.to(self.cutoff.dtype))
        self.cutoff_seen.add_(1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, routing: str) -> Routing:
        T = ids.shape[1]
        scores, causal = self.logits(x, spacelike_boundaries(ids))
        k = n_routed(self.cfg.capacity, T)
        top = scores.topk(k, dim=1).indices.sort(dim=1).values  # (B, k), in position order
        if self.training and routing == "topk" and self.cfg.router_calibrate:
            self._track_cutoff(scores, k)
        topk_mask = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, top, True)
        if routing == "topk":
            idx, pos, mask = top, top, topk_mask
            gate = torch.sigmoid(scores.gather(1, idx))
        else:
            mask = causal > 0
            idx, pos, valid = pack_slots(mask, max(int(mask.sum(1).max()), 1))
            gate = torch.sigmoid(scores.gather(1, idx)) * valid
        return Routing(idx, pos, gate, mask, prob=torch.sigmoid(scores),
                       extra={"scores": scores, "causal": causal, "topk_mask": topk_mask})

    def aux_loss(self, r: Routing) -> torch.Tensor:
        """BCE teaching causal logit > 0 to mean "in the top k"."""
        return F.binary_cross_entropy_with_logits(r.extra["causal"].float(), r.extra["topk_mask"].float())

    def stats(self, r: Routing) -> dict[str, torch.Tensor]:
        s = r.extra["scores"].float().flatten()
        q = torch.quantile(s[:: max(1, s.numel() // 65536)], torch.tensor([0.1, 0.5, 0.9], device=s.device))
        agree = ((r.extra["causal"] > 0) == r.extra["topk_mask"]).float().mean()
        return {"score_mean": s.mean(), "score_std": s.std() if s.numel() > 1 else s.new_zeros(()),
                "score_p10": q[0], "score_p50": q[1], "score_p90": q[2], "causal_agreement": agree}

    def step(self, x: torch.Tensor, s: Step, state: dict[str, torch.Tensor]) -> StepRouting:
        scores, causal = self.logits(x, s.rule())  # (B, C) each
        w = torch.sigmoid(scores)
        return StepRouting(s.real(causal > 0), w, w)
