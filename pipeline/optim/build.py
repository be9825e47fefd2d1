"""The optimizer plugin point: `build_optimizer` turns `OptimConfig` into a torch optimizer, and
`lr_at` gives the learning rate of each step (the trainer writes it into every param group).

    opt = build_optimizer(model.named_parameters(), cfg.optim)
    for step in range(total):
        set_lr(opt, lr_at(step, cfg.optim, total))

Both optimizers decay only tensors of two or more dimensions: norms' gains, biases and other
1-D parameters are left undecayed (nanoGPT's rule). Named parameters are also grouped by stage
(`pico.model.pico.param_stage`: local, latent, router), each group carrying its stage's
`lr_scale` (optim.lr_scale_local, lr_scale_latent, lr_scale_router) that `set_lr` multiplies
into the schedule's LR (H-Net trains its outer, byte-level stages at higher LRs). Both
optimizers take any number of groups; under DeepSpeed ZeRO 1-2 a client optimizer's groups are
kept, each flattened into its own partition, so the scale travels with the group.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from pico.configs.tree import OptimConfig
from pico.model.pico import STAGES, param_stage
from pico.pipeline.optim.soap import SOAP


def param_groups(params_or_named_params: Iterable[Any], weight_decay: float,
                 lr_scales: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Groups of the trainable parameters: per stage (local, latent, router; named parameters
    only), decayed (>= 2-D) then undecayed (< 2-D), each with its stage's "lr_scale".

    Accepts parameters or (name, parameter) pairs; pairs are kept as they are, so torch records
    the names as each group's "param_names". Plain parameters have no stage: they form the local
    groups, and a scale other than 1 for another stage is refused. Empty groups are dropped."""
    scales = {s: 1.0 for s in STAGES} | (lr_scales or {})
    by_stage: dict[str, tuple[list[Any], list[Any]]] = {s: ([], []) for s in STAGES}
    named = None
    for item in params_or_named_params:
        is_pair = isinstance(item, tuple)
        named = is_pair if named is None else named
        p = item[1] if is_pair else item
        if p.requires_grad:
            decay, no_decay = by_stage[param_stage(item[0]) if is_pair else "local"]
            (decay if p.ndim >= 2 else no_decay).append(item)
    if named is False and any(scales[s] != 1.0 for s in STAGES if s != "local"):
        raise ValueError("param_groups: per-stage LR scales need (name, parameter) pairs (model.named_parameters())")
    groups = [{"params": params, "weight_decay": wd, "lr_scale": scales[stage], "pico_stage": stage}
              for stage, (decay, no_decay) in by_stage.items()
              for params, wd in ((decay, weight_decay), (no_decay, 0.0))]
    return [g for g in groups if g["params"]]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write the schedule's LR into every param group, times the group's stage scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(params_or_named_params: Iterable[Any], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (torch's, no fused DeepSpeed ops) or SOAP, from the optim section of the config."""
    groups = param_groups(params_or_named_params, cfg.weight_decay,
                          {"local": cfg.lr_scale_local, "latent": cfg.lr_scale_latent, "router": cfg.lr_scale_router})
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters (all have requires_grad=False)")
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
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
