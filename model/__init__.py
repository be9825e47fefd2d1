"""Pico, the network: byte-level local blocks, a learned Mixture-of-Depths router into wider
latent blocks, multi-token-prediction heads, and the spacelike and plain baselines.

    from pico.model import build_model, make_targets
    model = build_model(cfg.model)
    idx, targets = make_targets(seq, cfg.model.n_predict)
    out = model(idx, targets)          # out.loss, out.head_losses, out.stats, out.routed
"""

import importlib

# Each name is imported from its module on first use, so that `pico.model.config` and
# `pico.model.flops` (torch-free) load without torch: cluster/ and configs/ import them on
# machines that only submit jobs.
_HOME = {
    "BOS": "config", "EOS": "config", "PAD": "config", "VOCAB_SIZE": "config", "ModelConfig": "config",
    "flops_breakdown": "flops", "flops_per_byte": "flops", "match_flops": "flops", "param_count": "flops",
    "ModelOutput": "pico", "Pico": "pico", "Routing": "pico", "build_model": "pico", "make_targets": "pico",
    "is_spacelike": "spacelike", "spacelike_boundaries": "spacelike",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'pico.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pico.model.{_HOME[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))

__all__ = [
    "BOS", "EOS", "PAD", "VOCAB_SIZE", "ModelConfig", "ModelOutput", "Pico", "Routing", "build_model",
    "flops_breakdown", "flops_per_byte", "is_spacelike", "match_flops", "make_targets", "param_count", "spacelike_boundaries",
]
