"""The prepared GPU check: the 125M config's training speed per attention path, and decoding.

    python benchmarks/gpu_check.py [--config pico-125m --batch 8 --steps 10 --checkpoint RUN_OR_RELEASE]

Needs one CUDA GPU and runs in under 5 minutes there (without one it exits with a one-line
message). Prints one JSON line per figure and writes them to benchmarks/results/gpu_check.jsonl:

- per attention path (`model.attn_impl` dense, banded, flex): bf16-autocast forward + backward
  bytes/s of the config's model at its max_seq_len, MFU against the GPU's dense bf16 peak (the
  trainer's `_peak_flops`, FLOPs per byte from `pico.model.flops`; target >= 0.40), and peak
  GPU memory; plus each path's loss on the same batch minus dense's (one numerical contract);
- self-speculative decoding: bytes/s of `pico.model.generate.generate` with and without
  speculation on the same prompts, the speed-up and the bytes accepted per pass. A model fresh
  from initialisation drafts nothing useful, so pass `--checkpoint` (a run directory or a
  release) for a meaningful speed-up; without it the line says `"weights": "random"`.

The optimizer step is left out: this measures the model, as bench_model.py does on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gpu_check.jsonl"


def emit(record: dict, sink: list[dict]) -> None:
    print(json.dumps(record), flush=True)
    sink.append(record)


def train_figures(cfg, impl: str, batch: int, steps: int, warmup: int, peak: float, seq: torch.Tensor) -> dict:
    """Mean step time of `steps` forward + backward passes after `warmup`, synchronised, and peak memory."""
    from pico.model import build_model, make_targets

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, attn_impl=impl)).cuda()
    idx, targets = make_targets(seq, cfg.n_predict)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(idx, targets, return_logits=False, with_stats=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return out.loss.detach()

    t_compile = time.perf_counter()
    for _ in range(warmup):  # the first steps compile flex's kernels and build the block masks
        loss = step()
    torch.cuda.synchronize()
    t_compile = time.perf_counter() - t_compile
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    bps = batch * cfg.max_seq_len / dt
    return {"figure": "train_fwd_bwd", "attn_impl": impl, "precision": "bf16 autocast", "batch": batch,
            "seq": cfg.max_seq_len, "step_s": dt, "bytes_per_s": bps, "mfu": bps * model.flops_per_byte() / peak,
            "mfu_target": 0.40, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "warmup_s": t_compile, "loss": float(loss)}


def decode_figures(model, prompts: list[bytes], max_new: int, weights: str) -> dict:
    from pico.model.generate import generate

    generate(model, prompts[:1], 8)  # warm-up: CUDA context, kernels
    plain = generate(model, prompts, max_new, speculative=False, routing_agreement=False)
    spec = generate(model, prompts, max_new, speculative=True, routing_agreement=False)
    return {"figure": "self_speculative_decode", "weights": weights, "prompts": len(prompts), "max_new_bytes": max_new,
            "plain_bytes_per_s": plain.bytes_per_s, "speculative_bytes_per_s": spec.bytes_per_s,
            "speedup": spec.bytes_per_s / max(plain.bytes_per_s, 1e-9), "bytes_per_pass": spec.bytes_per_pass,
            "same_output": plain.outputs == spec.outputs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="pico-125m", help="a file in configs/ (name or path)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--impls", nargs="+", default=["dense", "banded", "flex"])
    ap.add_argument("--checkpoint", default="", help="run directory or release for the decoding figures")
    ap.add_argument("--decode-bytes", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU node: python benchmarks/gpu_check.py", file=sys.stderr)
        return 2

    from pico.configs.tree import load_config
    from pico.pipeline.train.trainer import _peak_flops

    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = load_config(args.config).model
    peak, peak_name = _peak_flops(torch.device("cuda"))
    sink: list[dict] = []
    emit({"figure": "device", "gpu": torch.cuda.get_device_name(), "peak_flops": peak, "peak": peak_name,
          "torch": torch.__version__, "config": args.config}, sink)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 256, (args.batch, cfg.max_seq_len + cfg.n_predict), generator=g).cuda()
    dense_loss = None
    for impl in args.impls:
        row = train_figures(cfg, impl, args.batch, args.steps, args.warmup, peak, seq)
        dense_loss = row["loss"] if impl == "dense" else dense_loss
        if dense_loss is not None:
            row["loss_minus_dense"] = row["loss"] - dense_loss
        emit(row, sink)
        torch.cuda.empty_cache()

    if args.checkpoint:
        from pico.pipeline.release.load import load_model

        model, _ = load_model(Path(args.checkpoint))
        weights = args.checkpoint
    else:
        from pico.model import build_model

        torch.manual_seed(0)
        model, weights = build_model(cfg), "random"
    model = model.cuda().eval()
    prompts = [b"The history of the ", b"def fibonacci(n):\n    ", b"In the beginning ", b"Once upon a time, "]
    emit(decode_figures(model, prompts, args.decode_bytes, weights), sink)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in sink))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
