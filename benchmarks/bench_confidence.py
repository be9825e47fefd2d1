"""Chains cut by draft confidence vs the full chain, side by side on the same held-out prompts (CPU, batch 1).

    OMP_NUM_THREADS=1 python benchmarks/bench_confidence.py --model /tmp/spec31/qs4 --model /tmp/spec31/qs8 \
        --shards /tmp/spec31/shards

`generate(draft_confidence=C)` feeds only the drafts whose running product of the draft heads' top
probabilities is >= C (exact for any C). Per model and kind of text (4 held-out prompts of 200, 500,
1000 and 2000 bytes, 320 bytes generated from each), greedy and sampled (T 0.8, top-p 0.95, seed 0)
at each C, interleaved, median of --repeats; one JSON line per measurement, all of them to
benchmarks/results/generate_confidence.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench_generate import REPO, SAMPLING, held_out, make_prompts
from pico.model.generate import generate

GRID = {"greedy": ({}, [0.0, 0.1, 0.3]), "sampled": (SAMPLING, [0.0, 0.1, 0.2, 0.3])}


def main() -> None:
    from pico.pipeline.release.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="release or checkpoint directory (repeat)")
    ap.add_argument("--shards", required=True, help="shards whose val split holds the prompts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/generate_confidence.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    docs = held_out(args.shards)
    lines = []
    for path in args.model:
        model, _ = load_model(path, "cpu")
        for kind in ("prose", "code"):
            prompts = make_prompts(docs[kind], 4, 4000, [200, 500, 1000, 2000])
            times: dict[tuple, list[float]] = {}
            bpp, outs = {}, {}
            for _ in range(args.repeats):
                for mode, (kw, grid) in GRID.items():
                    for c in grid:
                        runs = [generate(model, [p], 320, stop_at_eos=False, routing_agreement=False,
                                         draft_confidence=c, **kw) for p in prompts]
                        times.setdefault((mode, c), []).append(sum(r.seconds for r in runs))
                        bpp[(mode, c)] = sum(r.bytes_per_pass for r in runs) / len(runs)
                        outs[(mode, c)] = [r.outputs[0] for r in runs]
            for (mode, c), ts in times.items():
                row = {"model": Path(path).name, "text": kind, "mode": mode, "draft_confidence": c,
                       "seconds_median": round(statistics.median(ts), 3),
                       "speedup_vs_full_chain": round(statistics.median(times[(mode, 0.0)]) / statistics.median(ts), 3),
                       "bytes_per_pass": round(bpp[(mode, c)], 3),
                       "identical_to_full_chain": outs[(mode, c)] == outs[(mode, 0.0)] if mode == "greedy" else None}
                lines.append(json.dumps(row))
                print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
