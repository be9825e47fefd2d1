"""Training throughput on CPU: 1 rank vs 2 gloo ranks, and the loader against training's demand.

    python benchmarks/bench_train.py [--steps 30] [--config quickstart]
    python benchmarks/bench_train.py --parity [--steps 60] [--repeats 2]

Side by side in one run, on shards made from ../shared/corpus/novels:
  - `pico train` bytes/s (median over log intervals, warm-up excluded) with 1 process and with
    `torchrun --nproc_per_node 2` (same per-rank batch, so 2 ranks consume twice the bytes a step);
  - the loader alone (ByteBatches, same shards, same batch shape) in bytes/s;
  - a large fp32 matmul's FLOP/s, the yardstick for CPU utilisation (MFU on CPU = model FLOP/s / it).
Prints one JSON line per measurement; writes benchmarks/results/train_throughput.json.

`--parity`: Pico (quickstart.yaml) against the plain byte Transformer of equal training FLOPs
per byte (vanilla.yaml, within 2 %), both through `pico train` with the same data, batch and
optimizer, started at the same moment as two 1-thread processes (so both see the same load),
for AdamW and for SOAP, `--repeats` times; the ratio of their median bytes/s is the throughput
parity (issue 15 asks >= 0.9). Writes benchmarks/results/train_parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "novels"


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def make_shards(tmp: Path) -> Path:
    from pico.data_prep import prepare

    out = tmp / "shards"
    prepare(inputs=[str(p) for p in sorted(CORPUS.glob("*.txt.zst"))[:12]], output=str(out), val_fraction=0.05,
            workers=2, progress=False)
    return out


def _train_cmd(shards: Path, out: Path, ranks: int, steps: int, config: str, extra: list[str] = ()):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, 2 // ranks)), WANDB_MODE="disabled")
    launcher = [sys.executable, "-m", "pico.pipeline.cli", "train"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "-m", "pico.pipeline.cli", "train"]
    cmd = launcher + ["--config", config, f"--data.train=[{shards}]", f"--train.out_dir={out}", "--no-progress",
                      f"--train.steps={steps}", "--train.log_every=5", f"--train.eval_every={steps * 10}",
                      f"--checkpoint.every={steps * 10}", "--logging.wandb_mode=disabled", "--json", *extra]
    return cmd, env


def train_rate(shards: Path, out: Path, ranks: int, steps: int, config: str) -> dict:
    cmd, env = _train_cmd(shards, out, ranks, steps, config)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return _rates(out, ranks, env)


def _rates(out: Path, ranks: int, env: dict) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["bytes_per_s"] for r in rows if "bytes_per_s" in r][1:]  # the first interval holds warm-up
    mfu = [r["mfu"] for r in rows if "mfu" in r][1:]
    return {"ranks": ranks, "bytes_per_s_median": statistics.median(rates), "intervals": len(rates),
            "mfu_vs_matmul_median": statistics.median(mfu), "threads_per_rank": int(env["OMP_NUM_THREADS"])}


def parity(shards: Path, tmp: Path, steps: int, repeats: int) -> list[dict]:
    """Pico vs vanilla bytes/s, both started at once as 1-thread processes, per optimizer and repeat."""
    rows = []
    for rep in range(repeats):
        for optim in ("adamw", "soap"):
            procs = {}
            for config in ("quickstart", "vanilla"):
                out = tmp / f"parity-{optim}-{config}-{rep}"
                cmd, env = _train_cmd(shards, out, 1, steps, config, [f"--optim.name={optim}"])
                env["OMP_NUM_THREADS"] = "1"
                procs[config] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True), out, env)
            rates = {}
            for config, (proc, out, env) in procs.items():
                _, err = proc.communicate()
                if proc.returncode != 0:
                    raise SystemExit(err[-3000:])
                rates[config] = _rates(out, 1, env)["bytes_per_s_median"]
            rows.append(emit({"what": "parity", "optim": optim, "repeat": rep, "steps": steps,
                              "pico_bytes_per_s": rates["quickstart"], "vanilla_bytes_per_s": rates["vanilla"],
                              "ratio": rates["quickstart"] / rates["vanilla"], "goal": 0.9,
                              "load_avg_1m": os.getloadavg()[0]}))
    return rows


def loader_rate(shards: Path, config: str, seconds: float = 10.0) -> float:
    from pico.configs.tree import load_config
    from pico.pipeline.data.loader import ByteBatches, resolve_shards

    cfg = load_config(config)
    loader = ByteBatches(resolve_shards([str(shards)], "train"), seq_len=cfg.data.seq_len,
                         batch_size=cfg.data.batch_size, extra=cfg.model.n_predict, seed=0,
                         shuffle_buffer=cfg.data.shuffle_buffer)
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += batch.shape[0] * cfg.data.seq_len
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--parity", action="store_true", help="Pico vs the plain Transformer at equal FLOPs per byte")
    ap.add_argument("--repeats", type=int, default=2, help="--parity: runs per optimizer")
    args = ap.parse_args()
    if args.parity:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        with tempfile.TemporaryDirectory() as tmp:
            rows = parity(make_shards(Path(tmp)), Path(tmp), args.steps, args.repeats)
        summary = {}
        for optim in ("adamw", "soap"):
            ratios = sorted(r["ratio"] for r in rows if r["optim"] == optim)
            summary[optim] = emit({"what": "parity_median", "optim": optim, "ratio_median": statistics.median(ratios),
                                   "ratios": ratios, "goal": 0.9})
        out = REPO / "benchmarks" / "results" / "train_parity.json"
        out.write_text(json.dumps({"command": f"python benchmarks/bench_train.py --parity --steps {args.steps} "
                                              f"--repeats {args.repeats}", "runs": rows, "summary": summary}, indent=1))
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from pico.pipeline.train.trainer import measure_matmul_flops

    results = {"command": f"python benchmarks/bench_train.py --steps {args.steps} --config {args.config}",
               "host_cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp)
        import torch

        torch.set_num_threads(2)
        results["matmul_fp32_flops"] = emit({"what": "matmul_fp32_2048", "flops_per_s": measure_matmul_flops(2048)})
        results["loader"] = emit({"what": "loader", "bytes_per_s": loader_rate(shards, args.config)})
        one = emit({"what": "train", **train_rate(shards, tmp / "r1", 1, args.steps, args.config)})
        two = emit({"what": "train", **train_rate(shards, tmp / "r2", 2, args.steps, args.config)})
        results["train"] = [one, two]
        results["ratios"] = emit({
            "what": "ratios",
            "two_ranks_over_one": two["bytes_per_s_median"] / one["bytes_per_s_median"],
            "loader_over_training_1rank": results["loader"]["bytes_per_s"] / one["bytes_per_s_median"],
        })
    out = REPO / "benchmarks" / "results" / "train_throughput.json"
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
