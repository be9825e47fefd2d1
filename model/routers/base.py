"""The router protocol: what every router computes over a whole sequence and one decoding step at a time.

A router decides which byte positions go through the latent stage. It is one class in one file of
this package, registered under its config name (`model.router`), with two faces side by side:

- `forward(x, ids, routing)`: the decisions over a full sequence (B, T) as a `Routing` (slots in
  position order, gates, the routed mask). `routing="topk"` is training's decision (it may look
  ahead: MoD's top-k), `"causal"` inference's (bytes <= t only); a router whose two decisions
  always agree sets `lookahead = False`.
- `step(x, s, state)`: the causal decisions for a chunk of new bytes in a decoding `Step`, from a
  small per-sequence `state` dict (what it must remember of the committed bytes; `init_state`
  makes it). It returns a `StepRouting` whose `carry` holds, per new byte, the state the router
  would have after that byte: the decoder keeps the entry of the last byte it commits.
- `aux_loss(r)` and `stats(r)`: its own loss term and logging statistics, from the tensors it put in
  `r.extra`; `routing_stats` adds the statistics every router shares.
- Class-level facts read without building a network: `options` (the ModelConfig fields only this
  router reads; `validate_config` refuses them on any other router), `validate(cfg)`, its FLOPs
  (`macs`, multiply-adds per byte) and parameters (`params`), `max_rate` (the most positions a
  sequence can route when that exceeds `capacity`), `describe` (a line for model cards).

`router: none` is the absence of a router (no latent stage), not a class. Adding a router is one
new file in this folder that defines a `Router` subclass decorated with `@register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn as nn

from pico.model.config import NO_ROUTER, ModelConfig
from pico.model.spacelike import is_spacelike, spacelike_boundaries

ROUTERS: dict[str, type[Router]] = {}


def register(cls: type[Router]) -> type[Router]:
    """Class decorator: make `cls` the router of `model.router: cls.name`."""
    ROUTERS[cls.name] = cls
    return cls


def router_class(cfg: ModelConfig) -> type[Router] | None:
    """The Router class of cfg.router (None for router: none); a ValueError names the valid ones."""
    if cfg.router == NO_ROUTER:
        return None
    if cfg.router not in ROUTERS:
        raise ValueError(f"model config: model.router={cfg.router!r} is not a router; use one of "
                         f"{', '.join([*sorted(ROUTERS), NO_ROUTER])}")
    return ROUTERS[cfg.router]


def validate_config(cfg: ModelConfig) -> None:
    """Refuse an unknown router, and a router option set (away from its default) on a router that does not
    read it, naming the key: such a combination would silently do nothing."""
    cls = router_class(cfg)
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    for other in ROUTERS.values():
        for key in other.options:
            if (cls is None or key not in cls.options) and getattr(cfg, key) != defaults[key]:
                takes = [n for n, c in sorted(ROUTERS.items()) if key in c.options]
                raise ValueError(f"model config: model.{key}={getattr(cfg, key)!r} does not apply to "
                                 f"model.router={cfg.router}; only {', '.join(takes)} reads it: remove it or "
                                 f"set model.router={takes[0]}")
    if cls is not None:
        cls.validate(cfg)


def build_router(cfg: ModelConfig) -> Router | None:
    validate_config(cfg)
    cls = router_class(cfg)
    return None if cls is None else cls(cfg)


# ----------------------------------------------------------------------------- what a router returns


@dataclass
class Routing:
    """A full-sequence decision: which positions go through the latent stage, in slots ordered by position."""

    idx: torch.Tensor    # (B, K) long: position each slot gathers from and returns to
    pos: torch.Tensor    # (B, K) long: ALiBi position of each slot (T for padding slots)
    gate: torch.Tensor   # (B, K) weight on each slot's latent output (0 for padding slots)
    mask: torch.Tensor   # (B, T) bool: routed positions
    prob: torch.Tensor | None = None  # (B, T) boundary probability for dechunking (None: a hard rule, 1)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the router's own tensors (aux loss, stats)
    return_rms: torch.Tensor | None = None  # (2,) detached: RMS of what the return path adds, of the stream


@dataclass
class StepRouting:
    """A decoding step's decisions for its C new bytes."""

    mask: torch.Tensor                  # (B, C) bool: routed bytes
    gate: torch.Tensor                  # (B, C) weight on each byte's latent output where routed
    prob: torch.Tensor | None = None    # (B, C) boundary probability (None: 1)
    carry: dict[str, torch.Tensor] = field(default_factory=dict)  # state after each byte, (B, C, ...)


