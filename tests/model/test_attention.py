"""Attention against references: ALiBi + window and GQA written out by hand, then every path of
`pico.model.attention` (banded, flex) against the dense SDPA path, forward and backward."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from pico.model import ModelConfig
from pico.model.attention import MaskSpec, attend, banded_attention, flex_available
from pico.model.attention import alibi_slopes, attention_bias
from pico.model.layers import Attention
from pico.model.pico import build_model

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


# ----------------------------------------------------------------------------- banded and flex vs dense

FP32 = dict(atol=1e-5, rtol=1e-5)  # the numerical contract of every path in fp32


def qkv(B: int, H: int, Hkv: int, T: int, hd: int = 8, dtype=torch.float32):
    make = lambda h: torch.randn(B, h, T, hd, dtype=dtype, requires_grad=True)  # noqa: E731
    return make(H), make(Hkv), make(Hkv)


def dense(q, k, v, window):
    pos = torch.arange(q.shape[2])
    return attend(q, k, v, attention_bias(pos, pos, alibi_slopes(q.shape[1]), window, q.dtype))


def grads(y, inputs):
    return torch.autograd.grad(y.square().sum(), inputs)


# (T, window, block, n_heads, n_kv_heads): T not a multiple of the block, T < window, T == block,
# a block that does not divide the window, window 1, GQA 4:1 and 2:1, and plain MHA.
SHAPES = [(13, 5, None, 4, 2), (9, 64, None, 4, 2), (100, 16, 7, 8, 2), (64, 16, 16, 4, 4),
          (50, 1, None, 4, 2), (70, 32, None, 4, 1), (16, 16, 16, 4, 2)]


@pytest.mark.parametrize("T,window,block,H,Hkv", SHAPES)
def test_banded_equals_dense_forward_and_backward(T, window, block, H, Hkv):
    q, k, v = qkv(2, H, Hkv, T)
    ref = dense(q, k, v, window)
    got = banded_attention(q, k, v, alibi_slopes(H), window, block)
    assert_close(got, ref, **FP32)
    for g, r in zip(grads(got, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(g, r, **FP32)


def test_banded_bf16_stays_within_bf16_rounding_of_fp32_dense():
    q, k, v = qkv(1, 4, 2, 200, hd=16)
    ref = dense(q, k, v, 48)
    got = banded_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), alibi_slopes(4), 48)
    assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("T,window", [(13, 5), (9, 64), (130, 16)])
def test_flex_forward_equals_dense(T, window):
    """CPU runs FlexAttention eagerly, forward only; the backward is checked on CUDA (below)."""
    q, k, v = qkv(2, 4, 2, T)
    with torch.no_grad():
        assert_close(attend(q, k, v, MaskSpec("flex", alibi_slopes(4), window)), dense(q, k, v, window), **FP32)


def test_flex_with_slot_positions_equals_dense_latent_mask():
    """Latent slots: ALiBi distance from scattered byte positions, causal over the slots."""
    pos = torch.sort(torch.randperm(200)[:40]).values.repeat(2, 1)
    pos[1] = torch.sort(torch.randperm(200)[:40]).values
    q, k, v = qkv(2, 4, 2, 40)
    slopes = alibi_slopes(4)
    with torch.no_grad():
        got = attend(q, k, v, MaskSpec("flex", slopes, None, pos=pos))
        assert_close(got, attend(q, k, v, attention_bias(pos, pos, slopes, None)), **FP32)


def test_flex_refuses_to_train_on_cpu_with_a_hint():
    q, k, v = qkv(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="attn_impl"):
        attend(q, k, v, MaskSpec("flex", alibi_slopes(4), 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")
def test_flex_equals_dense_forward_and_backward_on_cuda():
    assert flex_available("cuda")
    q, k, v = (t.detach().cuda().requires_grad_() for t in qkv(2, 8, 4, 300, hd=64))
    ref = dense(q, k, v, 64)
    got = attend(q, k, v, MaskSpec("flex", alibi_slopes(8), 64))
    assert_close(got, ref, atol=1e-4, rtol=1e-4)  # TF32-free fp32 kernels still sum in another order
    for g, r in zip(grads(got, (q, k, v)), grads(ref, (q, k, v))):
        assert_close(g, r, atol=1e-4, rtol=1e-4)


def whole_model(impl: str, **over):
    torch.manual_seed(0)
    return build_model(tiny_config(attn_impl=impl, **over))


@pytest.mark.parametrize("router", ["learned", "none"])
def test_pico_banded_equals_dense_logits_and_grads(router):
    """The whole network, T (40) longer than the window (8), so the banded path really runs."""
    dense_m, banded_m = whole_model("dense", router=router), whole_model("banded", router=router)
    seq = torch.randint(0, 256, (2, 40 + 3))
    idx, targets = dense_m.make_targets(seq)
    out_d, out_b = dense_m(idx, targets), banded_m(idx, targets)
    assert_close(out_b.logits, out_d.logits, **FP32)
    out_d.loss.backward()
    out_b.loss.backward()
    for (name, p_d), p_b in zip(dense_m.named_parameters(), banded_m.parameters()):
        assert_close(p_b.grad, p_d.grad, **FP32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("router", ["learned", "spacelike"])
def test_pico_flex_forward_equals_dense_in_local_and_latent_blocks(router):
    """Causal routing pads the slots: padded slots must not change what real slots see."""
    dense_m, flex_m = whole_model("dense", router=router), whole_model("flex", router=router)
    idx = torch.randint(0, 256, (2, 40))
    idx[:, ::5] = 32  # spaces, so that the spacelike rule routes a few positions
    with torch.no_grad():
        for routing in ("topk", "causal"):
            assert_close(flex_m(idx, routing=routing).logits, dense_m(idx, routing=routing).logits, **FP32)


def test_attn_impl_auto_is_banded_on_cpu_and_a_bad_value_names_the_key():
    model = whole_model("auto")
    mask = model.local_mask(40, torch.device("cpu"), torch.float32)
    assert isinstance(mask, MaskSpec) and mask.impl == "banded"
    assert isinstance(model.local_mask(8, torch.device("cpu"), torch.float32), torch.Tensor)  # T <= window
    with pytest.raises(ValueError, match="model.attn_impl='sparse' must be one of auto, dense, banded, flex"):
        dataclasses.replace(ModelConfig(), attn_impl="sparse")
