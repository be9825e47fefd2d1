"""Attention of the Pico blocks: one numerical contract, three implementations.

The contract. Query head h at position i attends to key j with weight

    softmax_j(q_i . k_j / sqrt(head_dim) - slope_h * (pos_i - pos_j))

over the visible keys: 0 <= i - j < window (window None: every j <= i). Keys and values have
`n_kv_heads` heads; query head h reads kv head h // (n_heads / n_kv_heads) (grouped-query
attention). ALiBi slopes as in Press et al. 2022. `attend(q, k, v, mask)` is the one entry point;
`mask` says which implementation runs:

- a tensor: **dense**, `F.scaled_dot_product_attention` under an additive float mask built by
  `attention_bias` from absolute positions. The reference, and the path of cached decoding, whose
  queries and keys are not the same positions.
- `MaskSpec(impl="banded")`: **banded**, for CPU. Queries are cut into blocks of `block` positions
  (default window / 4, at least 32); a query block attends to the ceil((window - 1) / block) key
  blocks before it and its own, so work and memory are O(T * (window + block)) instead of
  O(T^2). The blocks go through SDPA as one batch under one (H, block, keys) mask, the same for
  every block; the first blocks, whose key span would start before position 0, go through SDPA
  on their own. Measured against dense in benchmarks/results/attention.md.
- `MaskSpec(impl="flex")`: **FlexAttention** (`torch.nn.attention.flex_attention`), for CUDA: a
  block mask skips the blocks outside the causal window, a `score_mod` adds the ALiBi bias and
  the kernel shares kv heads itself (`enable_gqa`). It is compiled on CUDA (eager flex
  materialises every score); on CPU it runs eagerly, forward only (no CPU backward in torch).
  With `pos` (latent blocks: slots gathered from scattered byte positions) the ALiBi distance
  comes from `pos` and causality from the slot order, which is the same thing for the real
  slots (they are sorted by position); padding slots sit last, so no real slot sees them.

`resolve_impl` turns the config's `auto` into banded on CPU and flex on CUDA.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("auto", "dense", "banded", "flex")


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): 2^(-8i/n) for i = 1..n, interleaved for non-powers of 2."""
    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    p = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(p) + powers(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes)


