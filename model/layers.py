"""The layers every stage of Pico is built from: RMSNorm, grouped-query ALiBi attention, SwiGLU and
the pre-norm block. Local blocks (every byte) and latent blocks (routed positions) are the same
`Block` at different widths; position information comes only from the ALiBi bias.

A block takes an optional `cache` whose `update(k, v)` returns the past keys/values joined to the new
ones (incremental decoding, model/generate.py); the caller builds the mask from the absolute
positions of the queries and the cached keys (`attention.attention_bias`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pico.model.attention import MaskSpec, attend
from pico.model.config import hidden_width


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
