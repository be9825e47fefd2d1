"""Local attention on CPU: dense SDPA under a (H, T, T) mask vs banded blocks, side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_attention.py [--seq 1024 4096 --window 128 512 --repeats 5]

For each (T, window): forward + backward of one attention layer's core (q, k, v -> output, the
gradients of q, k and v) at d 512, 8 query heads / 4 kv heads (head_dim 64), fp32, batch 1, in
interleaved rounds so that load from other processes hits all alike; the median of the repeats.
Three paths:

- `dense`: the model's dense path now, `attend` with the (H, T, T) mask, which it passes to SDPA
  as (1, H, T, T) so that SDPA takes its fused (flash) CPU kernel;
- `dense_unfused`: SDPA handed the 3-D (H, T, T) mask directly, as the model did before issue
  15: SDPA then falls back to its math kernel (materialised scores, about 2.4x slower);
- `banded`: `MaskSpec("banded")`, blocks of window / 4 queries.

The dense mask is built once outside the timing, as `Pico.local_bias` caches it.

Peak memory is measured in a fresh subprocess per (path, T, window): the rise of the process's
resident set, sampled every 0.2 ms, over its size once q, k, v exist, for building the mask (dense) plus
one forward + backward. Beside it, the largest intermediate counted from the shapes: the
(H, T, T) fp32 mask for dense; for banded, the key (or value) windows, (T / block) * (window +
block) keys per kv head (SDPA's fused CPU kernel keeps no score matrix for the backward pass).

One JSON line per measurement, then one comparison line per (T, window) with the speed-up and
the issue's target (>= 0.8 x T / window at T 4096); writes benchmarks/results/attention.json and
attention.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pico.model.attention import (MaskSpec, alibi_slopes, attend, attention_bias, default_block)

RESULTS = Path(__file__).resolve().parent / "results"
MB = 2 ** 20


def inputs(T: int, d: int, H: int, Hkv: int, batch: int):
    hd = d // H
    g = torch.Generator().manual_seed(0)
    make = lambda h: torch.randn(batch, h, T, hd, generator=g, requires_grad=True)  # noqa: E731
    return make(H), make(Hkv), make(Hkv)


IMPLS = ("dense", "dense_unfused", "banded")


def mask_for(impl: str, T: int, H: int, window: int):
    slopes = alibi_slopes(H)
    if impl.startswith("dense"):
        pos = torch.arange(T)
        return impl, attention_bias(pos, pos, slopes, window)  # (H, T, T)
    return impl, MaskSpec("banded", slopes, window)


def fwd_bwd(q, k, v, impl_mask) -> float:
    impl, mask = impl_mask
    t0 = time.perf_counter()
    if impl == "dense_unfused":
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    else:
        y = attend(q, k, v, mask)
    y.sum().backward()
    dt = time.perf_counter() - t0
    q.grad = k.grad = v.grad = None
    return dt


def largest_intermediate_mb(impl: str, T: int, window: int, H: int, Hkv: int, hd: int, batch: int) -> float:
    if impl.startswith("dense"):
        return H * T * T * 4 / MB
    b = min(default_block(window), T)
    L = (-(-(window - 1) // b) + 1) * b
    return batch * Hkv * -(-T // b) * L * hd * 4 / MB


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def peak_child(impl: str, T: int, window: int, d: int, H: int, Hkv: int, batch: int) -> None:
    """Run in a subprocess: print the peak RSS rise of building the mask + one forward + backward.

    A thread samples the resident set every 0.2 ms (torch releases the GIL inside its kernels);
    ru_maxrss cannot be used, its high-water mark is set by importing torch."""
    q, k, v = inputs(T, d, H, Hkv, batch)
    fwd_bwd(*inputs(64, d, H, Hkv, 1), mask_for(impl, 64, H, min(window, 32)))  # load kernels first
    base, peak, done = rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    fwd_bwd(q, k, v, mask_for(impl, T, H, window))
    done.set()
    sampler.join()
    print(json.dumps({"peak_rise_mb": max(peak[0], rss_mb()) - base}))


def measure_peak(impl: str, T: int, window: int, args) -> float:
    cmd = [sys.executable, __file__, "--peak-child", impl, str(T), str(window), "--d", str(args.d),
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--batch", str(args.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rise_mb"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--window", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "attention.json"))
    ap.add_argument("--peak-child", nargs=3, metavar=("IMPL", "T", "WINDOW"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_child:
        impl, T, window = args.peak_child
        peak_child(impl, int(T), int(window), args.d, args.heads, args.kv_heads, args.batch)
        return 0

    torch.manual_seed(0)
    hd, load_before = args.d // args.heads, os.getloadavg()
    rows, compares = [], []
    for T in args.seq:
        for window in args.window:
            q, k, v = inputs(T, args.d, args.heads, args.kv_heads, args.batch)
            masks = {impl: mask_for(impl, T, args.heads, window) for impl in IMPLS}
            times: dict[str, list[float]] = {impl: [] for impl in masks}
            for r in range(args.warmup + args.repeats):
                for impl, mask in masks.items():  # interleaved: background load hits all alike
                    dt = fwd_bwd(q, k, v, mask)
                    if r >= args.warmup:
                        times[impl].append(dt)
            del masks
            by = {}
            for impl in IMPLS:
                med = statistics.median(times[impl])
                by[impl] = row = {
                    "impl": impl, "T": T, "window": window, "block": default_block(window) if impl == "banded" else None,
                    "d": args.d, "heads": args.heads, "kv_heads": args.kv_heads, "batch": args.batch, "dtype": "fp32",
                    "fwd_bwd_s_median": med, "fwd_bwd_s_all": [round(t, 4) for t in times[impl]],
                    "peak_rss_rise_mb": measure_peak(impl, T, window, args),
                    "largest_intermediate_mb": largest_intermediate_mb(impl, T, window, args.heads, args.kv_heads,
                                                                       hd, args.batch)}
                print(json.dumps(row), flush=True)
                rows.append(row)
            target = 0.8 * T / window
            cmp = {"compare": "banded_vs_dense", "T": T, "window": window,
                   "speedup": by["dense"]["fwd_bwd_s_median"] / by["banded"]["fwd_bwd_s_median"],
                   "speedup_vs_unfused": by["dense_unfused"]["fwd_bwd_s_median"] / by["banded"]["fwd_bwd_s_median"],
                   "target_speedup": target if T >= 4096 else None,
                   "peak_memory_ratio": by["dense"]["peak_rss_rise_mb"] / max(by["banded"]["peak_rss_rise_mb"], 1e-9)}
            cmp["meets_target"] = cmp["speedup"] >= target if T >= 4096 else None
            cmp["meets_target_vs_unfused"] = cmp["speedup_vs_unfused"] >= target if T >= 4096 else None
            print(json.dumps(cmp), flush=True)
            compares.append(cmp)

    command = "OMP_NUM_THREADS=1 python benchmarks/bench_attention.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "host_cpus": os.cpu_count(),
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    print(json.dumps(meta), flush=True)
    write_results(Path(args.out), rows, compares, meta)
    return 0


def write_results(out: Path, rows: list[dict], compares: list[dict], meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"measurements": rows, "comparisons": compares, **meta}, indent=2) + "\n")
    tmp.replace(out)
    by = {(r["impl"], r["T"], r["window"]): r for r in rows}
    lines = ["# Attention: dense vs banded (CPU, fp32, forward + backward)", "",
             f"    {meta['command']}", "",
             f"torch {meta['torch']}, {meta['threads']} thread on a shared {meta['host_cpus']}-CPU machine "
             f"(load average {meta['load_avg_before'][0]:.2f} before, {meta['load_avg_after'][0]:.2f} after: other "
             "engineers' jobs ran alongside, so single timings wander; the paths ran interleaved). "
             "d 512, 8 query heads / 4 kv heads, batch 1; medians of the repeats. dense = SDPA's fused kernel "
             "(the model's dense path), unfused = SDPA's math kernel (a 3-D mask: the model before issue 15). "
             "Peak = rise of the resident set in a fresh process for the mask plus one forward + backward; "
             "largest = the (H, T, T) mask (dense) or the key windows (banded), counted from the shapes.", "",
             "| T | window | block | dense s | unfused s | banded s | speed-up vs dense | vs unfused | target |"
             " dense / unfused / banded peak MB | mask MB | banded largest MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in compares:
        d, u, b = (by[(i, c["T"], c["window"])] for i in IMPLS)
        target = f">= {c['target_speedup']:.1f}x" if c["target_speedup"] else "-"
        lines.append(f"| {c['T']} | {c['window']} | {b['block']} | {d['fwd_bwd_s_median']:.3f} | "
                     f"{u['fwd_bwd_s_median']:.3f} | {b['fwd_bwd_s_median']:.3f} | {c['speedup']:.1f}x | "
                     f"{c['speedup_vs_unfused']:.1f}x | {target} | {d['peak_rss_rise_mb']:.0f} / "
                     f"{u['peak_rss_rise_mb']:.0f} / {b['peak_rss_rise_mb']:.0f} | {d['largest_intermediate_mb']:.0f} | "
                     f"{b['largest_intermediate_mb']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
