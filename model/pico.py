"""Pico: a byte-level language model that learns where to spend compute.

The network, top to bottom:

    bytes (B, T) -> embedding -> n_in local blocks -> router -> n_latent latent blocks on the
    routed positions only -> n_out local blocks -> final norm -> n_predict heads (bytes t+1..t+n)

Design choices and their sources:

- **Local blocks** (every byte, width `d_local`): pre-RMSNorm; causal sliding-window attention
  (a byte sees itself and `window - 1` bytes before it) with grouped-query attention
  (`n_heads` query heads share `n_kv_heads` key/value heads; Ainslie et al. 2023); ALiBi biases
  and no position embeddings (Press et al. 2022, "Train Short, Test Long"), so a model can run on
  any absolute position; SwiGLU MLP (Shazeer 2020); no biases anywhere but the router's scalar.
  Attention runs through `attention.attend` (`model.attn_impl`): dense is
  `F.scaled_dot_product_attention` under an additive float mask that holds both the ALiBi bias and
  the window, built from absolute positions (`attention_bias`) and cached per (T, device, dtype);
  banded (CPU) and flex (CUDA) compute the same numbers at a cost of O(T * window), from a
  `MaskSpec` instead of a mask (see attention.py). For an inference cache, `Block` and
  `Attention` take an optional `cache` whose `update(k, v)` returns the past keys/values joined
  to the new ones; the caller builds the dense bias from the absolute positions of the queries
  and the cached keys (`attention_bias(pos_q, pos_k, slopes, window)`).
- **Router** (Mixture-of-Depths, Raposo et al. 2024, expert choice): a scalar score per position,
  read from the RMS-normalised residual after the `n_in` local blocks. In training
  (`routing="topk"`) the top k = ceil(capacity * T) positions of each sequence are gathered in
  position order, run through the latent blocks, projected back, multiplied by the router weight
  *of the selected positions* (gathered with the same indices, not the first k weights) and added
  to the residual at those positions. `router_gate: sigmoid` multiplies by sigmoid(score);
  `straight_through` multiplies by 1 in the forward pass and passes sigmoid's gradient.
- **Causal routing** (`routing="causal"`, inference): top-k looks at the future, so the router
  is also trained with an auxiliary BCE loss whose logit is the score and whose target is top-k
  membership (MoD section 3.5, the "auxiliary loss" option); at inference a position is routed
  when its own score is > 0. `router_aux: predictor` takes MoD's other option instead: a small
  MLP on the stop-gradient router input learns top-k membership and is thresholded at 0, so the
  aux loss never pushes the scores into sigmoid's flat tails (where the gate stops teaching the
  router) and never locks in the set the router happened to pick first.
  `stats["causal_agreement"]` measures how often causal and top-k decisions agree.
- **Why the levers.** A router that starts from random weights scores positions mostly by the
  current byte's identity, and expert choice only ever teaches it about the positions it already
  routes: in short CPU runs it locked onto vowels or onto consonants and never found word
  boundaries (as the published implementation did; benchmarks/results/model_router_probe.md). Levers kept as config fields: the gate
  (`router_gate`), `capacity`, `aux_loss_weight`, `router_aux`, `mtp_weight`, and
  `router_prior`, a learned scalar added to the score at SpaceByte's rule positions, so that
  the router can start from SpaceByte's choice and learn where to deviate from it (the rule is
  causal, so causal routing still works).
- **Latent blocks** (width `d_latent`, the same block type): causal among the routed positions,
  with ALiBi distances taken from their original byte positions and no window (a sequence
  routes at most capacity * max_seq_len positions). Projections `d_local -> d_latent` in and
  RMSNorm + `d_latent -> d_local` out.
- **Baselines, same code** (`router`): `learned` is the above. `spacelike` routes SpaceByte's
  rule positions (Slagle 2024; see `spacelike.py`) with the same latent blocks and a gate of 1.
  Its count varies per sequence: it routes at most the first k = ceil(capacity * T) rule
  positions (a causal cap: whether t is routed depends on bytes <= t only), padded to k slots in
  training so that its cost is exactly what `flops_per_byte` counts; set `capacity` a little above
  the corpus's rule rate (English prose: about 0.17-0.2; `stats["rule_dropped_frac"]` says how
  many rule positions the cap dropped). In causal mode the cap is ceil(capacity * max_seq_len)
  and the slots are padded only to the batch's largest count. `none` is a plain byte-level
  Transformer: the `n_in + n_out` local blocks and nothing else (give it a larger `window`).
- **Learned chunks** (`router: chunk`, H-Net, Hwang et al. 2025; see `chunk.py`): a boundary
  where the cosine between W_q x_t and W_k x_{t-1} says the residual changed (p_t >= 0.5), a
  ratio loss holding the boundary rate near `capacity`, at most `chunk_slots` boundaries per
  sequence (overflow counted in the stats). Causal by construction: both routing modes decide
  the same way.
- **Dechunking** (`dechunk: true`, H-Net's return path; chunk, spacelike and learned): instead
  of adding the latent output at the routed positions only, every byte receives its chunk's
  output (EMA-smoothed with the boundary probability, times a confidence straight-through
  estimator), and a zero-initialised linear residual of the stream joins it.
- **Padded slots** (causal routing, spacelike, chunk) sit after every real slot with position T, so
  that causal masking keeps real positions from seeing them, and carry a gate of 0.
- **Multi-token prediction** (Gloeckle et al. 2024, "Better & Faster Large Language Models via
  Multi-token Prediction"): head 1 is final norm + unembedding; head h >= 2 first adds its own
  small SwiGLU residual MLP (`mtp_mlp_ratio`) to the trunk output, then shares the final norm
  and unembedding, so each draft head has capacity of its own for self-speculative decoding.
  Without targets only head 1 runs; with targets the heads run one after another into their
  losses (autograd still keeps each head's softmax for the backward pass: (B, T, 259) floats
  per head, small next to the trunk at byte vocabulary). Loss = CE_1 + mtp_weight * mean(CE_2..CE_n) + aux_loss_weight * aux: the
  mean keeps the loss scale independent of n_predict.
- **Initialisation**: normal(0, init_std) for every matrix, residual output projections scaled
  by 1/sqrt(2 * blocks) (GPT-2), norms at 1, router bias at 0.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pico.model.attention import MaskSpec, alibi_slopes, attend, attention_bias, resolve_impl
from pico.model.chunk import ChunkScorer, capped, chunk_lengths, confidence_ste, dechunk, ratio_loss
from pico.model.config import PAD, VOCAB_SIZE, ModelConfig, chunk_slots, hidden_width, n_routed, predictor_width
from pico.model.spacelike import spacelike_boundaries

IGNORE = -100  # target id that contributes no loss (cross_entropy's ignore_index)
BIAS_CACHE_SIZE = 8  # attention masks kept per model (see Pico.local_bias)


def make_targets(seq: torch.Tensor, n_predict: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Split packed bytes (B, T + n_predict) into inputs (B, T) and targets (B, T, n_predict).

    targets[..., h-1] = seq[:, h:h+T] (head h predicts byte t+h). PAD targets become -100 so that
    padding never trains any head. Pass the model's `n_predict` (or use `Pico.make_targets`);
    the forward pass rejects targets whose last dimension does not match the model.
    """
    T = seq.shape[1] - n_predict
    if T < 1:
        raise ValueError(f"make_targets: sequence of {seq.shape[1]} ids is too short for n_predict={n_predict}")
    targets = torch.stack([seq[:, h:h + T] for h in range(1, n_predict + 1)], dim=-1)
    return seq[:, :T], targets.masked_fill(targets == PAD, IGNORE)


