"""The optimizer plugin point: `build_optimizer` turns `OptimConfig` into a torch optimizer, and
`lr_at` gives the learning rate of each step (the trainer writes it into every param group).

    opt = build_optimizer(model.named_parameters(), cfg.optim)
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim, total)

Both optimizers decay only tensors of two or more dimensions: norms' gains, biases and other
1-D parameters are left undecayed (nanoGPT's rule).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from pico.configs.tree import OptimConfig
from pico.pipeline.optim.soap import SOAP


def param_groups(params_or_named_params: Iterable[Any], weight_decay: float) -> list[dict[str, Any]]:
    """Two groups, decayed (>= 2-D) and undecayed (< 2-D), of the trainable parameters.

    Accepts parameters or (name, parameter) pairs; pairs are kept as they are, so torch records
    the names as each group's "param_names". Empty groups are dropped."""
    decay: list[Any] = []
    no_decay: list[Any] = []
    for item in params_or_named_params:
        p = item[1] if isinstance(item, tuple) else item
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(item)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(params_or_named_params: Iterable[Any], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (torch's, no fused DeepSpeed ops) or SOAP, from the optim section of the config."""
    groups = param_groups(params_or_named_params, cfg.weight_decay)
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters (all have requires_grad=False)")
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "soap":
        return SOAP(groups, lr=cfg.lr, betas=betas, shampoo_beta=cfg.shampoo_beta, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, precondition_frequency=cfg.precondition_frequency,
                    max_precond_dim=cfg.max_precond_dim, merge_dims=cfg.merge_dims,
                    precondition_1d=cfg.precondition_1d)
    raise ValueError(f"optim.name={cfg.name!r} is not valid; choose adamw or soap")


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) in a run of `total_steps` steps.

    Warmup rises linearly to cfg.lr, reaching it at step warmup_steps - 1 (step 0 already
    trains). Then: cosine decays to lr * min_lr_ratio at total_steps; wsd holds lr until the last
    decay_fraction of the run and decays linearly to the same floor at total_steps; constant
    holds lr. Steps past total_steps stay at the floor."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = max(0, cfg.warmup_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = max(warmup, total_steps - round(cfg.decay_fraction * total_steps))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return peak + (floor - peak) * progress
