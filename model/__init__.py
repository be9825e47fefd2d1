"""Pico, the network: byte-level local blocks, a router (SpaceByte's rule by default, or a learned
one) into wider latent blocks, multi-token-prediction heads; tensors only, no files or ranks.

    from pico.model import build_model, make_targets
    model = build_model(cfg.model)
    idx, targets = make_targets(seq, cfg.model.n_predict)
    out = model(idx, targets)          # out.loss, out.head_losses, out.stats, out.routed

    config.py     ModelConfig (torch-free), byte ids, width rules, retired options
    layers.py     RMSNorm, grouped-query ALiBi attention, SwiGLU, Block
    attention.py  the attention contract and its dense / banded / flex implementations
    routers/      one file per router behind one protocol (base.py), found by name: model.router
    latent.py     the latent stack and the return paths (add, dechunk), full sequence and one step
    pico.py       the network: trunk (whole sequences) and step (decoding), heads, loss
    spacelike.py  SpaceByte's routing rule
    generate.py   caches, commit/rollback, self-speculative decoding, sampling
    flops.py      FLOPs per byte and parameter counts from a config (torch-free to import)
"""

import importlib

# Each name is imported from its module on first use, so that `pico.model.config` and
# `pico.model.flops` (torch-free) load without torch: cluster/ and configs/ import them on
# machines that only submit jobs.
_HOME = {
    "BOS": "config", "EOS": "config", "PAD": "config", "VOCAB_SIZE": "config", "ModelConfig": "config",
    "flops_breakdown": "flops", "flops_per_byte": "flops", "match_flops": "flops", "param_count": "flops",
    "ModelOutput": "pico", "Pico": "pico", "Routing": "routers.base", "build_model": "pico", "make_targets": "pico",
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