# ----------------------------------------------------------------------------- attention


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Zhang & Sennrich 2019)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)  # same dtype: the fused kernel


class Attention(nn.Module):
    """Grouped-query attention; position information comes only from the ALiBi bias (a mask or a MaskSpec)."""

    def __init__(self, d: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d // n_heads
        self.qkv_proj = nn.Linear(d, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, hd) and keys, values (B, Hkv, T, hd) of x (B, T, d)."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2).split(
            [self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | MaskSpec) -> torch.Tensor:
        """Attention output (B, Tq, d) for queries against (possibly cached) keys and values."""
        return self.out_proj(attend(q, k, v, bias))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | MaskSpec, cache=None) -> torch.Tensor:
        """Attention of x (B, T, d); `cache.update(k, v)` may prepend past keys/values (inference)."""
        q, k, v = self.qkv(x)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.attend(q, k, v, bias)


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then + mlp(norm(x)). Local and latent alike."""

    def __init__(self, d: int, n_heads: int, n_kv_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(d, n_heads, n_kv_heads)
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = SwiGLU(d, hidden_width(d, mlp_ratio))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | MaskSpec, cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), bias, cache)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------- router


@dataclass
class Routing:
    """Which positions go through the latent blocks, in slots ordered by position."""

    idx: torch.Tensor    # (B, K) long: position each slot gathers from and adds back to
    pos: torch.Tensor    # (B, K) long: ALiBi position of each slot (T for padding slots)
    gate: torch.Tensor   # (B, K) weight on each slot's latent output (0 for padding slots)
    mask: torch.Tensor   # (B, T) bool: routed positions
    scores: torch.Tensor | None = None     # (B, T) router logits (learned router)
    topk_mask: torch.Tensor | None = None  # (B, T) bool: training top-k membership (learned router)
    rule: torch.Tensor | None = None       # (B, T) bool: SpaceByte rule positions, uncapped
    causal_logits: torch.Tensor | None = None  # (B, T) what causal routing thresholds at 0 (learned router)
    prob: torch.Tensor | None = None        # (B, T) boundary probability (chunk; learned with dechunk)
    boundaries: torch.Tensor | None = None  # (B, T) bool: chunk boundaries before the cap
    return_rms: torch.Tensor | None = None  # (2,) detached: RMS of what the latent path adds (bytes it reaches), of the stream


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


class Router(nn.Module):
    """Mixture-of-Depths expert-choice router: one score per position from the normalised residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.router == "chunk":
            self.chunk = ChunkScorer(cfg.d_local)
            return
        if cfg.router != "learned":  # the spacelike rule has no parameters (none would sit idle under DDP)
            return
        self.norm = RMSNorm(cfg.d_local, cfg.norm_eps)
        self.score = nn.Linear(cfg.d_local, 1, bias=True)
        if cfg.router_prior != 0.0:  # learned weight of SpaceByte's rule inside the score
            # shape (1,), not 0-dim: DeepSpeed flattens parameters and cannot view a 0-dim tensor
            self.rule_weight = nn.Parameter(torch.tensor([float(cfg.router_prior)]))
        if cfg.router_calibrate:  # running top-k cut-off for causal routing (see ModelConfig.router_calibrate)
            self.register_buffer("cutoff", torch.zeros(()))
            self.register_buffer("cutoff_seen", torch.zeros(()))
        if cfg.router_aux == "predictor":  # MoD's causal predictor: sees the router input, never trains it
            self.predictor = nn.Sequential(nn.Linear(cfg.d_local, predictor_width(cfg.d_local), bias=False),
                                           nn.SiLU(), nn.Linear(predictor_width(cfg.d_local), 1, bias=True))

    def weight(self, s: torch.Tensor) -> torch.Tensor:
        """Gate on the latent output: sigmoid(s), or 1 forward with sigmoid's gradient."""
        w = torch.sigmoid(s)
        return w - w.detach() + 1.0 if self.cfg.router_gate == "straight_through" else w

    def logits(self, x: torch.Tensor, rule: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, T) and causal logits (B, T; routed where > 0) of the learned router.

        x is the residual after the n_in blocks, rule the SpaceByte rule mask of the same bytes
        (used by `router_prior`). Incremental decoding calls this on new positions only.
        """
        u = self.norm(x)
        scores = self.score(u).squeeze(-1)  # (B, T)
        if self.cfg.router_prior != 0.0:
            scores = scores + self.rule_weight * rule
        if self.cfg.router_aux == "predictor":
            causal = self.predictor(u.detach()).squeeze(-1)
        elif self.cfg.router_calibrate:
            causal = scores - self.cutoff
        else:
            causal = scores
        return scores, causal

    @torch.no_grad()
    def _track_cutoff(self, scores: torch.Tensor, k: int) -> None:
        """EMA (0.9) of the mean k-th largest score per sequence; the first batch sets it directly."""
        kth = scores.detach().float().topk(k, dim=1).values[:, -1].mean()
        momentum = 0.9 if self.cutoff_seen > 0 else 0.0
        self.cutoff.mul_(momentum).add_((1 - momentum) * kth.to(self.cutoff.dtype))
        self.cutoff_seen.add_(1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, routing: str) -> Routing:
        """Route the residual x (B, T, d_local) of byte ids (B, T) with "topk" or "causal" decisions."""
        cfg, (B, T) = self.cfg, ids.shape
        rule = spacelike_boundaries(ids)
        if cfg.router == "spacelike":
            cap = n_routed(cfg.capacity, T if routing == "topk" else cfg.max_seq_len)
            mask = rule & (rule.cumsum(1) <= cap)  # the first `cap` rule positions: causal
            K = cap if routing == "topk" else max(int(mask.sum(1).max()), 1)
            idx, pos, valid = pack_slots(mask, min(K, T))
            return Routing(idx, pos, valid.to(x.dtype), mask, rule=rule)
        if cfg.router == "chunk":
            return self.route_chunks(x, rule)
        scores, causal = self.logits(x, rule)
        k = n_routed(cfg.capacity, T)
        top = scores.topk(k, dim=1).indices.sort(dim=1).values  # (B, k), in position order
        if self.training and routing == "topk" and cfg.router_calibrate and cfg.router_aux == "score":
            self._track_cutoff(scores, k)
        topk_mask = torch.zeros_like(rule).scatter_(1, top, True)
        if routing == "topk":
            idx, pos, valid, mask = top, top, None, topk_mask
        else:
            mask = causal > 0
            idx, pos, valid = pack_slots(mask, max(int(mask.sum(1).max()), 1))
        gate = self.weight(scores.gather(1, idx))  # weights of the selected positions
        if valid is not None:
            gate = gate * valid
        prob = torch.sigmoid(scores) if cfg.dechunk else None
        return Routing(idx, pos, gate, mask, scores, topk_mask, rule, causal, prob)

    def route_chunks(self, x: torch.Tensor, rule: torch.Tensor) -> Routing:
        """Chunk boundaries (p_t >= 0.5, the first `chunk_slots` of each sequence), the same in both modes."""
        T = x.shape[1]
        p = self.chunk(x)  # (B, T); p[:, 0] = 1
        boundaries = p >= 0.5
        mask = capped(boundaries, chunk_slots(self.cfg))
        idx, pos, valid = pack_slots(mask, min(max(int(mask.sum(1).max()), 1), T))
        w = p.gather(1, idx)
        gate = (confidence_ste(w) if self.cfg.router_gate == "straight_through" else w) * valid
        return Routing(idx, pos, gate.to(x.dtype), mask, rule=rule, prob=p, boundaries=boundaries)


# ----------------------------------------------------------------------------- model


@dataclass
class ModelOutput:
    """What one forward pass returns (see the module docstring for the loss weighting)."""

    logits: torch.Tensor | None          # (B, T, VOCAB_SIZE) next-byte logits
    loss: torch.Tensor | None = None     # scalar training loss
    head_losses: torch.Tensor | None = None  # (n_predict,) mean CE in nats per head, detached
    aux_loss: torch.Tensor | None = None     # scalar router BCE (0 without a learned router)
    routed: torch.Tensor | None = None       # (B, T) bool, None for router none
    stats: dict[str, float] = field(default_factory=dict)


class MTPHead(nn.Module):
    """Residual SwiGLU of one draft head h >= 2: x + mlp(norm(x)), before the shared unembedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_local, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_local, hidden_width(cfg.d_local, cfg.mtp_mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Pico(nn.Module):
    """The Pico network for one ModelConfig; `forward(idx, targets, routing)` returns a ModelOutput."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        local = lambda: Block(cfg.d_local, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_ratio, cfg.norm_eps)  # noqa: E731
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.d_local)
        self.blocks_in = nn.ModuleList(local() for _ in range(cfg.n_in))
        if cfg.router != "none":
            self.router = Router(cfg)
            self.latent_in = nn.Linear(cfg.d_local, cfg.d_latent, bias=False)
            self.latent_blocks = nn.ModuleList(
                Block(cfg.d_latent, cfg.n_latent_heads, cfg.n_latent_kv_heads, cfg.mlp_ratio, cfg.norm_eps)
                for _ in range(cfg.n_latent))
            self.latent_norm = RMSNorm(cfg.d_latent, cfg.norm_eps)
            self.latent_out = nn.Linear(cfg.d_latent, cfg.d_local, bias=False)
            self.register_buffer("latent_slopes", alibi_slopes(cfg.n_latent_heads), persistent=False)
            if cfg.dechunk:  # H-Net's linear residual from the stream, beside the identity or alone (dechunk_skip)
                self.dechunk_residual = nn.Linear(cfg.d_local, cfg.d_local, bias=False)
        self.blocks_out = nn.ModuleList(local() for _ in range(cfg.n_out))
        self.norm = RMSNorm(cfg.d_local, cfg.norm_eps)
        self.mtp_heads = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.n_predict - 1))
        self.unembed = nn.Linear(cfg.d_local, VOCAB_SIZE, bias=False)
        self.register_buffer("local_slopes", alibi_slopes(cfg.n_heads), persistent=False)
        self._bias_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # LRU, BIAS_CACHE_SIZE entries
        self._init_weights()

    def _init_weights(self) -> None:
        n_blocks = self.cfg.n_in + self.cfg.n_out + (self.cfg.n_latent if self.cfg.router != "none" else 0)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                resid = name.endswith(("out_proj.weight", "down.weight", "latent_out.weight"))
                nn.init.normal_(p, 0.0, self.cfg.init_std / (math.sqrt(2 * n_blocks) if resid else 1.0))
            elif name.endswith("score.bias"):
                nn.init.zeros_(p)
        if self.cfg.router == "chunk":
            self.router.chunk.reset_parameters()  # W_q = W_k = I
        if self.cfg.dechunk:
            nn.init.zeros_(self.dechunk_residual.weight)
        if self.cfg.router != "none":
            nn.init.constant_(self.latent_norm.weight, self.cfg.return_init)

    def local_bias(self, T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(n_heads, T, T) window + ALiBi mask of the local blocks, cached per (T, device, dtype).

        The cache keeps the BIAS_CACHE_SIZE most recently used masks: decoding and evaluation
        meet many lengths T, and each mask is n_heads * T * T values."""
        key = (T, str(device), dtype)
        if key in self._bias_cache:
            self._bias_cache.move_to_end(key)
        else:
            pos = torch.arange(T, device=device)
            self._bias_cache[key] = attention_bias(pos, pos, self.local_slopes, self.cfg.window, dtype)
            while len(self._bias_cache) > BIAS_CACHE_SIZE:
                self._bias_cache.popitem(last=False)
        return self._bias_cache[key]

    def local_mask(self, T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | MaskSpec:
        """What the local blocks attend under: the dense mask, or a MaskSpec for banded / flex (`model.attn_impl`).

        A sequence no longer than the window is plain causal attention: banded would run it as
        one dense block anyway, so it gets the cached dense mask."""
        impl = resolve_impl(self.cfg.attn_impl, device)
        if impl == "dense" or (impl == "banded" and T <= self.cfg.window):
            return self.local_bias(T, device, dtype)
        return MaskSpec(impl, self.local_slopes, self.cfg.window)

    def latent_mask(self, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | MaskSpec:
        """Mask of the latent blocks over slots at byte positions pos (B, K): causal, ALiBi, no window.

        Only flex pays here (its block mask skips the upper triangle); banded has no window to
        exploit, so CPU keeps the dense (B, H, K, K) mask."""
        if resolve_impl(self.cfg.attn_impl, pos.device) == "flex":
            return MaskSpec("flex", self.latent_slopes, None, pos=pos)
        return attention_bias(pos, pos, self.latent_slopes, None, dtype)

    def latent(self, x: torch.Tensor, r: Routing) -> torch.Tensor:
        """Gather the routed positions, run the latent blocks, return their output to the stream:
        gate * output added at the routed positions, or with `dechunk` to every byte (chunk.py)."""
        g = r.idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, K, d_local)
        z = self.latent_in(torch.gather(x, 1, g))  # (B, K, d_latent)
        bias = self.latent_mask(r.pos, z.dtype)  # (B, H, K, K) mask or a MaskSpec
        for blk in self.latent_blocks:
            z = blk(z, bias)
        y = self.latent_out(self.latent_norm(z))  # (B, K, d_local)
        if self.cfg.dechunk:  # the EMA and the confidence estimator take the gate's place
            valid = r.pos < x.shape[1]
            back = dechunk(y, r.idx, valid, r.mask, r.prob)  # (B, T, d_local)
            r.return_rms = _rms_pair(back, x)
            out = self.dechunk_residual(x) + back.to(x.dtype)
            return x + out if self.cfg.dechunk_skip == "identity" else out
        delta = y * r.gate.unsqueeze(-1).to(z.dtype)  # (B, K, d_local)
        r.return_rms = _rms_pair(delta, x, valid=r.pos < x.shape[1])
        return x.scatter_add(1, g, delta.to(x.dtype))  # under autocast x stays fp32, delta is bf16

    def trunk(self, idx: torch.Tensor, routing: str = "topk") -> tuple[torch.Tensor, Routing | None]:
        """Residual stream (B, T, d_local) before the final norm, and the routing used."""
        if routing not in ("topk", "causal"):
            raise ValueError(f"routing={routing!r}: use 'topk' (training) or 'causal' (inference)")
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} bytes exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, d_local)
        bias = self.local_mask(T, x.device, x.dtype)
        for blk in self.blocks_in:
            x = blk(x, bias)
        r = None
        if self.cfg.router != "none":
            r = self.router(x, idx, routing)
            x = self.latent(x, r)
        for blk in self.blocks_out:
            x = blk(x, bias)
        return x, r

    def head_logits(self, x: torch.Tensor, h: int) -> torch.Tensor:
        """Logits (B, T, VOCAB_SIZE) of head h (1 = next byte) from the trunk output x."""
        if h > 1:
            x = self.mtp_heads[h - 2](x)
        return self.unembed(self.norm(x))

    def make_targets(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`make_targets` with this model's n_predict."""
        return make_targets(seq, self.cfg.n_predict)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, routing: str = "topk",
                return_logits: bool = True, with_stats: bool = True) -> ModelOutput:
        """Logits, and with targets (B, T, n_predict) the weighted loss, per-head losses and router stats.

        `with_stats=False` skips the router statistics (their one device-to-host copy) on steps
        that do not log.
        """
        x, r = self.trunk(idx, routing)
        aux = self.aux_loss(r, x)
        stats = router_stats(r, aux) if r is not None and with_stats else {}
        if stats:  # the latent cost of the positions this batch actually routed (flops.py counts at capacity)
            stats["flops_per_byte_at_rate"] = self.flops_per_byte(True, rate=stats["routed_frac_mean"])
        routed = r.mask if r is not None else None
        if targets is None:
            return ModelOutput(self.head_logits(x, 1), aux_loss=aux, routed=routed, stats=stats)
        n = self.cfg.n_predict
        if targets.shape != (*idx.shape, n):
            raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {(*idx.shape, n)} "
                             f"(make_targets(seq, n_predict={n}) builds them)")
        logits, losses = None, []
        for h in range(1, n + 1):  # one head at a time: a single logit tensor is live
            lg = self.head_logits(x, h)
            losses.append(F.cross_entropy(lg.flatten(0, 1).float(), targets[..., h - 1].flatten(),
                                          ignore_index=IGNORE))
            if h == 1 and return_logits:
                logits = lg
        loss = losses[0] + self.cfg.aux_loss_weight * aux
        if n > 1:
            loss = loss + self.cfg.mtp_weight * torch.stack(losses[1:]).mean()
        return ModelOutput(logits, loss, torch.stack(losses).detach(), aux.detach(), routed, stats)

    def aux_loss(self, r: Routing | None, x: torch.Tensor) -> torch.Tensor:
        """BCE teaching causal logit > 0 to mean "in the top k" (learned router), the ratio loss
        toward `capacity` (chunk router), else 0."""
        if r is not None and r.boundaries is not None:
            return ratio_loss(r.boundaries, r.prob, self.cfg.capacity)
        if r is None or r.scores is None:
            return x.new_zeros(())
        return F.binary_cross_entropy_with_logits(r.causal_logits.float(), r.topk_mask.float())

    def flops_per_byte(self, training: bool = True, rate: float | None = None) -> float:
        """FLOPs per byte of this model's config (see `pico.model.flops`), at a routed fraction
        `rate` of the positions (default: what the config routes, `capacity`)."""
        from pico.model.flops import flops_per_byte

        return flops_per_byte(self.cfg, training, rate=rate)


