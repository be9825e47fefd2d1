"""Tiny model configs shared by the model tests (small enough for a few milliseconds per forward)."""

from __future__ import annotations

import pytest
import torch

from pico.model import ModelConfig


def tiny_config(**over) -> ModelConfig:
    """A small Pico: 2 + 2 local blocks of width 32, one latent block of width 64, 3 heads."""
    base = dict(d_local=32, n_heads=4, n_kv_heads=2, window=8, n_in=2, n_out=2, d_latent=64, n_latent=1,
                n_latent_heads=4, n_latent_kv_heads=2, capacity=0.25, n_predict=3, max_seq_len=64)
    base.update(over)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@torch.no_grad()
def route_about_half(model, ids: torch.Tensor) -> None:
    """Make a random entropy router route about half of the bytes of ids causally: its cut-off at the median
    entropy of its own early head on the router input (the stream after the n_in blocks)."""
    x = model.embed(ids)
    bias = model.local_bias(ids.shape[1], x.device, x.dtype)
    for blk in model.blocks_in:
        x = blk(x, bias)
    model.router.cutoff.fill_(model.router.entropy(x)[1].median())
