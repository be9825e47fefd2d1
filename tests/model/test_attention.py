"""Local attention against references written out by hand: ALiBi + window, and GQA vs MHA."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from pico.model.pico import Attention, alibi_slopes, attention_bias, build_model

from .conftest import tiny_config


def dense_reference(attn: Attention, x: torch.Tensor, slopes: torch.Tensor, window: int) -> torch.Tensor:
    """Explicit loops over heads and positions: softmax(q.k / sqrt(hd) - slope * (i - j)) over j in (i-window, i]."""
    B, T, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w = attn.qkv_proj.weight
    q = (x @ w[: H * hd].T).view(B, T, H, hd)
    k = (x @ w[H * hd: (H + Hkv) * hd].T).view(B, T, Hkv, hd)
    v = (x @ w[(H + Hkv) * hd:].T).view(B, T, Hkv, hd)
    out = torch.zeros(B, T, H, hd)
    for h in range(H):
        g = h // (H // Hkv)  # the kv head this query head shares
        for i in range(T):
            js = [j for j in range(T) if 0 <= i - j < window]
            logits = torch.stack([(q[:, i, h] * k[:, j, g]).sum(-1) / math.sqrt(hd) - slopes[h] * (i - j) for j in js], -1)
            p = logits.softmax(-1)  # (B, len(js))
            out[:, i, h] = sum(p[:, n, None] * v[:, j, g] for n, j in enumerate(js))
    return out.reshape(B, T, H * hd) @ attn.out_proj.weight.T


def test_alibi_slopes_match_the_paper():
    assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert_close(alibi_slopes(4), torch.tensor([2.0 ** -(2 * i) for i in range(1, 5)]))
    # 6 heads: the 4-head slopes, then every other slope of the 8-head set
    assert_close(alibi_slopes(6), torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]))


def test_window_alibi_attention_equals_dense_reference():
    cfg = tiny_config(window=5)
    model = build_model(cfg)
    attn = model.blocks_in[0].attn
    x = torch.randn(2, 13, cfg.d_local)
    got = attn(x, model.local_bias(13, x.device, x.dtype))
    assert_close(got, dense_reference(attn, x, alibi_slopes(cfg.n_heads), cfg.window))


def test_window_longer_than_sequence_is_plain_causal_alibi():
    cfg = tiny_config(window=64)
    model = build_model(cfg)
    attn = model.blocks_out[1].attn
    x = torch.randn(1, 9, cfg.d_local)
    assert_close(attn(x, model.local_bias(9, x.device, x.dtype)), dense_reference(attn, x, alibi_slopes(4), 10**6))


def test_gqa_equals_mha_with_repeated_keys_and_values():
    d, H, Hkv = 32, 4, 2
    hd = d // H
    gqa = Attention(d, H, Hkv)
    mha = Attention(d, H, H)
    wq, wk, wv = gqa.qkv_proj.weight.split([H * hd, Hkv * hd, Hkv * hd])
    rep = lambda w: w.view(Hkv, hd, d).repeat_interleave(H // Hkv, dim=0).reshape(H * hd, d)  # noqa: E731
    with torch.no_grad():
        mha.qkv_proj.weight.copy_(torch.cat([wq, rep(wk), rep(wv)]))
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
    x = torch.randn(3, 11, d)
    pos = torch.arange(11)
    bias = attention_bias(pos, pos, alibi_slopes(H), window=4)
    assert_close(gqa(x, bias), mha(x, bias))


def test_bias_from_absolute_positions_supports_a_cache_offset():
    """Queries at positions 10..12 against keys 6..12 see the same bias rows as a full sequence."""
    slopes = alibi_slopes(4)
    full = attention_bias(torch.arange(13), torch.arange(13), slopes, window=5)
    part = attention_bias(torch.arange(10, 13), torch.arange(6, 13), slopes, window=5)
    assert_close(part, full[:, 10:13, 6:13])


class AppendCache:
    """The simplest key/value cache: keep everything, join along the time axis."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def test_block_run_byte_by_byte_through_a_cache_equals_the_full_pass():
    cfg = tiny_config(window=4)
    model = build_model(cfg)
    block = model.blocks_in[0]
    x = torch.randn(2, 10, cfg.d_local)
    full = block(x, model.local_bias(10, x.device, x.dtype))
    cache, steps = AppendCache(), []
    for t in range(10):
        bias = attention_bias(torch.tensor([t]), torch.arange(t + 1), model.local_slopes, cfg.window)
        steps.append(block(x[:, t:t + 1], bias, cache))
    assert_close(torch.cat(steps, dim=1), full)
