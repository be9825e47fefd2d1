"""Bits per byte of a model, per MTP head, over batches of byte sequences (the `pico eval` command is
pipeline/commands/eval.py; training's validation calls `evaluate` too).

Bits per byte is the headline metric of a byte-level model: the mean cross-entropy of the
next-byte head in bits, over every scored byte. It is computed with *causal* routing (each
position routed by its own score, as in generation), because top-k routing over a sequence
looks at future positions; the top-k number is reported beside it as `bpb_topk`.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from pico.configs.errors import UserError
from pico.model import make_targets
from pico.model.pico import IGNORE
from pico.pipeline import dist

LN2 = math.log(2.0)


@torch.no_grad()
def evaluate(model, batches: Iterable, device: torch.device, routing: str = "causal",
             autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Sum cross-entropy over every valid target of every head, across ranks; return bits per byte.

    `batches` yields (B, T + n_predict) byte-id tensors, or (tensor, n_valid) pairs from the one
    packer (pico.pipeline.data.eval_packing); PAD targets are skipped (make_targets masks them)."""
    was_training = model.training
    model.eval()
    n_predict = model.cfg.n_predict
    sums = torch.zeros(n_predict, dtype=torch.float64)
    counts = torch.zeros(n_predict, dtype=torch.float64)
    stat_sums: dict[str, float] = {}
    n_batches = 0
    try:
        for item in batches:
            batch = item[0] if isinstance(item, (tuple, list)) else item
            idx, tgt = make_targets(batch.to(device), n_predict)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(idx, tgt, routing=routing, return_logits=False)
            valid = (tgt != IGNORE).sum(dim=(0, 1)).double().cpu()
            # a head with no valid target here (a rank's all-PAD last batch) has a NaN mean: it adds nothing
            sums += torch.where(valid > 0, out.head_losses.detach().double().cpu() * valid, 0.0)
            counts += valid
            if valid[0] > 0:  # router statistics of real bytes only, not of an all-PAD batch
                for k, v in (out.stats or {}).items():
                    stat_sums[k] = stat_sums.get(k, 0.0) + float(v)
                n_batches += 1
    finally:
        model.train(was_training)
    sums = dist.all_reduce_sum(sums)
    counts = dist.all_reduce_sum(counts)
    if counts[0] == 0:
        raise UserError("evaluation saw no bytes: the validation data is empty")
    result = {"bpb": float(sums[0] / counts[0] / LN2), "bytes": int(counts[0])}
    for h in range(n_predict):
        result[f"bpb_head{h + 1}"] = float(sums[h] / counts[h] / LN2) if counts[h] > 0 else float("nan")
    for k, v in stat_sums.items():
        result[f"router/{k}"] = v / max(1, n_batches)
    return result
