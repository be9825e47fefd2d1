"""`router: spacelike`: SpaceByte's rule (Slagle 2024; the rule itself is model/spacelike.py).

Routes the rule positions (a spacelike byte after a non-spacelike one: about one per word) with a
gate of 1. Its count varies per sequence; it routes at most the first k = ceil(capacity * T) rule
positions (a causal cap: whether t is routed depends on bytes <= t only), padded to k slots in
training so that its cost is exactly what `flops_per_byte` counts; set `capacity` a little above the
corpus's rule rate (English prose: about 0.17-0.2; `rule_dropped_frac` says how many rule positions
the cap dropped). Causal routing caps at ceil(capacity * max_seq_len) and pads slots only to the
batch's largest count; decoding makes the cap a sliding one over the last `context` bytes.
"""

from __future__ import annotations

import torch

from pico.model.config import ModelConfig, n_routed
from pico.model.routers.base import Router, Routing, Step, StepRouting, capped, packed, register
from pico.model.spacelike import spacelike_boundaries


@register
class SpacelikeRouter(Router):
    """SpaceByte's rule positions, the first ceil(capacity * T) of each sequence."""

    name = "spacelike"

    @classmethod
    def describe(cls, cfg: ModelConfig) -> str:
        return f"spacelike (SpaceByte's rule: a spacelike byte after a word; at most {cfg.capacity:g} of the bytes)"

    def forward(self, x: torch.Tensor, ids: torch.Tensor, routing: str) -> Routing:
        T = ids.shape[1]
        rule = spacelike_boundaries(ids)
        cap = n_routed(self.cfg.capacity, T if routing == "topk" else self.cfg.max_seq_len)
        mask = capped(rule, cap)
        idx, pos, _, gate = packed(mask, x, cap if routing == "topk" else None)
        return Routing(idx, pos, gate, mask, extra={"rule": rule})

    def stats(self, r: Routing) -> dict[str, torch.Tensor]:
        rule = r.extra["rule"]
        return {"rule_dropped_frac": 1 - (r.mask & rule).sum() / rule.sum().clamp(min=1)}

    def step(self, x: torch.Tensor, s: Step, state: dict[str, torch.Tensor]) -> StepRouting:
        mask = s.sliding_cap(s.real(s.rule()), n_routed(self.cfg.capacity, s.context))
        return StepRouting(mask, torch.ones(mask.shape, dtype=x.dtype, device=x.device))
