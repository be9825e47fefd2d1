"""`pico quickstart`: the whole chain on a built-in corpus, in minutes, on a CPU.

prep (Ray, WebDataset shards) -> train (DeepSpeed, SOAP, fp32) -> eval (bits per byte on held-out
documents, beside a unigram byte model and xz -9e on the same bytes) -> convert (safetensors
release) -> generate (plain and self-speculative greedy, one sampled continuation) -> summary.

The default corpus is the running interpreter's own standard library: every machine that runs
pico has it, so nothing is downloaded; it is real text (English docstrings and comments mixed
with code) and its licence (PSF) allows this use. Test suites and vendored tools are left out.
Every stage reuses finished work when rerun with the same --out: shards are kept, training
resumes from its last checkpoint, a finished release is not rebuilt.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pico.configs.errors import UserError
from pico.configs.files import strict_json

ACCEPTS_OVERRIDES = True
EPILOG = ("Config overrides after the options change the training run, e.g. --train.steps=100 --model.capacity=0.25.\n"
          "A rerun with the same --out reuses the shards, resumes or skips training, and keeps a finished release.")
SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo", "ensurepip"}
EVAL_BYTES = 96_000
PROMPTS = ["def __init__(self", "The standard library ", "import os\n"]
SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 0.8, 0.95  # the summary's sampled continuation


def default_corpus() -> list[Path]:
    """The interpreter's standard-library sources (without tests and vendored tools), sorted."""
    std = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in std.rglob("*.py")
                   if not SKIP_PARTS.intersection(p.relative_to(std).parts) and p.stat().st_size > 0)
    if not files:
        raise UserError(f"no Python sources found under {std}; pass --corpus PATH")
    return files


def _stage(name: str) -> None:
    print(f"\n== {name} ==", file=sys.stderr, flush=True)


def read_documents(shard_dir: Path, split: str, limit_bytes: int) -> list[bytes]:
    """Documents of one split, in shard order, until `limit_bytes` (the shard reader prep and the loader use)."""
    import zstandard

    from pico.data_prep.shards import SampleError, ShardError, decode_sample, read_shard
    from pico.pipeline.data.loader import resolve_shards

    docs, total = [], 0
    dctx = zstandard.ZstdDecompressor()
    try:
        for url in resolve_shards([str(shard_dir)], split):
            for _, sample in read_shard(url):
                docs.append(decode_sample(sample, dctx)[0])
                total += len(docs[-1])
                if total >= limit_bytes:
                    return docs
    except (ShardError, SampleError) as e:
        raise UserError(f"shards at {shard_dir} are corrupt ({e}); delete them and rerun the quickstart") from None
    return docs


def unigram_bpb(train_docs: list[bytes], held_out: bytes) -> float:
    """Bits per byte of an add-one-smoothed byte unigram model fitted on the training documents."""
    counts = Counter()
    for d in train_docs:
        counts.update(d)
    total = sum(counts.values()) + 256
    bits = -sum(n * math.log2((counts[b] + 1) / total) for b, n in Counter(held_out).items())
    return bits / len(held_out)


def xz_bpb(data: bytes) -> float:
    """Bits per byte of `xz -9e` (LZMA2, preset 9 extreme) on the same bytes."""
    return 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", default=None,
                   help="input files, directories, globs or s3:// URLs (default: this Python's standard library sources)")
    p.add_argument("--out", default="runs/quickstart", help="where shards, run, release and summary go (default: runs/quickstart)")
    p.add_argument("--config", default="quickstart", help="training config (default: the packaged quickstart.yaml)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the config's train.steps)")
    p.add_argument("--max-bytes", type=int, default=200, help="bytes to generate per prompt (default: 200)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of documents held out for validation, by a hash of their path (default: 0.05)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers for data prep (default: 2)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    summary = quickstart(corpus=args.corpus, out=Path(args.out), config=args.config, steps=args.steps,
                         max_bytes=args.max_bytes, workers=args.workers, progress=not args.no_progress,
                         val_fraction=args.val_fraction,
                         overrides=getattr(args, "overrides", None))
    if args.json:
        print(strict_json(summary))
    else:
        print_summary(summary)
    return 0


