"""`pico eval`: bits per byte of a checkpoint or release, per MTP head, on shards or text files.

Bits per byte is the headline metric of a byte-level model: the mean cross-entropy of the
next-byte head in bits, over every scored byte. It is computed with *causal* routing (each
position routed by its own score, as in generation), because top-k routing over a sequence
looks at future positions; the top-k number is reported beside it as `bpb_topk`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterable

import torch

from pico.configs.errors import UserError
from pico.configs.runs import TRUST_HELP
from pico.model import make_targets
from pico.model.pico import IGNORE
from pico.pipeline import dist
from pico.pipeline.data.eval_packing import text_file_batches

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="a run directory, a checkpoint (step_NNNNNN) directory, or a release directory")
    p.add_argument("--data", nargs="+", required=True,
                   help="validation shards (directory from `pico prep`, .tar files, globs, s3:// URLs) or plain files")
    p.add_argument("--split", default="val", help="split to read from shard directories (default: val)")
    p.add_argument("--seq-len", type=int, default=0, help="bytes per sequence (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (default 0: all)")
    p.add_argument("--routing", choices=["causal", "topk"], default="causal",
                   help="causal: each byte routed by its own score, as in generation (default); topk: training routing")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object with the results on stdout")


def run(args: argparse.Namespace) -> int:
    """`pico eval`; with --json, a failure still prints one JSON object (`error`), then raises as usual."""
    try:
        return _run(args)
    except Exception as e:
        if args.json:
            print(json.dumps({"model": str(args.checkpoint), "error": str(e) or type(e).__name__}))
        raise


def _run(args: argparse.Namespace) -> int:
    from pico.pipeline.release.load import load_model

    device = dist.pick_device(args.device)
    model, info = load_model(args.checkpoint, device, trust=args.trust_checkpoint)
    seq_len = args.seq_len or model.cfg.max_seq_len
    extra = model.cfg.n_predict
    is_shards = all(str(d).startswith("s3://") or d.endswith(".tar") or Path(d).is_dir() or "*" in d for d in args.data)
    if is_shards:
        from pico.pipeline.data.loader import eval_sequences, resolve_shards

        try:
            shards = resolve_shards(list(args.data), args.split)
        except UserError as e:
            raise UserError(f"{e}. Choose the split with --split (train or val); `pico prep` writes val shards "
                            "when --val-fraction > 0") from None
        batches = eval_sequences(shards, seq_len=seq_len, extra=extra, batch_size=args.batch_size, rank=0,
                                 world_size=1, max_batches=args.max_batches or None)
    else:
        files = [Path(d) for d in args.data]
        for f in files:
            if not f.is_file():
                raise UserError(f"--data {f}: no such file, shard directory or .tar")
        batches = text_file_batches(files, seq_len, extra, args.batch_size, max_batches=args.max_batches or None)
    result = evaluate(model, batches, device, routing=args.routing)
    result = {"model": str(args.checkpoint), "source": info.get("kind"), "routing": args.routing, **result}
    if args.json:  # a head with nothing to score (a 1-byte file) is null: NaN is not JSON
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                          for k, v in result.items()}, allow_nan=False))
    else:
        print(f"bits per byte: {result['bpb']:.4f} over {result['bytes']:,} bytes "
              f"({args.routing} routing)", file=sys.stderr)
        for h in range(1, extra + 1):
            v = result[f"bpb_head{h}"]
            shown = f"{v:.4f} bpb" if math.isfinite(v) else f"no byte t+{h} to score"
            print(f"  head {h} (byte t+{h}): {shown}", file=sys.stderr)
    return 0