def attention_bias(pos_q: torch.Tensor, pos_k: torch.Tensor, slopes: torch.Tensor,
                   window: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask from absolute byte positions: ALiBi, causality and the window.

    pos_q (..., Tq) and pos_k (..., Tk) hold positions; the result is (..., H, Tq, Tk) with
    -slope * (q - k) where key k is visible (0 <= q - k < window) and -inf elsewhere.
    """
    dist = (pos_q.unsqueeze(-1) - pos_k.unsqueeze(-2)).unsqueeze(-3)  # (..., 1, Tq, Tk)
    visible = dist >= 0
    if window is not None:
        visible = visible & (dist < window)
    bias = -slopes.to(pos_q.device, dtype).view(-1, 1, 1) * dist.to(dtype)  # (..., H, Tq, Tk)
    return bias.masked_fill(~visible, float("-inf"))


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Causal (+ window) ALiBi attention described by its parameters instead of a (H, T, T) mask.

    Self-attention only: queries and keys are the same T positions, 0..T-1 unless `pos` (B, T)
    gives them (the latent slots' byte positions; flex only).
    """

    impl: str                         # "banded" or "flex"
    slopes: torch.Tensor              # (H,) ALiBi slopes
    window: int | None = None         # None: full causal
    pos: torch.Tensor | None = None   # (B, T) positions for the ALiBi distance; None: arange(T)
    block: int | None = None          # banded query block (None: default_block(window))


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation `impl` (a ModelConfig.attn_impl) means on `device`: auto = flex on CUDA, banded elsewhere."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"model.attn_impl={impl!r}: use one of {', '.join(ATTN_IMPLS)}")
    if impl == "auto":
        return "flex" if torch.device(device).type == "cuda" else "banded"
    return impl


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | MaskSpec) -> torch.Tensor:
    """Attention output (B, Tq, H * head_dim) of q (B, H, Tq, hd) against k, v (B, Hkv, Tk, hd)."""
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 3:  # (H, Tq, Tk): SDPA takes its fused CPU kernel only for a 4-D mask (else the math one)
            mask = mask.unsqueeze(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    elif mask.impl == "banded":
        if mask.pos is not None or mask.window is None:
            raise ValueError("banded attention covers the local window over positions 0..T-1 only")
        return banded_attention(q, k, v, mask.slopes, mask.window, mask.block)
    elif mask.impl == "flex":
        y = flex_alibi_attention(q, k, v, mask.slopes, mask.window, mask.pos)
    else:
        raise ValueError(f"unknown attention implementation {mask.impl!r}")
    B, _, Tq, _ = y.shape
    return y.transpose(1, 2).reshape(B, Tq, -1)


# ----------------------------------------------------------------------------- banded (CPU)


def default_block(window: int) -> int:
    """Banded query block: a quarter of the window (keys per query = window + block), at least 32
    (shorter blocks cost more in the fused kernel's overhead than they save in masked keys)."""
    return max(32, -(-window // 4))


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, window: int,
                     block: int | None = None) -> torch.Tensor:
    """Causal sliding-window ALiBi attention in query blocks; returns (B, T, H * hd).

    q (B, H, T, hd), k and v (B, Hkv, T, hd). Each block of b queries sees the m = ceil((window-1)/b)
    key blocks before it and its own: L = (m + 1) * b keys, of which one (H, b, L) mask keeps the
    window. The blocks go through SDPA as a batch (its fused CPU kernel, which keeps no
    scores for the backward pass), all under that one broadcast mask; the first m * b queries,
    whose spans would start before position 0, go through SDPA on their own. The G query heads
    of a kv head share its keys, so they go in as one query block of G * b rows (longer query
    blocks run faster in the fused kernel than G heads of b rows under enable_gqa).
    """
    B, H, T, hd = q.shape
    b = min(block or default_block(window), T)
    m = -(-(window - 1) // b)  # earlier key blocks a query block reaches into
    head = min(m * b, T)
    pos = torch.arange(head, device=q.device)
    y0 = attend(q[:, :, :head], k[:, :, :head], v[:, :, :head], attention_bias(pos, pos, slopes, window, q.dtype)) \
        if head else q.new_zeros(B, 0, H * hd)
    if head == T:
        return y0
    Hkv, L, nb = k.shape[1], (m + 1) * b, -(-(T - head) // b)  # nb blocks of b queries after the head
    G = H // Hkv  # query heads per kv head; head h = kv * G + g
    pad = head + nb * b - T  # trailing queries and keys past T: later than every real query, so masked
    qb = F.pad(q[:, :, head:], (0, 0, 0, pad)).view(B, Hkv, G, nb, b, hd).permute(0, 3, 1, 2, 4, 5)
    qb = qb.reshape(B * nb, Hkv, G * b, hd)  # rows g * b + i: query i of the block, head kv * G + g
    kb, vb = (F.pad(t, (0, 0, 0, pad)).unfold(2, L, b).permute(0, 2, 1, 4, 3).reshape(B * nb, Hkv, L, hd)
              for t in (k, v))  # (B * nb, Hkv, L, hd): block n's keys start at n * b
    mask = band_bias(slopes, window, b, m, q.device, q.dtype).view(Hkv, G * b, L).expand(B * nb, Hkv, G * b, L)
    y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)  # (B * nb, Hkv, G * b, hd)
    y = y.view(B, nb, Hkv, G, b, hd).permute(0, 1, 4, 2, 3, 5).reshape(B, nb * b, H * hd)[:, :T - head]
    return torch.cat([y0, y], dim=1)


def band_bias(slopes: torch.Tensor, window: int, b: int, m: int, device, dtype) -> torch.Tensor:
    """(H, b, L) ALiBi + window mask of one query block against its L = (m + 1) * b keys."""
    i = torch.arange(b, device=device).unsqueeze(1) + m * b  # query offset inside the key span
    dist = i - torch.arange((m + 1) * b, device=device)      # (b, L) = query pos - key pos
    bias = -slopes.to(device, dtype).view(-1, 1, 1) * dist.to(dtype)
    return bias.masked_fill(~((dist >= 0) & (dist < window)), float("-inf"))


# ----------------------------------------------------------------------------- FlexAttention (CUDA)

_BLOCK_MASKS: OrderedDict[tuple, object] = OrderedDict()  # (T, window, device) -> BlockMask, LRU
_FLEX = None  # flex_attention, compiled on first CUDA use


def flex_available(device) -> bool:
    """Whether FlexAttention trains on `device`: it needs CUDA for the backward pass."""
    return torch.device(device).type == "cuda"


def _flex_fn(device):
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if not flex_available(device):
        return flex_attention  # eager: every score materialised, forward only; for tests on CPU
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _block_mask(T: int, window: int | None, device):
    """Causal (+ window) BlockMask for T queries and keys, cached (it depends on T and the window only)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (T, window, str(device))
    if key not in _BLOCK_MASKS:
        def visible(b, h, q_idx, kv_idx):
            causal = q_idx >= kv_idx
            return causal if window is None else causal & (q_idx - kv_idx < window)

        _BLOCK_MASKS[key] = create_block_mask(visible, None, None, T, T, device=device)
        while len(_BLOCK_MASKS) > 16:
            _BLOCK_MASKS.popitem(last=False)
    else:
        _BLOCK_MASKS.move_to_end(key)
    return _BLOCK_MASKS[key]


def flex_alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                         window: int | None, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (+ window) ALiBi attention through FlexAttention; returns (B, H, T, hd) like SDPA.

    With pos (B, T) the ALiBi distance is pos[q] - pos[k] (latent slots); causality is by index.
    """
    if not flex_available(q.device):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError("model.attn_impl=flex trains on CUDA only (FlexAttention has no CPU backward): "
                               "set model.attn_impl to banded or auto on CPU")
        q, k, v = q.detach(), k.detach(), v.detach()  # torch refuses CPU inputs that require grad
    slopes = slopes.to(q.device, torch.float32)
    if pos is None:
        def alibi(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx)
    else:
        pos = pos.to(torch.int32)

        def alibi(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (pos[b, q_idx] - pos[b, kv_idx])

    bm = _block_mask(q.shape[2], window, q.device)
    with warnings.catch_warnings():  # CPU runs eagerly on purpose (tests, inference); do not say so every call
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_fn(q.device)(q, k, v, score_mod=alibi, block_mask=bm, enable_gqa=k.shape[1] != q.shape[1])
