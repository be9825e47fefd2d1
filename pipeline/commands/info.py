"""`pico info`: parameter count and FLOPs per byte of a config, for matching models at equal compute.

    pico info --config configs/quickstart.yaml --model.router=none --model.n_in=4 --json

Nothing is built or trained: the counts come from the model config alone (`pico.model.flops`).
"""

from __future__ import annotations

import argparse
import json
import sys

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico info`."""
    parser.add_argument("--config", default=None,
                        help="YAML config (a path, or the name of a packaged config such as quickstart); "
                             "default: the built-in defaults")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def describe(model_cfg) -> dict:
    """Parameter count and FLOPs per byte (training, inference, forward by part) of a ModelConfig."""
    from pico.model import flops_breakdown, flops_per_byte, param_count
    from pico.model.flops import flops_at_rate

    parts = flops_breakdown(model_cfg)
    extra = {}
    if model_cfg.router == "chunk":  # a learned boundary rate: the cost ranges up to the cap
        extra["train_flops_per_byte_at_cap"] = flops_at_rate(model_cfg)["at_cap"]
        extra["chunk_cap"] = model_cfg.chunk_cap
    return {
        "router": model_cfg.router,
        "params": param_count(model_cfg),
        "train_flops_per_byte": flops_per_byte(model_cfg, training=True),
        "inference_flops_per_byte": flops_per_byte(model_cfg, training=False),
        "forward_flops_per_byte_by_part": {k: v for k, v in parts.items() if k != "total"},
        "seq_len": model_cfg.max_seq_len,
        **extra,
    }


def run(args: argparse.Namespace) -> int:
    from pico.configs.tree import load_config

    cfg = load_config(args.config, getattr(args, "overrides", []))
    info = describe(cfg.model)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"router                    {info['router']}")
    print(f"parameters                {info['params']:,}")
    print(f"training FLOPs / byte     {info['train_flops_per_byte']:.4g}   (3 x forward)")
    if "train_flops_per_byte_at_cap" in info:
        print(f"  at the chunk cap         {info['train_flops_per_byte_at_cap']:.4g}   (every sequence routing "
              f"model.chunk_cap={info['chunk_cap']:g} of its bytes; above: at model.capacity, the ratio loss's target)")
    print(f"inference FLOPs / byte    {info['inference_flops_per_byte']:.4g}   (forward, all heads)")
    for part, v in info["forward_flops_per_byte_by_part"].items():
        print(f"  forward, {part:<15} {v:.4g}")
    print(f"counted at seq_len {info['seq_len']} (model.max_seq_len)", file=sys.stderr)
    return 0