@dataclass
class Step:
    """What a decoding step hands the router: C new bytes after each sequence's committed ones.

    A chunk is a chain (byte c follows byte c - 1) or a draft tree (byte c follows `parent[c]`, and
    sees only its ancestors `anc`); parent -1 means the last committed byte."""

    ids: torch.Tensor                # (B, C)
    pos: torch.Tensor                # (B, C) absolute positions
    parent: torch.Tensor             # (C,) long
    last_id: torch.Tensor            # (B,) the last committed byte
    routed_pos: torch.Tensor | None  # (B, S) positions of the committed routed bytes still in context (any order)
    context: int                     # bytes any position sees, itself included
    anc: torch.Tensor | None = None  # (C, C) bool, tree only: anc[i, j] = j is i or an ancestor of i
    valid: torch.Tensor | None = None  # (B, C) bool: False on padding (prefill of unequal prompts)

    def before(self, values: torch.Tensor, committed: torch.Tensor) -> torch.Tensor:
        """Each new byte's predecessor's entry of values (B, C, ...), `committed` (B, ...) for the first."""
        first = (self.parent < 0).view(1, -1, *[1] * (values.dim() - 2))
        return torch.where(first, committed.unsqueeze(1).to(values.dtype), values[:, self.parent.clamp(min=0)])

    def rule(self) -> torch.Tensor:
        """SpaceByte's rule (spacelike.py) on each new byte and its predecessor: (B, C) bool."""
        return is_spacelike(self.ids) & ~is_spacelike(self.before(self.ids, self.last_id))

    def real(self, mask: torch.Tensor) -> torch.Tensor:
        """mask without the padding bytes."""
        return mask if self.valid is None else mask & self.valid

    def sliding_cap(self, cand: torch.Tensor, cap: int) -> torch.Tensor:
        """Candidates cand (B, C) routed: those with fewer than `cap` routed positions in the
        context - 1 bytes before them (committed ones, and earlier ones of this step on the byte's own
        past). Within the first `context` bytes this is `capped`, the full forward's prefix cap."""
        if not bool(cand.any()):
            return cand
        mask = torch.zeros_like(cand)
        for c in cand.any(0).nonzero().flatten().tolist():  # sequential: each decision counts the earlier ones
            lo, p = self.pos[:, c:c + 1] - self.context, self.pos[:, c:c + 1]
            before = mask[:, :c] & (self.pos[:, :c] > lo)
            if self.anc is not None:  # a tree node counts its ancestors only
                before = before & self.anc[c, :c]
            n = ((self.routed_pos > lo) & (self.routed_pos < p)).sum(1) + before.sum(1)
            mask[:, c] = cand[:, c] & (n < cap)
        return mask


# ----------------------------------------------------------------------------- the protocol