def quickstart(corpus: list[str] | None = None, out: Path = Path("runs/quickstart"), config: str = "quickstart",
               steps: int = 0, max_bytes: int = 200, workers: int = 2, progress: bool = True,
               overrides: list[str] | None = None, val_fraction: float = 0.05) -> dict[str, Any]:
    """Run every stage; returns the summary dict (also written to <out>/summary.json)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    t_start = time.time()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = out / "shards"
    timings: dict[str, float] = {}

    # -- 1. prep -----------------------------------------------------------------------------
    _stage("1/5 prep: corpus -> zstd WebDataset shards (Ray)")
    t0 = time.time()
    inputs = corpus or [str(p) for p in default_corpus()]
    from pico.data_prep import prepare

    manifest = prepare(inputs=inputs, output=str(shards), val_fraction=val_fraction, workers=workers, progress=progress)
    timings["prep_s"] = time.time() - t0

    # -- 2. train ----------------------------------------------------------------------------
    _stage("2/5 train: DeepSpeed + SOAP on CPU")
    from pico.pipeline.train.checkpoint import latest_checkpoint, read_run_state
    from pico.configs.tree import load_config
    from pico.pipeline.train.trainer import train

    run_dir = out / "run"
    extra = [f"--data.train=[{shards}]", f"--train.out_dir={run_dir}"] + list(overrides or [])
    if steps:
        extra.append(f"--train.steps={steps}")
    cfg = load_config(config, extra)
    t0 = time.time()
    done = latest_checkpoint(cfg.checkpoint_dir)
    if done is not None and read_run_state(done)["step"] >= cfg.train.steps:
        print(f"training already finished: {done}", file=sys.stderr)
        train_summary = json.loads((run_dir / "train_summary.json").read_text()) \
            if (run_dir / "train_summary.json").exists() else {}
    else:
        train_summary = train(cfg, resume=True, progress=progress)
        (run_dir / "train_summary.json").write_text(json.dumps(train_summary, default=str, indent=1))
    timings["train_s"] = time.time() - t0
    ckpt_path = latest_checkpoint(cfg.checkpoint_dir)

    # -- 3. eval -----------------------------------------------------------------------------
    _stage("3/5 eval: bits per byte on held-out documents vs unigram and xz -9e")
    from pico.pipeline.release.load import load_model
    from pico.pipeline.data.eval_packing import text_file_batches
    from pico.pipeline.eval.evaluate import evaluate

    t0 = time.time()
    held_out = b"".join(read_documents(shards, "val", EVAL_BYTES))[:EVAL_BYTES]
    if not held_out:
        raise UserError(f"the validation split in {shards} is empty; use a larger corpus")
    held_out_file = out / "held_out.bin"
    held_out_file.write_bytes(held_out)
    model, _ = load_model(ckpt_path)
    import torch

    batches = text_file_batches([held_out_file], cfg.data.seq_len, cfg.model.n_predict, 16)
    if progress:
        from tqdm import tqdm

        n_batches = -(-len(held_out) // (cfg.data.seq_len * 16))
        batches = tqdm(batches, total=n_batches, desc="eval", unit="batch", file=sys.stderr)
    ev = evaluate(model, batches, torch.device("cpu"), routing="causal")
    train_docs = read_documents(shards, "train", 4_000_000)
    evals = {"model_bpb": ev["bpb"], "unigram_bpb": unigram_bpb(train_docs, held_out),
             "xz9e_bpb": xz_bpb(held_out), "held_out_bytes": len(held_out),
             "model_bpb_per_head": [ev[f"bpb_head{h}"] for h in range(1, cfg.model.n_predict + 1)]}
    timings["eval_s"] = time.time() - t0

    # -- 4. convert --------------------------------------------------------------------------
    _stage("4/5 convert: checkpoint -> safetensors release")
    from pico.pipeline.release.convert import convert

    t0 = time.time()
    release_dir = out / "release"
    convert(ckpt_path, release_dir, dtype="fp32", overwrite=True)  # the quickstart owns its release directory
    timings["convert_s"] = time.time() - t0

    # -- 5. generate -------------------------------------------------------------------------
    _stage("5/5 generate: plain vs self-speculative decoding (greedy), and one sampled continuation")
    from pico.pipeline.release.load import load_model as load_release_model
    from pico.model.generate import generate

    t0 = time.time()
    released, _ = load_release_model(release_dir)
    gen = {}
    for mode, spec in (("plain", False), ("speculative", True)):
        res = generate(released, [p.encode() for p in PROMPTS], max_new_bytes=max_bytes, speculative=spec,
                       temperature=0.0)
        gen[mode] = {"bytes_per_s": res.bytes_per_s, "forward_passes": res.forward_passes,
                     "bytes_per_pass": res.bytes_per_pass,
                     "sample": (PROMPTS[0].encode() + res.outputs[0]).decode("utf-8", errors="replace")}
    gen["identical_greedy_output"] = gen["plain"]["sample"] == gen["speculative"]["sample"]
    # greedy decoding of a tiny model loops; a sampled continuation shows what it learned
    res = generate(released, [PROMPTS[0].encode()], max_new_bytes=max_bytes, temperature=SAMPLE_TEMPERATURE,
                   top_p=SAMPLE_TOP_P, seed=0)
    gen["sampled"] = {"temperature": SAMPLE_TEMPERATURE, "top_p": SAMPLE_TOP_P, "seed": 0,
                      "bytes_per_pass": res.bytes_per_pass,
                      "sample": (PROMPTS[0].encode() + res.outputs[0]).decode("utf-8", errors="replace")}
    gen["speedup"] = gen["speculative"]["bytes_per_s"] / gen["plain"]["bytes_per_s"]
    timings["generate_s"] = time.time() - t0

    summary = {
        "corpus": "python stdlib sources" if corpus is None else corpus,
        "corpus_documents": manifest.get("documents", {}),
        "shards": str(shards), "run_dir": str(run_dir), "checkpoint": str(ckpt_path),
        "release": str(release_dir), "steps": cfg.train.steps,
        "train": {k: train_summary.get(k) for k in ("bytes_seen", "n_params", "flops_per_byte",
                                                    "bytes_per_s_median", "mfu_median", "peak_kind")},
        "eval": evals, "generate": gen, "timings_s": timings, "total_s": time.time() - t_start,
        "wandb": f"{run_dir}/wandb (offline; `wandb sync {run_dir}/wandb/offline-run-*` uploads it)",
        "routing_picture": str(run_dir / "routing" / "latest.png"),
        "metrics": str(run_dir / "metrics.jsonl"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def print_summary(s: dict[str, Any]) -> None:
    e, g, t = s["eval"], s["generate"], s["train"]
    lines = [
        "",
        "pico quickstart: done in %.0f s" % s["total_s"],
        f"  model        {t.get('n_params', 0) / 1e6:.2f}M parameters, {s['steps']} steps, "
        f"{(t.get('bytes_seen') or 0) / 1e6:.1f} MB seen",
        f"  held-out     {e['held_out_bytes']:,} bytes of documents the model never trained on",
        f"    pico       {e['model_bpb']:.3f} bits/byte",
        f"    unigram    {e['unigram_bpb']:.3f} bits/byte (byte frequencies of the training split)",
        f"    xz -9e     {e['xz9e_bpb']:.3f} bits/byte",
        f"  generate     plain {g['plain']['bytes_per_s']:.0f} B/s, speculative {g['speculative']['bytes_per_s']:.0f} B/s "
        f"({g['speedup']:.2f}x, {g['speculative']['bytes_per_pass']:.2f} bytes/pass, "
        f"identical greedy output: {g['identical_greedy_output']})",
        f"  greedy       {g['speculative']['sample'][:160]!r}",
        "               (greedy decoding of a model this small tends to repeat itself; a sampled continuation:)",
        f"  sampled      {g['sampled']['sample'][:160]!r}",
        f"               (temperature {g['sampled']['temperature']}, top-p {g['sampled']['top_p']}, seed "
        f"{g['sampled']['seed']}; `pico generate --temperature 0.8 --top-p 0.95` for more)",
        f"  shards       {s['shards']}",
        f"  run          {s['run_dir']} (config.yaml, metrics.jsonl, checkpoints/)",
        f"  release      {s['release']}",
        f"  W&B          {s['wandb']}",
        f"  routing      {s['routing_picture']} (and .html beside it)",
        f"  next         pico generate --model {s['release']} --prompt 'def '",
    ]
    print("\n".join(lines))
