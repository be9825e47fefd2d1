"""Training throughput of Pico vs a plain byte Transformer at the same training FLOPs per byte.

    nice python benchmarks/bench_model.py [--batch 8 --seq 512 --repeats 5 --threads 0]

Forward + backward bytes/s on CPU (or the GPU with --device cuda) of three models side by side
in one run, measured in interleaved rounds so that load from other processes hits all alike:

- `pico`: the default ModelConfig (learned router, capacity 0.2, 2 + 2 local blocks of 256,
  2 latent blocks of 512, 4 MTP heads);
- `spacelike`: the same network routed by SpaceByte's rule (same FLOPs by construction);
- `none`: a plain byte Transformer of 6 local blocks, window = seq, whose width is chosen with
  `match_flops` so that its training FLOPs per byte match Pico's.

One JSON line per measurement (median of the repeats), then one comparison line; everything is
also written to benchmarks/results/model_throughput.json. The goal of the model issue is
pico / none >= 0.9 in bytes/s, i.e. the gather and scatter must not eat the FLOP savings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pico.model import ModelConfig, build_model, flops_per_byte, make_targets, match_flops, param_count

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "novels"
RESULTS = Path(__file__).resolve().parent / "results" / "model_throughput.json"


def text_bytes(n: int) -> torch.Tensor:
    """n bytes of English prose from the shared corpus (random bytes when it is absent)."""
    files = sorted(CORPUS.glob("*.txt.zst")) if CORPUS.exists() else []
    if not files:
        return torch.randint(0, 256, (n,))
    import zstandard

    data = zstandard.ZstdDecompressor().stream_reader(files[0].open("rb")).read(n + 10_000)[10_000:]
    return torch.tensor(list(data[:n]))


def configs(seq: int) -> dict[str, ModelConfig]:
    pico = ModelConfig(max_seq_len=seq)
    none = dataclasses.replace(pico, router="none", n_in=3, n_out=3, window=seq)
    none = match_flops(none, flops_per_byte(pico), "d_local", range(64, 513, 8))
    return {"pico": pico, "spacelike": dataclasses.replace(pico, router="spacelike"), "none": none}


def step_seconds(model, idx, targets) -> float:
    t0 = time.perf_counter()
    out = model(idx, targets, return_logits=False)
    out.loss.backward()
    if idx.is_cuda:
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); 1 keeps a shared machine's load from stalling OpenMP")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfgs = configs(args.seq)
    n_predict = cfgs["pico"].n_predict
    seq = text_bytes(args.batch * (args.seq + n_predict)).view(args.batch, -1).to(args.device)
    idx, targets = make_targets(seq, n_predict)
    models = {name: build_model(c).to(args.device) for name, c in cfgs.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.warmup + args.repeats):
        for name, model in models.items():  # interleaved: background load hits every model alike
            s = step_seconds(model, idx, targets)
            if r >= args.warmup:
                times[name].append(s)

    rows = []
    for name, c in cfgs.items():
        med = statistics.median(times[name])
        row = {"model": name, "router": c.router, "d_local": c.d_local, "local_blocks": c.n_in + c.n_out,
               "window": c.window, "params": param_count(c), "train_flops_per_byte": flops_per_byte(c),
               "batch": args.batch, "seq": args.seq, "device": args.device,
               "bytes_per_s": args.batch * args.seq / med, "step_s_median": med,
               "step_s_all": [round(t, 4) for t in times[name]]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    by = {r["model"]: r for r in rows}
    compare = {
        "compare": "pico_vs_none",
        "bytes_per_s_ratio": by["pico"]["bytes_per_s"] / by["none"]["bytes_per_s"],
        "flops_ratio": by["pico"]["train_flops_per_byte"] / by["none"]["train_flops_per_byte"],
        "spacelike_vs_none_bytes_per_s_ratio": by["spacelike"]["bytes_per_s"] / by["none"]["bytes_per_s"],
        "goal": ">= 0.9",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "command": "python benchmarks/bench_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(compare), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"measurements": rows, "comparison": compare}, indent=2) + "\n")
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