class Router(nn.Module):
    """Base of every router (see the module docstring); subclasses set `name` and register."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # ModelConfig fields only this router reads
    lookahead: ClassVar[bool] = False        # True: training's top-k decisions read the future

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: ModelConfig) -> None:
        """Raise ValueError naming the key when cfg makes no sense for this router."""

    @classmethod
    def macs(cls, cfg: ModelConfig) -> float:
        """Multiply-adds per byte of the routing decision itself (flops.py doubles them)."""
        return 0.0

    @classmethod
    def params(cls, cfg: ModelConfig) -> int:
        """Trainable parameters of the router."""
        return 0

    @classmethod
    def max_rate(cls, cfg: ModelConfig) -> float | None:
        """The largest fraction of positions a sequence can route, when that exceeds `capacity` (None: capacity)."""
        return None

    @classmethod
    def describe(cls, cfg: ModelConfig) -> str:
        """One line for model cards."""
        return cls.name

    def init_weights(self) -> None:
        """Runs after Pico's default initialisation (normal(0, init_std) for every matrix)."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor, routing: str) -> Routing:
        """Route the residual x (B, T, d_local) of byte ids (B, T) with "topk" or "causal" decisions."""
        raise NotImplementedError

    def init_state(self, batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoding state of `batch` empty sequences (tensors with the batch first)."""
        return {}

    def step(self, x: torch.Tensor, s: Step, state: dict[str, torch.Tensor]) -> StepRouting:
        """Causal decisions for the new bytes of a decoding step, x (B, C, d_local) their residual."""
        raise NotImplementedError

    def aux_loss(self, r: Routing) -> torch.Tensor:
        """The router's own loss term (weighted by model.aux_loss_weight); 0 by default."""
        return r.gate.new_zeros((), dtype=torch.float32)

    def stats(self, r: Routing) -> dict[str, torch.Tensor]:
        """Router-specific logging statistics (0-dim tensors)."""
        return {}


# ----------------------------------------------------------------------------- shared helpers


def pack_slots(mask: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first K routed positions of each row of mask (B, T), in order, padded after the real ones.

    Returns idx (B, K) for gather/scatter, pos (B, K) with T on padding slots, valid (B, K).
    """
    T = mask.shape[1]
    ar = torch.arange(T, device=mask.device)
    key = torch.where(mask, ar, ar + T)  # routed positions sort first, in position order
    first = key.sort(dim=1).values[:, :K]
    valid = first < T
    idx = torch.where(valid, first, first - T)
    return idx, torch.where(valid, idx, torch.full_like(idx, T)), valid


def capped(cand: torch.Tensor, cap: int) -> torch.Tensor:
    """The first `cap` candidates of each row of (B, T): a prefix rule, so still causal."""
    return cand & (cand.cumsum(1) <= cap)


def packed(mask: torch.Tensor, like: torch.Tensor, K: int | None = None) -> tuple[torch.Tensor, ...]:
    """pack_slots for a variable-count decision: K slots (default: the batch's largest count, at least 1,
    at most T), and the 0/1 gate (B, K) of real slots in like's dtype."""
    T = mask.shape[1]
    K = min(max(int(mask.sum(1).max()), 1), T) if K is None else min(K, T)
    idx, pos, valid = pack_slots(mask, K)
    return idx, pos, valid, valid.to(like.dtype)


def chunk_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Lengths in bytes (1-D, every chunk of every row) of the chunks that routed positions mask
    (B, T) start: from a routed position up to the next one or the end of the row. Bytes before
    a row's first routed position belong to no chunk. For the chunk-length statistics."""
    B, T = mask.shape
    chunk = mask.long().cumsum(1) - 1  # (B, T)
    row = torch.arange(B, device=mask.device).unsqueeze(1) * (T + 1)
    ids = (row + chunk)[chunk >= 0]
    counts = torch.bincount(ids, minlength=B * (T + 1))
    return counts[counts > 0]


@torch.no_grad()
def routing_stats(router: Router, r: Routing, ids: torch.Tensor, aux: torch.Tensor) -> dict[str, float]:
    """Routing statistics for logging, every router's and this router's own, in one device-to-host copy."""
    mask, rule = r.mask, spacelike_boundaries(ids)
    frac = mask.float().mean(1)
    after_rule = torch.zeros_like(rule)
    after_rule[:, 1:] = rule[:, :-1]  # the byte after a rule position: a word's first byte
    both = (mask & rule).sum().float()
    out = {"routed_frac_mean": frac.mean(), "routed_frac_min": frac.min(), "routed_frac_max": frac.max(),
           "aux_loss": aux.float(), "spacelike_share_of_routed": both / mask.sum().clamp(min=1),
           "routed_share_of_spacelike": both / rule.sum().clamp(min=1), "rule_frac": rule.float().mean(),
           "after_spacelike_share_of_routed": (mask & after_rule).sum() / mask.sum().clamp(min=1)}
    if not router.lookahead:  # the same decision in both modes
        out["causal_agreement"] = torch.ones((), device=mask.device)
    out.update(router.stats(r))
    if r.return_rms is not None:  # the scale the latent output returns at, relative to the stream (H-Net norms both)
        out["return_rms_ratio"] = r.return_rms[0] / r.return_rms[1].clamp(min=1e-12)
    return dict(zip(out, torch.stack([v.float().to(mask.device) for v in out.values()]).tolist()))
