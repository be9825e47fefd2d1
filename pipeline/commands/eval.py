"""`pico eval`: bits per byte of a checkpoint or release, per MTP head, on shards or text files.

Scored with causal routing by default (each position routed by its own score, as in generation);
the numbers are `pico.pipeline.eval.evaluate`'s, the same function training's validation calls.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pico.configs.errors import UserError
from pico.configs.files import strict_json
from pico.configs.runs import TRUST_HELP
from pico.pipeline import dist
from pico.pipeline.data.eval_packing import text_file_batches
from pico.pipeline.eval.evaluate import evaluate


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

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 0),
                             ("--max-batches", args.max_batches, 0)):
        if value < low:
            raise UserError(f"{flag} {value}: must be >= {low}")
    device = dist.pick_device(args.device, "--device")
    model, info = load_model(args.checkpoint, device, trust=args.trust_checkpoint)
    if args.seq_len > model.cfg.max_seq_len:
        raise UserError(f"--seq-len {args.seq_len} is longer than the model's context (max_seq_len="
                        f"{model.cfg.max_seq_len}); use at most that, or leave it out")
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
        print(strict_json(result))
    else:
        print(f"bits per byte: {result['bpb']:.4f} over {result['bytes']:,} bytes "
              f"({args.routing} routing)", file=sys.stderr)
        for h in range(1, extra + 1):
            v = result[f"bpb_head{h}"]
            shown = f"{v:.4f} bpb" if math.isfinite(v) else f"no byte t+{h} to score"
            print(f"  head {h} (byte t+{h}): {shown}", file=sys.stderr)
    return 0
