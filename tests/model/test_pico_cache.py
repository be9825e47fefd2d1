"""The local attention mask cache stays bounded however many lengths a model meets."""

from __future__ import annotations

import torch

from pico.model import build_model
from pico.model.pico import BIAS_CACHE_SIZE

from .conftest import tiny_config


def test_bias_cache_keeps_the_most_recent_masks():
    model = build_model(tiny_config())
    cpu = torch.device("cpu")
    first = model.local_bias(3, cpu, torch.float32)
    for T in range(4, 4 + 3 * BIAS_CACHE_SIZE):
        model.local_bias(T, cpu, torch.float32)
        model.local_bias(3, cpu, torch.float32)  # used every time: never evicted
    assert len(model._bias_cache) == BIAS_CACHE_SIZE
    assert model.local_bias(3, cpu, torch.float32) is first
    assert (4, "cpu", torch.float32) not in model._bias_cache
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 17)))  # evicted lengths are rebuilt correctly
    assert torch.isfinite(out.logits).all()
