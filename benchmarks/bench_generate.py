"""Plain vs self-speculative greedy decoding on CPU, side by side on the same held-out prompts.

    python benchmarks/bench_generate.py --model runs/bench_gen/np4 --model runs/bench_gen/np8 \
        --shards runs/bench_gen/shards

Models: each `--model` (a release or a training checkpoint / run directory). Prompts: held-out
documents (the `val` split of `--shards`, which the models never trained on), two kinds side by
side: prose (the novels) and code (the SymPy sources); each prompt is `--prompt-bytes` bytes
taken `--offset` bytes into a document (past title pages and licence headers), and
`--max-bytes` bytes are generated from it (past max_seq_len with the defaults, so the
streaming context is measured too). Each measurement is one JSON line on stdout; all of them go
to benchmarks/results/generate_speed.json.

Per model, kind of text and batch (1: each prompt alone; 8: all together), six modes in turn,
best of `--repeats` (the modes interleaved so that load from other processes hits all of them
alike). Greedy: plain (one byte per pass), speculative (a chain of drafts from heads
2..n_predict verified in the same pass), speculative_lazy (`lazy_latent`: a pass whose first
byte routes nowhere skips the latent stack and stops at the first routed draft) and tree (a
draft tree: the `--tree-nodes` most likely paths by each head's rank-r acceptance, measured on
the model's greedy continuations of other held-out prompts, plus the rank-0 chain). Sampled
(temperature 0.8, top-p 0.95, seed 0): plain and speculative, because greedy output of small
models repeats itself, which flatters drafting. Reported: bytes accepted per pass, ms per pass
(prefill included), pass cost and speed-up relative to plain of the same kind (greedy or
sampled), whether greedy outputs are byte-identical to plain decoding, and head accuracies on
held-out text.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from pico.model import make_targets
from pico.model.generate import START, DraftTree, generate

REPO = Path(__file__).resolve().parents[1]
SAMPLING = dict(temperature=0.8, top_p=0.95, seed=0)
MODES = {"plain": dict(speculative=False), "speculative": dict(speculative=True, lazy_latent=False),
         "speculative_lazy": dict(speculative=True, lazy_latent=True), "tree": dict(speculative=True, lazy_latent=False),
         "sampled_plain": dict(speculative=False, **SAMPLING),
         "sampled_speculative": dict(speculative=True, lazy_latent=False, **SAMPLING)}
BASELINE = {m: "sampled_plain" if m.startswith("sampled") else "plain" for m in MODES}


def held_out(shards: str) -> dict[str, list[bytes]]:
    """Documents of the val split by kind: prose (novels) and code (Python sources)."""
    import zstandard

    from pico.data_prep.shards import decode_sample, read_shard
    from pico.pipeline.data.loader import resolve_shards

    kinds: dict[str, list[bytes]] = {"prose": [], "code": []}
    dctx = zstandard.ZstdDecompressor()
    for url in resolve_shards([shards], "val"):
        for _, sample in read_shard(url):
            raw, meta = decode_sample(sample, dctx)
            src = str(meta.get("source", ""))
            if "novels" in src:
                kinds["prose"].append(raw)
            elif str(meta.get("id", "")).endswith(".py"):
                kinds["code"].append(raw)
    return kinds


def make_prompts(docs: list[bytes], n: int, offset: int, size: int) -> list[bytes]:
    """n prompts of `size` bytes, `offset` bytes into each document (several per long document)."""
    long = [d for d in docs if len(d) >= offset + size]
    out, i = [], 0
    while len(out) < n and long:
        d = long[i % len(long)]
        at = offset * (1 + i // len(long))
        if at + size <= len(d):
            out.append(d[at:at + size])
        i += 1
        if i > 100 * n:
            break
    return out


def emit(row: dict, rows: list[dict]) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def compare(model, name: str, kind: str, prompts: list[bytes], batch: int, tree: DraftTree, args,
            rows: list[dict]) -> None:
    """All modes on the same prompts, interleaved, best of args.repeats."""
    groups = [[p] for p in prompts] if batch == 1 else [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    best = {m: math.inf for m in MODES}
    stats: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode, kw in MODES.items():
            secs, n_bytes, passes, bpp, outs = 0.0, 0, 0, [], []
            for g in groups:
                res = generate(model, g, args.max_bytes, routing_agreement=False, stop_at_eos=False,
                               tree=tree if mode == "tree" else None, **kw)
                secs += res.seconds
                n_bytes += res.n_bytes
                passes += res.forward_passes
                bpp.append(res.bytes_per_pass)
                outs += res.outputs
            best[mode] = min(best[mode], secs)
            stats[mode] = {"bytes": n_bytes, "passes": passes, "bytes_per_pass": sum(bpp) / len(bpp), "outputs": outs}
    for mode in MODES:
        st, base = stats[mode], BASELINE[mode]
        ms = 1e3 * best[mode] / st["passes"]
        base_ms = 1e3 * best[base] / stats[base]["passes"]
        emit({"measurement": "decode", "model": name, "text": kind, "batch": batch, "mode": mode,
              "bytes_per_pass": round(st["bytes_per_pass"], 3), "ms_per_pass": round(ms, 3),
              "pass_cost_vs_plain": round(ms / base_ms, 3), "speedup_vs_plain": round(best[base] / best[mode], 3),
              "bytes_per_s": round(st["bytes"] / best[mode], 1), "seconds": round(best[mode], 3),
              "forward_passes": st["passes"], "bytes": st["bytes"],
              # greedy: byte-identical to plain greedy; sampled: same distribution, different draws
              "identical_to_plain": st["outputs"] == stats[base]["outputs"] if base == "plain" else None,
              **({"tree_nodes": len(tree)} if mode == "tree" else {})}, rows)
    emit({"measurement": "sample", "model": name, "text": kind, "batch": batch,
          "prompt_tail": prompts[0][-60:].decode("utf-8", "replace"),
          "greedy": stats["speculative"]["outputs"][0][:160].decode("utf-8", "replace"),
          "sampled": stats["sampled_speculative"]["outputs"][0][:160].decode("utf-8", "replace")}, rows)


@torch.inference_mode()
def head_accuracy(model, docs: list[bytes], ranks: int = 4) -> list[list[float]]:
    """acc[h-1][r]: how often the rank-r byte of head h (byte t+h) is the true byte, on held-out
    text. Drafts can be accepted only as often as heads 2..n guess right (greedy acceptance
    also needs head 1 to agree); the tree is built from these."""
    cfg = model.cfg
    n = cfg.max_seq_len + cfg.n_predict - 1
    seq = torch.tensor([[START, *d[:n]] for d in docs if len(d) >= n])
    idx, tgt = make_targets(seq, cfg.n_predict)
    x, _ = model.trunk(idx, "causal")
    acc = []
    for h in range(1, cfg.n_predict + 1):
        top = model.head_logits(x, h).topk(ranks, dim=-1).indices  # (B, T, ranks)
        acc.append([round((top[..., r] == tgt[..., h - 1]).float().mean().item(), 4) for r in range(ranks)])
    return acc


@torch.inference_mode()
def greedy_acceptance(model, prompts: list[bytes], n: int, ranks: int = 4) -> list[list[float]]:
    """acc[h-1][r]: how often the rank-r byte of head h is the byte greedy decoding puts at t+h,
    over the model's own greedy continuations of held-out prompts: the acceptance statistics a
    greedy draft tree is accepted by (head accuracy on the true text understates them: greedy
    output is more predictable than text)."""
    cfg = model.cfg
    outs = generate(model, prompts, n, routing_agreement=False, stop_at_eos=False).outputs
    seqs = [([START, *p] + list(o))[-(cfg.max_seq_len + cfg.n_predict):] for p, o in zip(prompts, outs)]
    T = min(len(q) for q in seqs)
    idx, tgt = make_targets(torch.tensor([q[-T:] for q in seqs]), cfg.n_predict)
    x, _ = model.trunk(idx, "causal")
    acc = []
    for h in range(1, cfg.n_predict + 1):
        top = model.head_logits(x, h).topk(ranks, dim=-1).indices
        acc.append([round((top[..., r] == tgt[..., h - 1]).float().mean().item(), 4) for r in range(ranks)])
    return acc


def draft_tree(acc: list[list[float]], n_nodes: int) -> DraftTree:
    """The n_nodes most likely paths (`DraftTree.from_accuracy`), plus the rank-0 chain through
    every head so that the tree never accepts less than the chain."""
    paths = DraftTree.from_accuracy(acc, n_nodes).paths
    for d in range(1, len(acc) + 1):
        if (0,) * d not in paths:
            paths.append((0,) * d)
    return DraftTree(paths)


def main() -> None:
    from pico.pipeline.release.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="release or checkpoint directory (repeat)")
    ap.add_argument("--shards", required=True, help="shards whose val split holds the prompts (held out from training)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per kind of text (and the large batch)")
    ap.add_argument("--prompt-bytes", type=int, default=128)
    ap.add_argument("--offset", type=int, default=4000, help="bytes into a document where a prompt starts")
    ap.add_argument("--max-bytes", type=int, default=320, help="bytes generated per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tree-nodes", type=int, default=16, help="nodes of the draft tree after the root (plus the rank-0 chain)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/generate_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    docs = held_out(args.shards)
    prompts = {k: make_prompts(v, args.prompts, args.offset, args.prompt_bytes) for k, v in docs.items()}
    rows: list[dict] = []
    for path in args.model:
        model, info = load_model(path, "cpu")
        cfg = model.cfg
        name = Path(path).name
        emit({"measurement": "setup", "model": name, "path": str(path), "n_params": sum(p.numel() for p in model.parameters()),
              "config": {k: getattr(cfg, k) for k in ("d_local", "window", "n_in", "n_out", "d_latent", "n_latent",
                                                       "router", "capacity", "n_predict", "max_seq_len")},
              "step": info.get("step"), "prompts": {k: len(v) for k, v in prompts.items()},
              "prompt_bytes": args.prompt_bytes, "max_bytes": args.max_bytes, "threads": torch.get_num_threads(),
              "torch": torch.__version__}, rows)
        for kind, ps in prompts.items():
            acc = head_accuracy(model, docs[kind][:16])
            calib = make_prompts(docs[kind], 4, args.offset // 2, args.prompt_bytes)  # other held-out text
            acceptance = greedy_acceptance(model, calib, args.max_bytes)
            tree = draft_tree(acceptance[1:], args.tree_nodes)
            emit({"measurement": "head_accuracy", "model": name, "text": kind, "top1": [a[0] for a in acc],
                  "by_rank": acc, "greedy_acceptance_by_rank": acceptance, "tree_paths": tree.paths}, rows)
            for batch in (1, args.prompts):
                compare(model, name, kind, ps, batch, tree, args, rows)
    Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
