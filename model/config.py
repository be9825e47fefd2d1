"""The model's own configuration: everything needed to rebuild a Pico network, nothing else.

The docstring under each field is the help text: `pico train --help-config` and the README's
config table are generated from these strings, so a field is documented in exactly one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

# Byte ids 0..255 are the bytes themselves; three special ids follow.
BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259

AttnImpl = Literal["auto", "dense", "banded", "flex"]
NO_ROUTER = "none"  # model.router of a plain byte Transformer: no router, no latent stage
MAX_NGRAM = 8  # longest hashed n-gram (model.ngram_orders)

# Options that lost in every experiment that tried them (experiments 2-4), with the value pico still
# implements: a config (an old checkpoint's, say) may name that value and loads; the other value is refused.
RETIRED = {
    "router_gate": ("sigmoid", "straight_through (gate 1 forward) lost to sigmoid wherever it was measured"),
    "router_aux": ("score", "predictor (MoD's causal MLP) lost to the score's own BCE wherever it was measured"),
    "dechunk_skip": ("identity", "linear (H-Net's residual-free sum) lost on both domains in experiment 4"),
}


@dataclass
class ModelConfig:
    """Shape of a Pico network: local byte blocks, a router, wider latent blocks, MTP heads."""

    d_local: int = 256
    """Width of the local (every-byte) blocks."""
    n_heads: int = 4
    """Query heads in each local block."""
    n_kv_heads: int = 2
    """Key/value heads in each local block (grouped-query attention); must divide n_heads."""
    window: int = 256
    """Sliding attention window of the local blocks, in bytes (a byte sees itself and window-1 before it)."""
    attn_impl: AttnImpl = "auto"
    """How attention runs (same numbers, see model/attention.py): dense: SDPA under a (n_heads, T, T) mask; banded: query blocks against the window only, O(T * window) (CPU); flex: FlexAttention, compiled, causal-window block mask and ALiBi score_mod, local and latent blocks (CUDA; no CPU backward); auto: flex on CUDA, banded elsewhere. Cached decoding always uses dense masks."""
    n_in: int = 2
    """Local blocks before the router."""
    n_out: int = 2
    """Local blocks after the latent blocks."""
    d_latent: int = 512
    """Width of the latent blocks that only routed positions pass through."""
    n_latent: int = 2
    """Number of latent blocks (0 only with router: none)."""
    n_latent_heads: int = 8
    """Query heads in each latent block."""
    n_latent_kv_heads: int = 4
    """Key/value heads in each latent block; must divide n_latent_heads."""
    mlp_ratio: float = 8 / 3
    """SwiGLU hidden width as a multiple of the block width (rounded up to a multiple of 64)."""
    ngram_orders: list[int] = field(default_factory=list)
    """Hashed byte n-gram embeddings (BLT, Pagnoni et al. 2024, section 3.2.1): for each order n listed (2..8), the n bytes ending at t are hashed into one of `ngram_buckets` rows of a table of that order's own, added to byte t's embedding. Empty: off. Applies to every router, none included."""
    ngram_buckets: int = 4096
    """Rows of each n-gram embedding table (with ngram_orders)."""
    pooled_inputs: bool = False
    """The latent blocks read the mean of the byte stream over each routed position's segment (the bytes after the previous routed position up to it; Nawrot et al. 2023, section 3) instead of the routed byte's state alone. Needs a router."""
    router: str = "learned"
    """Which positions go through the latent blocks: a router in model/routers/ (spacelike: SpaceByte's rule; learned: Mixture-of-Depths top-k; chunk: H-Net's learned causal chunk boundaries; entropy: an early head's next-byte entropy) or none: a plain byte Transformer."""
    capacity: float = 0.2
    """Fraction of positions routed into the latent blocks (learned and entropy: top-k per sequence; chunk: the boundary rate its ratio loss aims at; spacelike: the cap on rule positions)."""
    chunk_cap: float = 0.0
    """Chunk router only: most boundaries routed per sequence, as a fraction of max_seq_len (bounds the latent blocks' memory); boundaries past it are dropped and counted in router stats (chunk_overflow_frac). 0 = 2 x capacity, at most 1. Decoding applies the same fraction to its context."""
    dechunk: bool = False
    """Return path of the latent blocks (any router): false adds the latent output at the routed positions only; true gives every byte its chunk's output (the last routed position's, repeated), smoothed by an EMA with the boundary probability, times a confidence straight-through estimator, plus the stream and a zero-initialised linear map of it (H-Net's dechunking)."""
    return_init: float = 1.0
    """Initial gain of the RMSNorm before `latent_out` (learned after): the scale at which the latent output first returns to the byte stream. At 1 it starts about 4x the stream's RMS at this init; with dechunk every byte receives it, and H-Net normalises both sides of that sum. 0.25 starts the two at a similar scale (kept: it gained 0.4-1.3 % on dechunk models in experiment 3)."""
    aux_loss_weight: float = 0.01
    """Weight of the router's auxiliary loss: the BCE that teaches the learned router's score to predict top-k membership causally, the chunk router's ratio loss toward `capacity` (H-Net uses 0.03), or the entropy router's early-head cross-entropy."""
    router_prior: float = 0.0
    """Learned router only: initial value of a learned scalar added to the score at SpaceByte's rule positions (0 = no prior; about 4 starts the router from SpaceByte's choice and lets it learn where to deviate)."""
    router_calibrate: bool = True
    """Learned router only: causal routing compares the score with a running estimate of training's top-k cut-off (the k-th largest score per sequence, averaged) instead of 0, so inference routes about `capacity` of the bytes from the first steps, before the aux BCE has moved the scores around 0."""
    n_predict: int = 4
    """Multi-token-prediction heads: head h predicts byte t+h (h = 1..n_predict)."""
    mtp_weight: float = 0.5
    """Loss weight of the mean CE of heads 2..n_predict, added to head 1's CE (head 1 always has weight 1)."""
    mtp_mlp_ratio: float = 1.0
    """Hidden width of the small SwiGLU residual MLP each head 2..n_predict owns, as a multiple of d_local (rounded up to a multiple of 64)."""
    max_seq_len: int = 512
    """Longest sequence the model is trained or run on (bytes per training sequence)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the weight initialisation."""

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"model config: {msg}")

        need(self.d_local > 0 and self.d_latent > 0, "d_local and d_latent must be positive")
        need(self.n_heads > 0 and self.n_kv_heads > 0, "n_heads and n_kv_heads must be positive")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        need(self.d_local % self.n_heads == 0,
             f"d_local={self.d_local} must be a multiple of n_heads={self.n_heads}")
        need(self.window >= 1, f"window={self.window} must be >= 1")
        need(self.attn_impl in AttnImpl.__args__,
             f"model.attn_impl={self.attn_impl!r} must be one of {', '.join(AttnImpl.__args__)}")
        need(self.n_in >= 0 and self.n_out >= 0 and self.n_latent >= 0, "layer counts must be >= 0")
        need(self.n_predict >= 1, f"n_predict={self.n_predict} must be >= 1")
        need(0.0 < self.capacity <= 1.0, f"model.capacity={self.capacity} must be in (0, 1]")
        need(self.max_seq_len >= 2, "max_seq_len must be >= 2")
        need(math.isfinite(self.return_init) and self.return_init > 0,
             f"model.return_init={self.return_init} must be a finite number > 0 (1.0 = the plain RMSNorm init)")
        need(self.mlp_ratio > 0 and self.mtp_mlp_ratio > 0,
             f"mlp_ratio={self.mlp_ratio} and mtp_mlp_ratio={self.mtp_mlp_ratio} must be > 0")
        need(math.isfinite(self.norm_eps) and self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be a number > 0")
        need(math.isfinite(self.init_std) and self.init_std > 0, f"model.init_std={self.init_std} must be a number > 0")
        need(all(isinstance(n, int) and 2 <= n <= MAX_NGRAM for n in self.ngram_orders)
             and len(set(self.ngram_orders)) == len(self.ngram_orders),
             f"model.ngram_orders={self.ngram_orders} must be distinct orders in 2..{MAX_NGRAM} (an n-gram of n bytes), "
             "or [] for none")
        need(self.ngram_buckets >= 1, f"model.ngram_buckets={self.ngram_buckets} must be >= 1 (rows per n-gram table)")
        need(self.mtp_weight >= 0 and self.aux_loss_weight >= 0, "mtp_weight and aux_loss_weight must be >= 0")
        need(0.0 <= self.chunk_cap <= 1.0, f"model.chunk_cap={self.chunk_cap} must be in [0, 1] (0 = 2 x capacity)")
        if self.router != NO_ROUTER:
            need(self.n_latent > 0, f"router={self.router} needs n_latent > 0 (or set router: none)")
            need(self.n_latent_heads > 0 and self.n_latent_kv_heads > 0,
                 "n_latent_heads and n_latent_kv_heads must be positive")
            need(self.n_latent_heads % self.n_latent_kv_heads == 0,
                 f"n_latent_kv_heads={self.n_latent_kv_heads} must divide n_latent_heads={self.n_latent_heads}")
            need(self.d_latent % self.n_latent_heads == 0,
                 f"d_latent={self.d_latent} must be a multiple of n_latent_heads={self.n_latent_heads}")
        else:
            need(self.n_in + self.n_out > 0, "router: none needs at least one local block")
            need(not self.dechunk, "model.dechunk=true needs a router: with model.router=none there are no chunks to "
                                   "return; set model.router to a router (spacelike, say) or model.dechunk=false")
            need(not self.pooled_inputs, "model.pooled_inputs=true needs a router: with model.router=none there are no "
                                         "segments to pool; set model.router (spacelike, say) or model.pooled_inputs=false")

    @classmethod
    def upgrade(cls, data: dict, where: str = "model") -> dict:
        """data (a config mapping) without the RETIRED keys that hold the value pico still implements; a
        retired alternative is a ValueError naming the key. Old checkpoints name every field."""
        data = dict(data)
        for key, (kept, why) in RETIRED.items():
            if key in data and data.pop(key) != kept:
                raise ValueError(f"{where}.{key} is retired: {why}; this pico only implements {key}={kept}. Remove "
                                 f"the key (or use the pico release that trained this config)")
        return data


# Shape rules derived from a config, torch-free so that FLOP counts and cluster/ can use them.


def hidden_width(d: int, ratio: float) -> int:
    """SwiGLU hidden width: ratio * d rounded up to a multiple of 64."""
    return 64 * math.ceil(ratio * d / 64)


def n_routed(capacity: float, T: int) -> int:
    """Positions routed per sequence of T bytes: ceil(capacity * T), at least 1."""
    return max(1, math.ceil(round(capacity * T, 6)))
