"""Pico, the network: byte-level local blocks, a learned Mixture-of-Depths router into wider
latent blocks, multi-token-prediction heads, and the spacelike and plain baselines.

    from pico.model import build_model, make_targets
    model = build_model(cfg.model)
    idx, targets = make_targets(seq, cfg.model.n_predict)
    out = model(idx, targets)          # out.loss, out.head_losses, out.stats, out.routed
"""

from pico.model.config import BOS, EOS, PAD, VOCAB_SIZE, ModelConfig
from pico.model.flops import flops_breakdown, flops_per_byte, match_flops, param_count
from pico.model.pico import ModelOutput, Pico, Routing, build_model, make_targets
from pico.model.spacelike import is_spacelike, spacelike_boundaries

__all__ = [
    "BOS", "EOS", "PAD", "VOCAB_SIZE", "ModelConfig", "ModelOutput", "Pico", "Routing", "build_model",
    "flops_breakdown", "flops_per_byte", "is_spacelike", "match_flops", "make_targets", "param_count", "spacelike_boundaries",
]