@torch.no_grad()
def _rms_pair(added: torch.Tensor, stream: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RMS of what the latent path adds (over its `valid` rows, e.g. real slots) and of the byte stream
    it is added to, as one (2,) tensor; no data-dependent shapes (compile-friendly)."""
    sq = added.float().pow(2).mean(-1)
    a = sq.mean() if valid is None else (sq * valid).sum() / valid.sum().clamp(min=1)
    return torch.stack([a, stream.float().pow(2).mean()]).sqrt()


@torch.no_grad()
def router_stats(r: Routing, aux: torch.Tensor) -> dict[str, float]:
    """Routing statistics for logging, gathered in one device-to-host copy."""
    mask, rule = r.mask, r.rule
    frac = mask.float().mean(1)
    after_rule = torch.zeros_like(rule)
    after_rule[:, 1:] = rule[:, :-1]  # the byte after a rule position: a word's first byte
    names = ["routed_frac_mean", "routed_frac_min", "routed_frac_max", "aux_loss",
             "spacelike_share_of_routed", "routed_share_of_spacelike", "rule_frac", "after_spacelike_share_of_routed"]
    both = (mask & rule).sum().float()
    vals = [frac.mean(), frac.min(), frac.max(), aux.float(),
            both / mask.sum().clamp(min=1), both / rule.sum().clamp(min=1), rule.float().mean(),
            (mask & after_rule).sum() / mask.sum().clamp(min=1)]
    if r.boundaries is not None:  # chunk: the same decision in both modes; what the cap dropped, never silently
        dropped = r.boundaries & ~mask
        lengths = chunk_lengths(mask).float()
        q = torch.quantile(lengths, torch.tensor([0.5, 0.9], device=mask.device))
        names += ["causal_agreement", "boundary_frac", "boundary_prob_mean", "chunk_len_mean", "chunk_len_p50",
                  "chunk_len_p90", "chunk_overflow", "chunk_overflow_frac", "chunk_overflow_seqs"]
        vals += [torch.ones((), device=mask.device), r.boundaries.float().mean(), r.prob.float().mean(),
                 lengths.mean(), *q, dropped.sum(), dropped.sum() / r.boundaries.sum().clamp(min=1),
                 dropped.any(1).float().mean()]
    elif r.scores is not None:
        s = r.scores.float().flatten()
        q = torch.quantile(s[:: max(1, s.numel() // 65536)], torch.tensor([0.1, 0.5, 0.9], device=s.device))
        names += ["score_mean", "score_std", "score_p10", "score_p50", "score_p90", "causal_agreement"]
        vals += [s.mean(), s.std() if s.numel() > 1 else s.new_zeros(()), *q,
                 ((r.causal_logits > 0) == r.topk_mask).float().mean()]
    else:  # spacelike: the decision is the same in both modes; report how many rule positions the cap dropped
        names += ["causal_agreement", "rule_dropped_frac"]
        vals += [torch.ones((), device=mask.device), 1 - (mask & rule).sum() / rule.sum().clamp(min=1)]
    if r.return_rms is not None:  # the scale the latent output returns at, relative to the stream (H-Net norms both)
        names.append("return_rms_ratio")
        vals.append(r.return_rms[0] / r.return_rms[1].clamp(min=1e-12))
    return dict(zip(names, torch.stack([v.float().to(mask.device) for v in vals]).tolist()))


LATENT_MODULES = ("latent_in", "latent_blocks", "latent_norm", "latent_out")
STAGES = ("local", "latent", "router")


def param_stage(name: str) -> str:
    """Stage of a parameter, from its name in `Pico.named_parameters()` (wrapper prefixes allowed):
    "router" (scores, predictor, chunk W_q/W_k), "latent" (the latent blocks and their projections)
    or "local" (embedding, local blocks, heads, dechunk residual): the unit of per-stage learning rates."""
    parts = name.split(".")
    if "router" in parts:
        return "router"
    return "latent" if any(p in LATENT_MODULES for p in parts) else "local"


def build_model(cfg: ModelConfig) -> Pico:
    """The Pico network of cfg, initialised from the current torch seed."""
    return Pico(cfg)
