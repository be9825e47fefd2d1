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

    from pico.pipeline.release.load import check_model_config

    parts = flops_breakdown(check_model_config(model_cfg))
    extra = {}
    rates = flops_at_rate(model_cfg)
    if rates["at_cap"] != rates["at_capacity"]:  # a learned boundary rate: the cost ranges up to the cap
        from pico.model.routers.base import router_class

        extra["train_flops_per_byte_at_cap"] = rates["at_cap"]
        extra["max_routed_frac"] = router_class(model_cfg).max_rate(model_cfg)
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
        print(f"  at the routing cap       {info['train_flops_per_byte_at_cap']:.4g}   (every sequence routing "
              f"{info['max_routed_frac']:g} of its bytes; above: at model.capacity, the rate its router aims at)")
    print(f"inference FLOPs / byte    {info['inference_flops_per_byte']:.4g}   (forward, all heads)")
    for part, v in info["forward_flops_per_byte_by_part"].items():
        print(f"  forward, {part:<15} {v:.4g}")
    print(f"counted at seq_len {info['seq_len']} (model.max_seq_len)", file=sys.stderr)
    return 0
