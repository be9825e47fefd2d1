"""Where a training step's time goes: Pico vs a plain byte Transformer at equal FLOPs per byte.

    OMP_NUM_THREADS=1 python benchmarks/bench_step.py [--batch 8 --seq 512 --repeats 3]

The models of bench_model.py (the default Pico; `none`, 6 local blocks with window = seq, its
width matched to Pico's training FLOPs per byte), plus Pico with `model.attn_impl=dense` to show
what banded attention changed. For AdamW and SOAP (the pipeline's `build_optimizer`, default
optim section), one step split into forward + backward and optimizer step (+ zero_grad), in
interleaved rounds on the same batch, medians of the repeats; no DeepSpeed, loader or logging,
so the rest of a `pico train` step is what the trainer adds. One JSON line per measurement, one
comparison line per optimizer; writes benchmarks/results/step_time.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import configs, text_bytes  # noqa: E402  (the same models and bytes)

from pico.configs.tree import OptimConfig  # noqa: E402
from pico.model import build_model, flops_per_byte, make_targets, param_count  # noqa: E402
from pico.pipeline.optim.build import build_optimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    base = configs(args.seq)
    cfgs = {"pico": base["pico"], "pico_dense_attn": dataclasses.replace(base["pico"], attn_impl="dense"),
            "none": base["none"]}
    seq = text_bytes(args.batch * (args.seq + base["pico"].n_predict)).view(args.batch, -1)
    idx, targets = make_targets(seq, base["pico"].n_predict)
    rows, compares = [], []
    for opt in ("adamw", "soap"):
        torch.manual_seed(0)
        models = {n: build_model(c) for n, c in cfgs.items()}
        optims = {n: build_optimizer(list(m.named_parameters()), OptimConfig(name=opt)) for n, m in models.items()}
        times = {n: ([], []) for n in models}
        for r in range(1 + args.repeats):  # round 0 warms up; interleaved so that load hits all alike
            for n, m in models.items():
                t0 = time.perf_counter()
                m(idx, targets, return_logits=False, with_stats=False).loss.backward()
                t1 = time.perf_counter()
                optims[n].step()
                optims[n].zero_grad(set_to_none=True)
                if r:
                    times[n][0].append(t1 - t0)
                    times[n][1].append(time.perf_counter() - t1)
        by = {}
        for n, c in cfgs.items():
            fb, st = statistics.median(times[n][0]), statistics.median(times[n][1])
            by[n] = row = {"optim": opt, "model": n, "router": c.router, "attn_impl": c.attn_impl, "d_local": c.d_local,
                           "window": c.window, "params": param_count(c), "train_flops_per_byte": flops_per_byte(c),
                           "batch": args.batch, "seq": args.seq, "fwd_bwd_s": fb, "optim_step_s": st,
                           "optim_share": st / (fb + st), "bytes_per_s": args.batch * args.seq / (fb + st)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        cmp = {"compare": "pico_vs_none", "optim": opt,
               "bytes_per_s_ratio": by["pico"]["bytes_per_s"] / by["none"]["bytes_per_s"],
               "bytes_per_s_ratio_dense_attn": by["pico_dense_attn"]["bytes_per_s"] / by["none"]["bytes_per_s"],
               "fwd_bwd_ratio": by["none"]["fwd_bwd_s"] / by["pico"]["fwd_bwd_s"],
               "optim_step_ratio": by["none"]["optim_step_s"] / by["pico"]["optim_step_s"], "goal": ">= 0.9"}
        print(json.dumps(cmp), flush=True)
        compares.append(cmp)
    meta = {"command": "OMP_NUM_THREADS=1 python benchmarks/bench_step.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_avg_after": os.getloadavg()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"measurements": rows, "comparisons": compares, **meta}, indent=2) + "\n")
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
