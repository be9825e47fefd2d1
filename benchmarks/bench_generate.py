"""Plain vs self-speculative greedy decoding on CPU, side by side on the same prompts.

    python benchmarks/bench_generate.py [--model runs/quickstart/release] [--max-bytes 192]

Model: `--model` (a release or a training checkpoint), else runs/quickstart/release or
runs/quickstart/run when the quickstart has run, else a model of configs/quickstart.yaml's
shape trained here for `--train-minutes` on SymPy sources from the shared corpus with AdamW
(cached in runs/bench_generate/ so reruns reuse it). Prompts are the beginnings of held-out
documents the model never trained on. Each measurement is one JSON line on stdout; all of them
go to benchmarks/results/generate_speed.json.

Measurements: bytes/s of plain and speculative decoding (best of `--repeats` runs, the two
modes interleaved so that load from other processes hits both alike), forward passes,
accepted bytes per pass, whether the outputs are identical, draft acceptance per head, and
causal-vs-top-k routing agreement on held-out text.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import torch

from pico.model import EOS, build_model, make_targets
from pico.model.generate import START, causal_topk_agreement, generate

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "sympy-code.jsonl.zst"
CACHE = REPO / "runs" / "bench_generate"


def corpus_documents() -> list[bytes]:
    """SymPy source files, in corpus order."""
    import zstandard

    with open(CORPUS, "rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line)["text"].encode() for line in io.BytesIO(text) if line.strip()]


def split_documents(docs: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Every 20th document is held out (never trained on)."""
    return [d for i, d in enumerate(docs) if i % 20], [d for i, d in enumerate(docs) if i % 20 == 0]


def train_fallback(minutes: float, seed: int = 0):
    """A configs/quickstart.yaml-shaped model trained for `minutes` of wall time with AdamW on
    SymPy sources (lr 2e-3 after a 50-step warmup, batch 16 x max_seq_len). The model and
    optimizer are cached in runs/bench_generate/; a rerun with more minutes continues training."""
    from pico.configs.tree import load_config

    cfg = load_config(REPO / "configs" / "quickstart.yaml").model
    ckpt = CACHE / "model.pt"
    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    info = {"kind": "trained by bench_generate.py", "steps": 0, "minutes": 0.0, "batch": 16, "seq_len": cfg.max_seq_len,
            "optimizer": "AdamW lr 2e-3", "corpus": "sympy-code.jsonl.zst (every 20th doc held out)"}
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")
        model.load_state_dict(state["model"])
        if "opt" in state:
            opt.load_state_dict(state["opt"])
        info = state["info"]
    if info["minutes"] >= minutes:
        return model.eval(), info
    train, _ = split_documents(corpus_documents())
    sep = bytes([0])  # placeholder byte, replaced by EOS below (EOS is not a byte value)
    raw = torch.frombuffer(bytearray(sep.join(train) + sep), dtype=torch.uint8).long()
    ends = torch.tensor([len(d) for d in train]).cumsum(0) + torch.arange(len(train))
    stream = raw.index_fill(0, ends, EOS)  # documents end in EOS, as in the training loader
    T, B, n = cfg.max_seq_len, info["batch"], cfg.n_predict
    t0, budget = time.time(), (minutes - info["minutes"]) * 60
    while time.time() - t0 < budget:
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, (info["steps"] + 1) / 50)
        start = torch.randint(0, len(stream) - T - n, (B,))
        seq = torch.stack([stream[s:s + T + n] for s in start.tolist()])
        idx, tgt = make_targets(seq, n)
        out = model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        info["steps"] += 1
        if info["steps"] % 25 == 0:
            info["head_losses"] = [round(x, 4) for x in out.head_losses.tolist()]
            info["minutes"] = minutes - (budget - (time.time() - t0)) / 60
            print(f"train step {info['steps']} loss {out.loss.item():.3f} heads {info['head_losses']}", file=sys.stderr)
            _save(ckpt, model, opt, info)
    info["minutes"] = minutes
    _save(ckpt, model, opt, info)
    return model.eval(), info


def _save(path: Path, model, opt, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "info": info}, str(path) + ".part")
    Path(str(path) + ".part").replace(path)


def load(args):
    """The model to benchmark and a description of where it came from."""
    from pico.pipeline.release.load import load_model

    for cand in ([args.model] if args.model else [REPO / "runs/quickstart/release", REPO / "runs/quickstart/run"]):
        if cand and Path(cand).exists():
            model, info = load_model(cand, "cpu")
            return model, {**info, "path": str(cand)}
    return train_fallback(args.train_minutes)


