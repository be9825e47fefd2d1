"""The latent stage: the wider blocks the routed positions pass through, and the two ways their output
returns to the byte stream. Each has a full-sequence `forward` and a one-step `step` side by side.

- **LatentStack** (width `d_latent`, the same `Block` as the local ones): the routed positions are
  gathered in position order, projected d_local -> d_latent, run causally among themselves with
  ALiBi distances taken from their byte positions and no window, then RMSNorm (gain initialised to
  `return_init`) and d_latent -> d_local. Decoding keeps their keys/values in a cache keyed by byte
  position, so a step runs only its own routed bytes.
- **Pooled inputs** (`pooled_inputs`, Nawrot et al. 2023, arXiv 2211.09761, section 3 and Table 2:
  averaging a segment's bytes beat taking one byte's state, 1.133 vs 1.144 BPC with whitespace
  boundaries): a routed position's latent input is the mean of the stream over its segment, the
  bytes after the previous routed position up to it (causal). Decoding keeps the running sum and
  count of the segment open at the last committed byte.
- **AddReturn** (the default; MoD, SpaceByte): gate * output is added at the routed positions only.
- **DechunkReturn** (`dechunk: true`, H-Net's return path, section 2.2 "smoothing module" and
  "upsampler"): the chunk outputs, in order, go through an EMA with the boundary probability,
  z_j = P_j y_j + (1 - P_j) z_{j-1}, so a low-confidence boundary is blended with the chunk before it
  (the gradient of P_j is how the language loss teaches a learned boundary); every byte then receives
  the smoothed output of its chunk (the last routed position's, repeated), times a straight-through
  estimator of its confidence c_t (p_t at a boundary, 1 - p_t elsewhere): 1 forward, c_t's gradient
  backward. The stream itself passes through (identity) and joins with a zero-initialised linear map
  of it (H-Net's residual_proj): pico's latent projections are not an identity at init, so H-Net's
  residual-free sum would start the byte stream from noise (experiment 4 measured that sum, and it
  lost on both domains). A rule's positions have probability 1: the EMA passes each chunk unchanged.
  Decoding keeps one vector per sequence: the EMA at the last committed byte.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pico.model.attention import MaskSpec, alibi_slopes, attention_bias, resolve_impl
from pico.model.config import ModelConfig
from pico.model.layers import Block, RMSNorm
from pico.model.routers.base import Routing, Step, StepRouting

PAD_POS = 1 << 39  # byte position of a padding latent slot in decoding: far from every real key


class LatentStack(nn.Module):
    """proj_in -> n_latent blocks -> norm -> proj_out over the routed slots."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.proj_in = nn.Linear(cfg.d_local, cfg.d_latent, bias=False)
        self.blocks = nn.ModuleList(
            Block(cfg.d_latent, cfg.n_latent_heads, cfg.n_latent_kv_heads, cfg.mlp_ratio, cfg.norm_eps)
            for _ in range(cfg.n_latent))
        self.norm = RMSNorm(cfg.d_latent, cfg.norm_eps)
        self.proj_out = nn.Linear(cfg.d_latent, cfg.d_local, bias=False)
        self.register_buffer("latent_slopes", alibi_slopes(cfg.n_latent_heads), persistent=False)

    def init_weights(self) -> None:
        nn.init.constant_(self.norm.weight, self.cfg.return_init)  # the scale the output first returns at

    def mask(self, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | MaskSpec:
        """Mask over slots at byte positions pos (B, K): causal, ALiBi, no window. Only flex pays here (its
        block mask skips the upper triangle); banded has no window to exploit, so CPU keeps the dense mask."""
        if resolve_impl(self.cfg.attn_impl, pos.device) == "flex":
            return MaskSpec("flex", self.latent_slopes, None, pos=pos)
        return attention_bias(pos, pos, self.latent_slopes, None, dtype)

    def inputs(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """What each slot reads (B, K, d_local): the routed byte's state, or with `pooled_inputs` the mean of
        its segment. Slot j of a routing is the j-th routed position, so its segment is the bytes that
        have j routed positions before them; padding slots read an arbitrary finite mean (gate 0)."""
        if not self.cfg.pooled_inputs:
            return torch.gather(x, 1, r.idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        B, T, d = x.shape
        seg = r.mask.long().cumsum(1) - r.mask.long()  # (B, T): routed positions before each byte
        sums = x.new_zeros(B, T + 1, d).scatter_add_(1, seg.unsqueeze(-1).expand(-1, -1, d), x)
        counts = x.new_zeros(B, T + 1).scatter_add_(1, seg, torch.ones_like(x[..., 0]))
        K = r.idx.shape[1]
        return sums[:, :K] / counts[:, :K].clamp(min=1).unsqueeze(-1)

    def forward(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """Latent output (B, K, d_local) of the routed slots of x (B, T, d_local)."""
        z = self.proj_in(self.inputs(x, r))  # (B, K, d_latent)
        bias = self.mask(r.pos, z.dtype)
        for blk in self.blocks:
            z = blk(z, bias)
        return self.proj_out(self.norm(z))

    def init_state(self, batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled inputs: the sum and count of the segment open at the last committed byte."""
        if not self.cfg.pooled_inputs:
            return {}
        return {"sum": like.new_zeros(batch, like.shape[-1]), "count": like.new_zeros(batch)}

    def step_inputs(self, x: torch.Tensor, mask: torch.Tensor, s: Step,
                    state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`inputs` for a decoding step, per new byte (B, C, d_local), and the open segment after each byte.
        Byte c's segment runs along its own past (a chain's earlier bytes, a tree node's ancestors) from
        after its last routed predecessor, and through the committed open segment when it has none."""
        if not self.cfg.pooled_inputs:
            return x, {}
        B, C, _ = x.shape
        anc = torch.ones(C, C, dtype=torch.bool, device=x.device).tril() if s.anc is None else s.anc  # (C, C)
        ar = torch.arange(C, device=x.device)
        before = anc & (ar.unsqueeze(0) < ar.unsqueeze(1))  # strict ancestors
        last = torch.where(before.unsqueeze(0) & mask.unsqueeze(1), ar, -1).amax(-1)  # (B, C): last routed ancestor
        span = anc.unsqueeze(0) & (ar.view(1, 1, C) > last.unsqueeze(-1))  # (B, C, C): the segment's new bytes
        open_ = (last < 0).to(x.dtype)  # the committed open segment joins
        sums = torch.bmm(span.to(x.dtype), x) + open_.unsqueeze(-1) * state["sum"].unsqueeze(1).to(x.dtype)
        counts = span.sum(-1).to(x.dtype) + open_ * state["count"].unsqueeze(1).to(x.dtype)
        closed = mask.unsqueeze(-1)  # a routed byte closes its segment: the next one starts empty
        carry = {"sum": torch.where(closed, 0.0, sums), "count": torch.where(mask, 0.0, counts)}
        return sums / counts.clamp(min=1).unsqueeze(-1), carry

    def step(self, x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, cache, context: int,
             see: torch.Tensor | None = None) -> torch.Tensor:
        """Latent output (B, K, d_local) of a decoding step's slots idx (B, K) of x (B, C, d_local) (the
        `step_inputs` of its bytes) at byte positions pos (B, K; PAD_POS on padding), against the cache
        of committed routed positions (the last `context` bytes' ones). `see` (B, K, K): which of the
        step's slots each slot sees (a tree)."""
        z = self.proj_in(torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])))
        bias = attention_bias(pos, cache.key_pos(pos), self.latent_slopes, context, z.dtype)
        if see is not None:
            bias[..., cache.S + 1:].masked_fill_(~see.unsqueeze(1), float("-inf"))
        for i, blk in enumerate(self.blocks):
            z = blk(z, bias, cache.layer(i))
        return self.proj_out(self.norm(z))


@torch.no_grad()
def rms_pair(added: torch.Tensor, stream: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RMS of what the return path adds (over its `valid` rows, e.g. real slots) and of the byte stream
    it is added to, as one (2,) tensor; no data-dependent shapes (compile-friendly)."""
    sq = added.float().pow(2).mean(-1)
    a = sq.mean() if valid is None else (sq * valid).sum() / valid.sum().clamp(min=1)
    return torch.stack([a, stream.float().pow(2).mean()]).sqrt()


class AddReturn(nn.Module):
    """gate * latent output added at the routed positions only."""

    def init_weights(self) -> None:
        """No parameters."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, r: Routing) -> torch.Tensor:
        delta = y * r.gate.unsqueeze(-1).to(y.dtype)  # (B, K, d_local)
        r.return_rms = rms_pair(delta, x, valid=r.pos < x.shape[1])
        g = r.idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return x.scatter_add(1, g, delta.to(x.dtype))  # under autocast x stays fp32, delta is bf16

    def init_state(self, batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def step(self, x: torch.Tensor, y: torch.Tensor | None, idx: torch.Tensor | None, ok: torch.Tensor | None,
             sr: StepRouting, s: Step, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x after a decoding step's latent output y (B, K, d) of slots idx (B, K) (ok: real slots), or x
        unchanged when nothing routed (y None); no state."""
        if y is None:
            return x, {}
        w = (sr.gate.gather(1, idx) * ok).unsqueeze(-1).to(y.dtype)
        return x.scatter_add(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), y * w), {}


def confidence_ste(c: torch.Tensor) -> torch.Tensor:
    """Exactly 1 in the forward pass, the gradient of c in the backward pass."""
    return 1.0 + (c - c.detach())


def ema_weights(prob: torch.Tensor, see: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, K) weights W[j, i] = P_i * prod_{l in (i, j]} (1 - P_l) of the EMA
    z_j = P_j y_j + (1 - P_j) z_{j-1} over K chunks with probabilities prob (B, K).

    `see` (B, K, K) bool, default lower-triangular, says which chunks are j's past (itself
    included): a draft tree's decoding step passes each chunk's ancestors, so the EMA runs along
    every root-to-node path at once (the past of a chunk's past must be its past too).
    Computed in float64 log space: a product of many (1 - P) underflows float32 and a division
    by it is undefined where P = 1 (the first chunk). Both logs are clamped at 1e-30, so a
    probability of exactly 0 or 1 keeps finite gradients."""
    P = prob.double()
    K = prob.shape[1]
    log_one_minus = torch.log((1 - P).clamp(min=1e-30))
    if see is None:  # a chain: j's past is every chunk up to j
        see = torch.ones(K, K, dtype=torch.bool, device=prob.device).tril()
        log_keep = log_one_minus.cumsum(1)  # (B, K): sum of log(1 - P_l) over j's past
    else:
        log_keep = torch.bmm(see.double(), log_one_minus.unsqueeze(-1)).squeeze(-1)
    log_w = torch.log(P.clamp(min=1e-30)).unsqueeze(1) + log_keep.unsqueeze(2) - log_keep.unsqueeze(1)  # [j, i]
    return torch.where(see, log_w, float("-inf")).exp()


def dechunk(y: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
            prob: torch.Tensor | None) -> torch.Tensor:
    """Per-byte latent output (B, T, d) from the chunk outputs y (B, K, d).

    y holds one output per routed position, in position order: slot j came from position
    idx[:, j] (valid (B, K); padding slots after the real ones). mask (B, T) marks the routed
    positions; prob (B, T) is the boundary probability (None for a rule: 1 at its positions, so
    no smoothing and confidence 1). Byte t gets the smoothed output of the last routed position
    <= t (0 before the first one), times the confidence straight-through estimator."""
    if prob is not None:
        P = torch.where(valid, prob.gather(1, idx), torch.ones_like(prob[:, :1]))  # (B, K)
        y = torch.bmm(ema_weights(P).to(y.dtype), y)  # (B, K, d): z_j
    chunk = mask.long().cumsum(1) - 1  # (B, T): slot of each byte's last routed position, -1 before any
    out = torch.gather(y, 1, chunk.clamp(min=0).unsqueeze(-1).expand(-1, -1, y.shape[-1]))  # (B, T, d)
    out = out * (chunk >= 0).unsqueeze(-1).to(out.dtype)
    if prob is not None:
        conf = torch.where(mask, prob, 1 - prob)
        out = out * confidence_ste(conf).unsqueeze(-1).to(out.dtype)
    return out


class DechunkReturn(nn.Module):
    """Every byte receives its chunk's EMA-smoothed latent output, plus a zero-initialised map of the stream."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.residual = nn.Linear(cfg.d_local, cfg.d_local, bias=False)

    def init_weights(self) -> None:
        nn.init.zeros_(self.residual.weight)  # the stream's map starts at 0: the identity alone

    def join(self, x: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """The stream x, its linear map, and the dechunked output back (B, T, d)."""
        return x + (self.residual(x) + back.to(x.dtype))

    def forward(self, x: torch.Tensor, y: torch.Tensor, r: Routing) -> torch.Tensor:
        back = dechunk(y, r.idx, r.pos < x.shape[1], r.mask, r.prob)  # (B, T, d_local)
        r.return_rms = rms_pair(back, x)
        return self.join(x, back)

    def init_state(self, batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"z": like.new_zeros(batch, like.shape[-1])}  # the EMA at the last committed byte (0 before any chunk)

    def step(self, x: torch.Tensor, y: torch.Tensor | None, idx: torch.Tensor | None, ok: torch.Tensor | None,
             sr: StepRouting, s: Step, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`dechunk` for one step: the EMA goes on from the committed one (slot 0 below) through the step's K
        chunk outputs y (B, K, d), along each byte's own past (a tree node's ancestors); a byte takes the EMA
        at its last routed position, or the committed one before any in this step. The confidence estimator
        is exactly 1 in a forward pass. The state after each byte is the EMA it took."""
        B, C, _ = x.shape
        committed = state["z"].unsqueeze(1)
        if y is None:
            back = committed.expand(B, C, -1).to(x.dtype)
            return self.join(x, back), {"z": back}
        K = y.shape[1]
        z = torch.cat([committed.to(y.dtype), y], dim=1)  # (B, 1 + K, d)
        anc = torch.ones(C, C, dtype=torch.bool, device=x.device).tril() if s.anc is None else s.anc
        past = anc[idx.unsqueeze(-1), idx.unsqueeze(-2)] & ok.unsqueeze(1)  # (B, K, K): slot i in slot j's past
        see = torch.ones(B, 1 + K, 1 + K, dtype=torch.bool, device=x.device)
        see[:, 0, 1:] = False
        see[:, 1:, 1:] = past
        prob = sr.prob if sr.prob is not None else torch.ones(B, C, device=x.device)
        P = torch.cat([torch.ones_like(prob[:, :1]), torch.where(ok, prob.gather(1, idx), 1.0)], dim=1)
        z = torch.bmm(ema_weights(P, see).to(y.dtype), z)
        owns = anc[:, idx].permute(1, 0, 2) & ok.unsqueeze(1)  # (B, C, K): slot j at or before byte c
        z_of = torch.where(owns, torch.arange(1, K + 1, device=x.device), 0).amax(-1)  # the deepest one
        back = z.gather(1, z_of.unsqueeze(-1).expand(-1, -1, z.shape[-1]))  # (B, C, d)
        return self.join(x, back), {"z": back}


def build_return(cfg: ModelConfig) -> nn.Module:
    """The return path of cfg: DechunkReturn with `dechunk`, else AddReturn."""
    return DechunkReturn(cfg) if cfg.dechunk else AddReturn()
