"""SOAP vs AdamW on Pico at quickstart size, side by side, through the real trainer.

    python benchmarks/bench_soap.py                      # ~15 CPU minutes
    python benchmarks/bench_soap.py --steps 60 --soap-lrs 3e-3 --adamw-lrs 3e-3   # a smoke run

1. Shards: ../shared/corpus cut into ~4 KB pieces in a seeded random order (see
   `mixed_corpus`), then `pico prep` into a scratch directory (reused when present).
2. Training: `pico train --config configs/quickstart.yaml` for each optimizer and learning
   rate of a small sweep, same seed, data order and schedule; validation bits per byte every
   `--eval-every` steps. The best learning rate of each optimizer is the one with the lowest
   final validation bpb; AdamW's best final bpb is the target, and SOAP's steps to reach it
   are read off its validation curve (linear between evaluations).
3. Time per step: the trainer's own throughput (evaluation and checkpoints excluded), and
   the optimizer step alone on Pico's real gradients.
4. Optimizer state per rank with 1 and 2 gloo ranks, through DeepSpeed at ZeRO stage 0.

One JSON line per measurement on stdout; everything lands in benchmarks/results/soap_*.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CORPUS = REPO.parent / "shared" / "corpus"
CODE_COMMIT = ""
SNAPSHOT: Path | None = None  # the pinned source tree every run imports (see snapshot())


def snapshot(scratch: Path) -> tuple[Path, str]:
    """`git archive HEAD` of the packages into scratch/src-<commit>/pico, so every run of one
    benchmark imports the same code even while others commit to the checkout."""
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()[:12]
    root = scratch / f"src-{sha}"
    if not (root / "pico" / "configs" / "quickstart.yaml").exists():
        shutil.rmtree(root, ignore_errors=True)
        (root / "pico").mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "HEAD", "model", "pipeline", "configs", "data_prep", "cluster"],
                                 cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root / "pico")], input=archive, check=True)
    return root, sha


def emit(record: dict, sink: list[dict]) -> None:
    record = {"bench": record.pop("bench"), "commit": CODE_COMMIT, **record}
    sink.append(record)
    print(json.dumps(record), flush=True)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")  # a shared machine: one core per process
    e.setdefault("DS_ACCELERATOR", "cpu")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pico-torch-extensions"))
    e["WANDB_MODE"] = "disabled"
    if SNAPSHOT is not None:
        e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SNAPSHOT), e.get("PYTHONPATH", "")]))
    return e


def mixed_corpus(path: Path, chunk_chars: int = 4000, seed: int = 0) -> Path:
    """The sample corpus cut into ~4 KB pieces, in one seeded random order, as JSON Lines.

    The corpus arrives grouped by source (novels, then docs, then code) and a novel is 600 KB,
    while a quickstart run sees ~300 KB in all: fed as is, a short run trains on one novel and
    its validation bpb (on a mix of all sources) rises as it specialises. Pieces in random
    order make the stream and the validation split the same distribution, so a loss curve
    measures the optimizer rather than the data order."""
    import gzip
    import random

    import zstandard

    if path.exists():
        return path
    texts = []
    for f in sorted((CORPUS / "novels").glob("*.txt.zst")):
        texts.append(zstandard.ZstdDecompressor().stream_reader(f.open("rb")).read().decode("utf-8", "replace"))
    for f, opener in ((CORPUS / "python-docs.jsonl.gz", gzip.open),
                      (CORPUS / "sympy-code.jsonl.zst", lambda p: zstandard.ZstdDecompressor().stream_reader(open(p, "rb")))):
        with opener(f) as fh:
            texts += [json.loads(line)["text"] for line in fh.read().decode("utf-8").splitlines() if line.strip()]
    pieces = [t[i: i + chunk_chars] for t in texts for i in range(0, len(t), chunk_chars)]
    random.Random(seed).shuffle(pieces)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(pieces)))
    os.replace(tmp, path)
    return path


def prepare_shards(scratch: Path) -> Path:
    shards = scratch / "shards-mixed"
    if (shards / "manifest.json").exists():
        return shards
    source = mixed_corpus(scratch / "mixed.jsonl")
    subprocess.run([sys.executable, "-m", "pico.pipeline.cli", "prep", "--input", str(source), "--output",
                    str(shards), "--workers", "1", "--shard-bytes", "16M", "--no-progress"],
                   check=True, env=env(), cwd=REPO)
    return shards


def train(name: str, lr: float, args, shards: Path, scratch: Path) -> list[dict]:
    """One `pico train` run; returns its metrics.jsonl records. A finished run with the same
    optimizer, lr and length is reused unless --fresh (delete its directory to redo one)."""
    out = scratch / "runs" / args.sha / f"{name}_lr{lr:g}_steps{args.steps}"
    metrics = out / "metrics.jsonl"
    if not args.fresh and metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if any(r.get("step") == args.steps and "val/bpb" in r for r in records):
            return records
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pico.pipeline.cli", "train", "--config", "quickstart", "--no-progress",
           f"--optim.name={name}", f"--optim.lr={lr}", f"--train.steps={args.steps}",
           f"--train.eval_every={args.eval_every}", f"--train.eval_batches={args.eval_batches}",
           f"--train.log_every={args.log_every}", f"--data.train=[{shards}]", f"--train.out_dir={out}",
           "--logging.wandb_mode=disabled", f"--checkpoint.every={10 * args.steps}"]
    subprocess.run(cmd, check=True, env=env(), cwd=REPO, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def curves(records: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]], float]:
    """(val bpb curve, train bpb curve, median seconds per step) from metrics.jsonl."""
    val = [(r["step"], r["val/bpb"]) for r in records if "val/bpb" in r]
    tr = [(r["step"], r["bpb_train"]) for r in records if "bpb_train" in r]
    first = next(r for r in records if "bytes_seen" in r)
    bytes_per_step = first["bytes_seen"] / first["step"]
    rates = [r["bytes_per_s"] for r in records if "bytes_per_s" in r][1:]  # the first window holds warm-up
    return val, tr, bytes_per_step / statistics.median(rates)


def final_extras(records: list[dict]) -> dict:
    """The last evaluation's top-k bpb and causal routing share, and the last train bpb."""
    last_val = [r for r in records if "val/bpb" in r][-1]
    last_train = [r for r in records if "bpb_train" in r][-1]
    return {"final_val_bpb_topk_4batches": last_val.get("val/bpb_topk_4batches"),
            "final_val_causal_routed_frac": last_val.get("val/router/routed_frac_mean"),
            "final_train_bpb": last_train["bpb_train"], "final_router_aux_loss": last_train.get("router/aux_loss")}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step where the curve is at or below target, linear between evaluations."""
    prev = None
    for step, value in curve:
        if value <= target:
            if prev is None or prev[1] == value:
                return float(step)
            s0, v0 = prev
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        prev = (step, value)
    return None


# ---------------------------------------------------------------------------------------------
# Optimizer-level measurements (state bytes per rank, optimizer step time) on Pico's gradients


def _state_worker(rank: int, world: int, port: int, out: str, steps: int) -> None:
    """One rank: Pico quickstart under DeepSpeed stage 0 with SOAP and with AdamW, stepped in turn."""
    import deepspeed
    import torch

    from pico.model import build_model, make_targets
    from pico.configs.tree import load_config
    from pico.pipeline.optim.build import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = load_config("quickstart")
    engines, opts = {}, {}
    for name in ("soap", "adamw"):
        cfg.optim.name = name
        torch.manual_seed(0)
        model = build_model(cfg.model)
        opts[name] = build_optimizer(list(model.named_parameters()), cfg.optim)
        engines[name], *_ = deepspeed.initialize(model=model, optimizer=opts[name], config={
            "train_micro_batch_size_per_gpu": cfg.data.batch_size, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    result = {name: {"opt_step_s": [], "fwd_bwd_s": []} for name in engines}
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        seq = torch.randint(0, 256, (cfg.data.batch_size, cfg.data.seq_len + cfg.model.n_predict), generator=gen)
        idx, tgt = make_targets(seq, cfg.model.n_predict)
        for name, engine in engines.items():  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            engine.backward(engine(idx, tgt).loss)  # stage 0: gradients are all-reduced here
            t1 = time.perf_counter()
            opts[name].step()  # the optimizer alone, sharing of new values included
            t2 = time.perf_counter()
            opts[name].zero_grad()
            result[name]["fwd_bwd_s"].append(t1 - t0)
            result[name]["opt_step_s"].append(t2 - t1)
    for name, opt in opts.items():
        adam_bytes = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                         if isinstance(v, torch.Tensor))
        result[name]["state_bytes"] = opt.optimizer_state_bytes() if name == "soap" else adam_bytes
    if world > 1:  # the two ways new values reach the other ranks
        opt = opts["soap"]
        for sync in ("allgather", "broadcast"):
            opt.sync = sync
            share_s = []
            for _ in range(5):
                t0 = time.perf_counter()
                with torch.no_grad():
                    opt._share(opt.sharding())
                share_s.append(time.perf_counter() - t0)
            result["soap"][f"share_{sync}_s"] = share_s
    torch.save(result, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def optimizer_level(steps: int, scratch: Path) -> dict[int, list[dict]]:
    import socket

    import torch
    import torch.multiprocessing as mp

    for k, v in env().items():
        os.environ.setdefault(k, v)
    found = {}
    for world in (1, 2):
        folder = scratch / f"state_{world}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_state_worker, args=(world, port, str(folder), steps), nprocs=world, join=True)
        found[world] = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]
    return found


# ---------------------------------------------------------------------------------------------


def plot(runs: dict[tuple[str, float], dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_tr) = plt.subplots(1, 2, figsize=(12, 4.5))
    maps = {"adamw": plt.get_cmap("Blues"), "soap": plt.get_cmap("Reds")}
    for (name, lr), run in sorted(runs.items()):
        lrs = sorted(l for n, l in runs if n == name)
        colour = maps[name](0.35 + 0.6 * lrs.index(lr) / max(1, len(lrs) - 1))  # darker = larger lr
        style = "-" if run["best"] else ":"
        label = f"{name} lr={lr:g}" + (" (best)" if run["best"] else "")
        ax_val.plot(*zip(*run["val"]), style, marker="o", ms=3, color=colour, label=label, lw=2 if run["best"] else 1.2)
        steps, bpb = zip(*run["train_bpb"])
        ax_tr.plot(steps, bpb, style, color=colour, label=label, lw=2 if run["best"] else 1.2)
    ax_val.axhline(target, color="grey", lw=0.8, ls="--", label="AdamW best final")
    ax_val.set(xlabel="step", ylabel="validation bits per byte", title="Pico quickstart: validation")
    ax_tr.set(xlabel="step", ylabel="training bits per byte (head 1, one batch)", title="training")
    for ax in (ax_val, ax_tr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--soap-lrs", default="3e-3,1e-2,3e-2")
    ap.add_argument("--adamw-lrs", default="1e-3,3e-3,1e-2")
    ap.add_argument("--state-steps", type=int, default=11, help="gradients in the 1 vs 2 rank measurement (the 11th refreshes the basis)")
    ap.add_argument("--scratch", default="/tmp/pico-bench-soap", help="shards and run directories (not committed)")
    ap.add_argument("--tag", default="quickstart", help="suffix of the result files")
    ap.add_argument("--fresh", action="store_true", help="retrain runs already finished in --scratch")
    args = ap.parse_args()
    scratch = Path(args.scratch)
    global SNAPSHOT
    global CODE_COMMIT
    SNAPSHOT, args.sha = snapshot(scratch)
    CODE_COMMIT = args.sha
    sys.path.insert(0, str(SNAPSHOT))  # this process and its spawned ranks import the snapshot too
    RESULTS.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    shards = prepare_shards(scratch)

    per_world = optimizer_level(args.state_steps, scratch)
    for world, ranks in per_world.items():
        mean = {}
        for name in ("soap", "adamw"):
            # the first gradient builds state (SOAP: eigh); the mean of the rest includes one refresh
            mean[name] = {k: statistics.mean(t for r in ranks for t in r[name][k][1:]) for k in ("opt_step_s", "fwd_bwd_s")}
            emit({"bench": "soap", "what": "optimizer_state_per_rank", "optimizer": name, "world_size": world,
                  "state_bytes_per_rank": [r[name]["state_bytes"] for r in ranks],
                  "state_mb_max_rank": max(r[name]["state_bytes"] for r in ranks) / 2**20,
                  "opt_step_s_mean": mean[name]["opt_step_s"], "fwd_bwd_s_mean": mean[name]["fwd_bwd_s"]}, records)
        total = {name: m["opt_step_s"] + m["fwd_bwd_s"] for name, m in mean.items()}
        emit({"bench": "soap", "what": "time_per_step", "source": "interleaved steps, same process (paired)",
              "world_size": world, "adamw_s": total["adamw"], "soap_s": total["soap"],
              "ratio": total["soap"] / total["adamw"]}, records)
        if world > 1:
            emit({"bench": "soap", "what": "share_new_values", "world_size": world,
                  **{f"{sync}_s_median": statistics.median(t for r in ranks for t in r["soap"][f"share_{sync}_s"])
                     for sync in ("allgather", "broadcast")}}, records)

    runs: dict[tuple[str, float], dict] = {}
    records_of: dict[tuple[str, float], list[dict]] = {}
    for name, lrs in (("adamw", args.adamw_lrs), ("soap", args.soap_lrs)):
        for lr in (float(x) for x in lrs.split(",")):
            t0 = time.perf_counter()
            records_of[(name, lr)] = train(name, lr, args, shards, scratch)
            val, tr, step_s = curves(records_of[(name, lr)])
            runs[(name, lr)] = {"val": val, "train_bpb": tr, "step_s": step_s, "best": False}
            emit({"bench": "soap", "what": "run", "optimizer": name, "lr": lr, "steps": args.steps,
                  "final_val_bpb": val[-1][1], "val_curve": val, "s_per_step": step_s,
                  "wall_s": time.perf_counter() - t0, **final_extras(records_of[(name, lr)])}, records)

    best = {}
    for name in ("adamw", "soap"):
        lr = min((lr for n, lr in runs if n == name), key=lambda lr: runs[(name, lr)]["val"][-1][1])
        runs[(name, lr)]["best"] = True
        best[name] = runs[(name, lr)] | {"lr": lr}
    target = best["adamw"]["val"][-1][1]
    adamw_steps = steps_to_reach(best["adamw"]["val"], target)
    soap_steps = steps_to_reach(best["soap"]["val"], target)
    emit({"bench": "soap", "what": "steps_to_adamw_final", "target_val_bpb": target,
          "adamw_lr": best["adamw"]["lr"], "soap_lr": best["soap"]["lr"], "adamw_steps": adamw_steps,
          "soap_steps": soap_steps, "ratio": None if soap_steps is None else soap_steps / adamw_steps,
          "goal": 0.65, "soap_final_val_bpb": best["soap"]["val"][-1][1]}, records)
    emit({"bench": "soap", "what": "time_per_step", "source": "trainer throughput (eval excluded; runs at different times)",
          "adamw_s": best["adamw"]["step_s"], "soap_s": best["soap"]["step_s"],
          "ratio": best["soap"]["step_s"] / best["adamw"]["step_s"]}, records)

    stem = RESULTS / f"soap_{args.tag}"
    stem.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot(runs, target, stem.with_suffix(".png"))
    print(json.dumps({"bench": "soap", "what": "written", "files": [str(stem.with_suffix(s).relative_to(REPO))
                                                                   for s in (".jsonl", ".png")]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