def emit(row: dict, rows: list[dict]) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="release or checkpoint directory (default: quickstart run, else train)")
    ap.add_argument("--train-minutes", type=float, default=30.0, help="training minutes of the fallback model (continued from its cache)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    ap.add_argument("--prompt-bytes", type=int, default=48, help="bytes of each prompt")
    ap.add_argument("--max-bytes", type=int, default=192, help="bytes generated per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/generate_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, info = load(args)
    cfg = model.cfg
    _, held = split_documents(corpus_documents())
    held = [d for d in held if len(d) > 2 * cfg.max_seq_len][: args.prompts]
    prompts = [d[: args.prompt_bytes] for d in held]
    rows: list[dict] = []
    emit({"measurement": "setup", "model": info, "n_params": sum(p.numel() for p in model.parameters()),
          "config": {k: getattr(cfg, k) for k in ("d_local", "window", "n_in", "n_out", "d_latent", "n_latent",
                                                   "router", "capacity", "n_predict", "max_seq_len")},
          "prompts": len(prompts), "prompt_bytes": args.prompt_bytes, "max_bytes": args.max_bytes,
          "threads": torch.get_num_threads(), "torch": torch.__version__}, rows)

    for batch in (1, len(prompts)):
        compare(model, prompts, batch, "held-out", args, rows)

    emit({"measurement": "draft_acceptance", **draft_acceptance(model, held)}, rows)
    seqs = [[START, *d[: cfg.max_seq_len - 1]] for d in held]
    emit({"measurement": "routing_agreement", "text": "held-out documents", "positions": sum(map(len, seqs)),
          "causal_vs_topk": causal_topk_agreement(model, seqs) if cfg.router == "learned" else None}, rows)
    Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def compare(model, prompts: list[bytes], batch: int, text: str, args, rows: list[dict]) -> None:
    """Plain and speculative greedy decoding of the same prompts, interleaved, best of args.repeats."""
    groups = [[p] for p in prompts] if batch == 1 else [prompts]
    best = {"plain": math.inf, "speculative": math.inf}
    stats: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode in ("plain", "speculative"):
            secs, n_bytes, passes, bpp, outs = 0.0, 0, 0, [], []
            for g in groups:
                res = generate(model, g, args.max_bytes, speculative=mode == "speculative",
                               routing_agreement=False)
                secs += res.seconds
                n_bytes += res.n_bytes
                passes += res.forward_passes
                bpp.append(res.bytes_per_pass)
                outs += res.outputs
            best[mode] = min(best[mode], secs)
            stats[mode] = {"bytes": n_bytes, "forward_passes": passes, "bytes_per_pass": sum(bpp) / len(bpp),
                           "outputs": outs}
    for mode in ("plain", "speculative"):
        st = stats[mode]
        emit({"measurement": f"greedy_{mode}", "prompts": text, "batch": batch,
              "bytes_per_s": st["bytes"] / best[mode], "seconds": best[mode], "bytes": st["bytes"],
              "forward_passes": st["forward_passes"], "ms_per_pass": 1e3 * best[mode] / st["forward_passes"],
              "bytes_per_pass": st["bytes_per_pass"]}, rows)
    emit({"measurement": "speedup", "prompts": text, "batch": batch,
          "speculative_over_plain": best["plain"] / best["speculative"],
          "identical_outputs": stats["plain"]["outputs"] == stats["speculative"]["outputs"],
          "sample": (prompts[0] + stats["speculative"]["outputs"][0]).decode("utf-8", "replace")}, rows)


@torch.inference_mode()
def draft_acceptance(model, docs: list[bytes]) -> dict:
    """Top-1 accuracy of each head (byte t+h) on held-out text: drafts can be accepted only as often
    as heads 2..n guess right (greedy acceptance also needs head 1 to agree)."""
    cfg = model.cfg
    seq = torch.tensor([[START, *d[: cfg.max_seq_len + cfg.n_predict - 1]] for d in docs])
    idx, tgt = make_targets(seq, cfg.n_predict)
    x, _ = model.trunk(idx, "causal")
    acc = [(model.head_logits(x, h).argmax(-1) == tgt[..., h - 1]).float().mean().item()
           for h in range(1, cfg.n_predict + 1)]
    return {"head_top1_accuracy": acc}


if __name__ == "__main__":
    main()
