"""FLOP and parameter accounting against a hand count and against the built model."""

from __future__ import annotations

import pytest

from pico.model import ModelConfig, build_model, flops_breakdown, flops_per_byte, param_count

from .conftest import tiny_config

HAND = ModelConfig(d_local=64, n_heads=2, n_kv_heads=1, window=4, n_in=1, n_out=1, d_latent=128, n_latent=1,
                   n_latent_heads=2, n_latent_kv_heads=2, mlp_ratio=1.0, capacity=0.25, n_predict=2,
                   mtp_mlp_ratio=1.0, max_seq_len=8)


def test_flops_match_a_hand_count():
    # local block, width 64, head_dim 32: q + k + v = 64 * (2 + 1 + 1) * 32, out 64 * 64, SwiGLU 3 * 64 * 64;
    # keys seen over T = 8 with window 4: (1 + 2 + 3 + 4 * 5) / 8 = 3.25; QK and AV: 2 * 64 * 3.25
    local = 64 * 128 + 64 * 64 + 3 * 64 * 64 + 2 * 64 * 3.25
    assert local == 24992
    # latent: k = ceil(0.25 * 8) = 2 routed of 8 bytes; projections 2 * 64 * 128; block width 128, head_dim 64:
    # q + k + v = 128 * 6 * 64, out 128 * 128, SwiGLU 3 * 128 * 128, keys (2 + 1) / 2 = 1.5
    latent_block = 128 * 384 + 128 * 128 + 3 * 128 * 128 + 2 * 128 * 1.5
    latent = (2 * 64 * 128 + latent_block) * 2 / 8
    # heads: two unembeddings 64 * 259 and the draft head's SwiGLU 3 * 64 * 64; the router: 64
    heads = 2 * 64 * 259 + 3 * 64 * 64
    macs = 2 * local + 64 + latent + heads
    assert macs == 128352
    parts = flops_breakdown(HAND)
    assert parts["local"] == 2 * 2 * local and parts["latent"] == 2 * latent and parts["heads"] == 2 * heads
    assert flops_per_byte(HAND, training=False) == 2 * macs
    assert flops_per_byte(HAND) == 3 * 2 * macs
    assert build_model(HAND).flops_per_byte() == 3 * 2 * macs


def test_spacelike_costs_the_same_as_learned_and_none_drops_the_latent_path():
    learned = flops_per_byte(HAND)
    spacelike = flops_per_byte(ModelConfig(**{**HAND.__dict__, "router": "spacelike"}))
    none = ModelConfig(**{**HAND.__dict__, "router": "none"})
    assert spacelike == learned - 3 * 2 * 64  # no router scores
    assert flops_per_byte(none) == 3 * 2 * (2 * 24992 + 2 * 64 * 259 + 3 * 64 * 64)


@pytest.mark.parametrize("over", [{}, {"router": "spacelike"}, {"router": "none"}, {"n_predict": 1},
                                  {"router_prior": 4.0}, {"router": "chunk"}, {"router": "entropy"},
                                  {"mlp_ratio": 3.0, "mtp_mlp_ratio": 0.5, "n_latent": 3}])
def test_param_count_matches_the_built_model(over):
    cfg = tiny_config(**over)
    assert param_count(cfg) == sum(p.numel() for p in build_model(cfg).parameters())
