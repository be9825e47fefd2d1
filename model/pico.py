"""Pico: a byte-level language model that spends its wide layers on a few positions per word.

The network, top to bottom:

    bytes (B, T) -> embedding (+ n-grams) -> n_in local blocks -> router -> latent stack on the routed
    positions only -> return path -> n_out local blocks -> final norm -> n_predict heads (t+1..t+n)

Design choices and their sources:

- **Embedding**: one vector per byte id (256 bytes, BOS, EOS, PAD), plus with `ngram_orders` hashed
  n-gram embeddings of the bytes ending at t (BLT; model/embedding.py).
- **Local blocks** (every byte, width `d_local`; model/layers.py): pre-RMSNorm; causal sliding-window
  attention (a byte sees itself and `window - 1` bytes before it) with grouped-query attention
  (`n_heads` query heads share `n_kv_heads` key/value heads; Ainslie et al. 2023); ALiBi biases and
  no position embeddings (Press et al. 2022), so a model runs at any absolute position; SwiGLU MLP
  (Shazeer 2020); no biases. Attention runs through `attention.attend` (`model.attn_impl`: dense,
  banded on CPU, flex on CUDA; the same numbers, see attention.py).
- **Router** (model/routers/, one file per router behind one protocol): decides which positions go
  through the latent stack. `spacelike` is SpaceByte's rule (Slagle 2024: the byte after a word;
  the shipped default, because experiments 2-4 found no learned router that beat it at pico's CPU
  budgets); `learned` is Mixture-of-Depths top-k with a calibrated causal threshold (Raposo et al.
  2024); `chunk` is H-Net's learned boundaries (Hwang et al. 2025); `entropy` is BLT's next-byte
  entropy from an early head (Pagnoni et al. 2024); `none` is a plain byte Transformer (the
  `n_in + n_out` local blocks and nothing else). Training routes with `routing="topk"` (which may
  look ahead), evaluation and generation with `routing="causal"`.
- **Latent stack and return path** (model/latent.py): the routed positions, gathered in order, run
  through `n_latent` wider blocks (`d_latent`), causal among themselves with ALiBi distances from
  their byte positions; their output returns to the byte stream at the routed positions, scaled by
  the router's gate, or with `dechunk` to every byte of the chunk (H-Net's smoothing and upsampler).
- **Multi-token prediction** (Gloeckle et al. 2024): head 1 is final norm + unembedding; head h >= 2
  first adds its own small SwiGLU residual MLP (`mtp_mlp_ratio`) to the trunk output, then shares
  the final norm and unembedding, so each draft head has capacity of its own for self-speculative
  decoding. Without targets only head 1 runs; with targets the heads run one after another into
  their losses, so a single logit tensor is live. Loss = CE_1 + mtp_weight * mean(CE_2..CE_n) +
  aux_loss_weight * the router's aux loss: the mean keeps the loss scale independent of n_predict.
- **Two faces.** `trunk` runs a whole sequence; `step` runs a chunk of new bytes of a decoding step
  against caches (model/generate.py holds them), calling each component's own `step`, line for
  line the same path, so training and decoding cannot drift.
- **Initialisation**: normal(0, init_std) for every matrix, residual output projections scaled by
  1/sqrt(2 * blocks) (GPT-2), norms at 1; then each component's own `init_weights` (the router's
  score bias at 0, H-Net's W_q = W_k = I, the return norm at `return_init`, the dechunk map at 0).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from pico.model.attention import MaskSpec, alibi_slopes, attention_bias, resolve_impl
from pico.model.config import PAD, VOCAB_SIZE, ModelConfig, hidden_width
from pico.model.embedding import NgramEmbedding
from pico.model.latent import PAD_POS, LatentStack, build_return
from pico.model.layers import Block, RMSNorm, SwiGLU
from pico.model.routers.base import Routing, Step, build_router, pack_slots, routing_stats

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


# ----------------------------------------------------------------------------- heads


class MTPHead(nn.Module):
    """Residual SwiGLU of one draft head h >= 2: x + mlp(norm(x)), before the shared unembedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_local, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_local, hidden_width(cfg.d_local, cfg.mtp_mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class DraftHeads:
    """The decoding face of MTP heads 2..k+1: the same function as calling each `MTPHead` in turn, with
    their weights stacked once so that 3k small kernel calls per step become a few batched matmuls
    (most of what a draft costs on a CPU)."""

    def __init__(self, heads: list[MTPHead]):
        self.k = len(heads)
        self.eps = heads[0].norm.eps
        self.norm_w = torch.stack([h.norm.weight for h in heads]).unsqueeze(1)  # (k, 1, d)
        self.gate_up = torch.stack([h.mlp.gate_up.weight.t() for h in heads])  # (k, d, 2 * hidden)
        self.down = torch.stack([h.mlp.down.weight.t() for h in heads])  # (k, hidden, d)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k, d) inputs of the shared unembedding from the trunk output x (B, d)."""
        a = F.rms_norm(x, (x.shape[-1],), None, self.eps).unsqueeze(0) * self.norm_w  # (k, B, d)
        gate, up = torch.bmm(a, self.gate_up).chunk(2, dim=-1)
        return x.unsqueeze(1) + torch.bmm(F.silu(gate) * up, self.down).transpose(0, 1)


# ----------------------------------------------------------------------------- model


@dataclass
class ModelOutput:
    """What one forward pass returns (see the module docstring for the loss weighting)."""

    logits: torch.Tensor | None          # (B, T, VOCAB_SIZE) next-byte logits
    loss: torch.Tensor | None = None     # scalar training loss
    head_losses: torch.Tensor | None = None  # (n_predict,) mean CE in nats per head, detached
    aux_loss: torch.Tensor | None = None     # scalar router aux loss (0 without one)
    routed: torch.Tensor | None = None       # (B, T) bool, None for router none
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class StepTrace:
    """What a decoding step leaves for the decoder's commit: the latent slots and each component's state
    after every new byte."""

    exact: torch.Tensor                    # (B,) leading positions whose output is exact (lazy latent)
    slot_idx: torch.Tensor | None = None   # (B, K) chunk index of each latent slot
    slot_ok: torch.Tensor | None = None    # (B, K) real slots
    carry: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # per component: (B, C, ...) each


class Pico(nn.Module):
    """The Pico network for one ModelConfig; `forward(idx, targets, routing)` returns a ModelOutput."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        local = lambda: Block(cfg.d_local, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_ratio, cfg.norm_eps)  # noqa: E731
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.d_local)
        self.ngrams = NgramEmbedding(cfg) if cfg.ngram_orders else None
        self.blocks_in = nn.ModuleList(local() for _ in range(cfg.n_in))
        self.router = build_router(cfg)  # None for router: none
        if self.router is not None:
            self.latent = LatentStack(cfg)
            self.return_path = build_return(cfg)
        self.blocks_out = nn.ModuleList(local() for _ in range(cfg.n_out))
        self.norm = RMSNorm(cfg.d_local, cfg.norm_eps)
        self.mtp_heads = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.n_predict - 1))
        self.unembed = nn.Linear(cfg.d_local, VOCAB_SIZE, bias=False)
        self.register_buffer("local_slopes", alibi_slopes(cfg.n_heads), persistent=False)
        self._bias_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # LRU, BIAS_CACHE_SIZE entries
        self._register_load_state_dict_pre_hook(_upgrade_hook)
        self._init_weights()

    def _init_weights(self) -> None:
        n_blocks = self.cfg.n_in + self.cfg.n_out + (self.cfg.n_latent if self.router is not None else 0)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                resid = name.endswith(("out_proj.weight", "down.weight", "proj_out.weight"))
                nn.init.normal_(p, 0.0, self.cfg.init_std / (math.sqrt(2 * n_blocks) if resid else 1.0))
        if self.router is not None:
            for part in (self.router, self.latent, self.return_path):
                part.init_weights()

    # ------------------------------------------------------------------ masks

    def local_bias(self, T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(n_heads, T, T) window + ALiBi mask of the local blocks, cached per (T, device, dtype).

        The cache keeps the BIAS_CACHE_SIZE most recently used masks: evaluation meets many
        lengths T, and each mask is n_heads * T * T values."""
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

    # ------------------------------------------------------------------ the trunk, whole sequences

    def trunk(self, idx: torch.Tensor, routing: str = "topk") -> tuple[torch.Tensor, Routing | None]:
        """Residual stream (B, T, d_local) before the final norm, and the routing used."""
        if routing not in ("topk", "causal"):
            raise ValueError(f"routing={routing!r}: use 'topk' (training) or 'causal' (inference)")
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} bytes exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, d_local)
        if self.ngrams is not None:
            x = x + self.ngrams(idx)
        bias = self.local_mask(T, x.device, x.dtype)
        for blk in self.blocks_in:
            x = blk(x, bias)
        r = None
        if self.router is not None:
            r = self.router(x, idx, routing)
            x = self.return_path(x, self.latent(x, r), r)  # latent output (B, K, d_local) back to the stream
        for blk in self.blocks_out:
            x = blk(x, bias)
        return x, r

    # ------------------------------------------------------------------ the trunk, one decoding step

    def init_states(self, batch: int, like: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Decoding state of `batch` empty sequences, per component that keeps one (like: a (1, d_local)
        tensor of the model's device and dtype)."""
        parts = {"ngrams": self.ngrams}
        if self.router is not None:
            parts.update(router=self.router, latent=self.latent, return_path=self.return_path)
        return {name: part.init_state(batch, like) for name, part in parts.items() if part is not None}

    def step(self, s: Step, local, latent, states: dict[str, dict[str, torch.Tensor]],
             lazy: bool = False) -> tuple[torch.Tensor, StepTrace]:
        """`trunk` for the C new bytes of a decoding step `s` (model/routers/base.py): the trunk output
        (B, C, d_local) and what `commit` needs. `local` and `latent` are the key/value caches of the
        local and latent blocks (model/generate.py's KVCache: `key_pos`, `layer(i)`, `S` slots), `states`
        the components' own (`init_states`); nothing is stored until the decoder commits.

        `lazy` (a chain's speculative step): when no sequence routes the chunk's first byte, the latent
        stack does not run, and each row's output is exact only before its first routed byte
        (`trace.exact`); the router decides before the stack runs, so this costs nothing to know."""
        B, C = s.ids.shape
        trace = StepTrace(exact=torch.full((B,), C, dtype=torch.long, device=s.ids.device))
        x = self.embed(s.ids)  # (B, C, d_local)
        if self.ngrams is not None:
            e, trace.carry["ngrams"] = self.ngrams.step(s, states["ngrams"])
            x = x + e
        bias = attention_bias(s.pos, local.key_pos(s.pos), self.local_slopes, local.S + 1, x.dtype)  # (B, H, C, S+1+C)
        if s.anc is not None:  # a tree's new keys: ancestors only
            bias[..., local.S + 1:].masked_fill_(~s.anc, float("-inf"))
        for i, blk in enumerate(self.blocks_in):
            x = blk(x, bias, local.layer(i))
        if self.router is not None:
            x = self._latent_step(x, s, latent, states, lazy, trace)
        for i, blk in enumerate(self.blocks_out):
            x = blk(x, bias, local.layer(self.cfg.n_in + i))
        return x, trace

    def _latent_step(self, x: torch.Tensor, s: Step, cache, states: dict, lazy: bool, trace: StepTrace) -> torch.Tensor:
        sr = self.router.step(x, s, states["router"])
        trace.carry["router"] = sr.carry
        mask = sr.mask
        if lazy and not bool(mask[:, 0].any()):  # skip the stack; stop each row at its first routed byte
            C = mask.shape[1]
            trace.exact = torch.where(mask, torch.arange(C, device=mask.device), C).amin(1)
            mask = mask & False
        inputs, trace.carry["latent"] = self.latent.step_inputs(x, mask, s, states["latent"])
        K = int(mask.sum(1).max())
        y = idx = ok = None
        if K == 0:  # nothing routed in this chunk: the latent stack has no work
            cache.key_pos(s.pos[:, :0])
        else:
            idx, _, ok = pack_slots(mask, K)  # (B, K) chunk indices, in position order
            trace.slot_idx, trace.slot_ok = idx, ok
            see = None  # a tree: routed nodes see routed ancestors; padding slots see themselves
            if s.anc is not None:
                see = s.anc[idx.unsqueeze(-1), idx.unsqueeze(-2)] | torch.eye(K, dtype=torch.bool, device=idx.device)
            y = self.latent.step(inputs, idx, torch.where(ok, s.pos.gather(1, idx), PAD_POS), cache, s.context, see)
        x, trace.carry["return_path"] = self.return_path.step(x, y, idx, ok, sr, s, states["return_path"])
        return x

    # ------------------------------------------------------------------ heads and loss

    def head_logits(self, x: torch.Tensor, h: int) -> torch.Tensor:
        """Logits (B, T, VOCAB_SIZE) of head h (1 = next byte) from the trunk output x."""
        if h > 1:
            x = self.mtp_heads[h - 2](x)
        return self.unembed(self.norm(x))

    def draft_heads(self, k: int) -> DraftHeads:
        """Heads 2..k+1 batched for drafting (decoding only: their weights are copied once)."""
        return DraftHeads(list(self.mtp_heads[:k]))

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
        aux = self.router.aux_loss(r) if r is not None else x.new_zeros((), dtype=torch.float32)
        stats = routing_stats(self.router, r, idx, aux) if r is not None and with_stats else {}
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

    def flops_per_byte(self, training: bool = True, rate: float | None = None) -> float:
        """FLOPs per byte of this model's config (see `pico.model.flops`), at a routed fraction
        `rate` of the positions (default: what the config routes, `capacity`)."""
        from pico.model.flops import flops_per_byte

        return flops_per_byte(self.cfg, training, rate=rate)


# ----------------------------------------------------------------------------- parameters by name

LATENT_MODULES = ("latent",)
STAGES = ("local", "latent", "router")

# Parameter names before the latent stack and the return path became components (pico <= 0f5ea54):
# checkpoints and releases written then still load.
RENAMED = {"latent_in.": "latent.proj_in.", "latent_blocks.": "latent.blocks.", "latent_norm.": "latent.norm.",
           "latent_out.": "latent.proj_out.", "dechunk_residual.": "return_path.residual."}


def upgrade_state_dict(state: dict, prefix: str = "") -> dict:
    """state with parameter names of older pico (RENAMED) moved to today's, in place; returns it."""
    for key in list(state):
        rest = key[len(prefix):] if key.startswith(prefix) else None
        for old, new in RENAMED.items():
            if rest is not None and rest.startswith(old):
                state[prefix + new + rest[len(old):]] = state.pop(key)
                break
    return state


def _upgrade_hook(state, prefix, *args) -> None:
    upgrade_state_dict(state, prefix)


def param_stage(name: str) -> str:
    """Stage of a parameter, from its name in `Pico.named_parameters()` (wrapper prefixes allowed):
    "router" (the router's own parameters), "latent" (the latent stack and its projections) or "local"
    (embedding, local blocks, heads, the dechunk map): the unit of per-stage learning rates."""
    parts = name.split(".")
    if "router" in parts:
        return "router"
    return "latent" if any(p in LATENT_MODULES for p in parts) else "local"


def build_model(cfg: ModelConfig) -> Pico:
    """The Pico network of cfg, initialised from the current torch seed."""
    return Pico(cfg)
