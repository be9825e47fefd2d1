"""Plain vs self-speculative decoding on CPU, greedy and sampled, side by side on the same held-out prompts.

    python benchmarks/bench_generate.py --model /tmp/spec31/qs4 --model /tmp/spec31/qs8 \
        --shards /tmp/spec31/shards

Models: each `--model` (a release or a training checkpoint / run directory). Prompts: held-out
documents (the `val` split of `--shards`, which the models never trained on), two kinds side by
side: prose (the novels) and code (the SymPy sources); prompt i is `--prompt-bytes`[i mod n]
bytes (default 200, 500, 1000 and 2000) taken `--offset` bytes into a document, and
`--max-bytes` bytes are generated from it (past max_seq_len with the defaults, so the
streaming context is measured too). Each measurement is one JSON line on stdout; all of them go
to benchmarks/results/generate_speed.json.

Per model, kind of text and batch (1: each prompt alone; 8: all together), the modes in turn,
median of `--repeats` (the modes interleaved so that load from other processes hits all of them
alike). Greedy: plain (one byte per pass), speculative (a chain of drafts from heads
2..n_predict verified in the same pass) and tree (`auto_tree`: the tree, or the chain, expected
to write the most bytes per second, from acceptance rates measured on the model's own
continuations of other held-out prompts and pass times measured here, at that batch size).
Sampled (temperature 0.8, top-p 0.95, seed 0): the same three, with their own calibration
(exact speculative sampling, so outputs differ from plain only as different draws do).
Reported: bytes accepted per pass, ms per pass (prefill included), pass cost and speed-up
relative to plain of the same kind (greedy or sampled), whether greedy outputs are
byte-identical to plain decoding, head accuracies on held-out text, acceptance rates and the
auto tree's candidates; `--breakdown` adds where a pass spends its time, by stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pico.model import make_targets
from pico.model.generate import START, auto_tree, generate
from pico.pipeline.experiment.store import portable

REPO = Path(__file__).resolve().parents[1]
SAMPLING = dict(temperature=0.8, top_p=0.95, seed=0)
MODES = {"plain": dict(speculative=False), "speculative": dict(speculative=True), "tree": dict(speculative=True),
         "sampled_plain": dict(speculative=False, **SAMPLING), "sampled_speculative": dict(speculative=True, **SAMPLING),
         "sampled_tree": dict(speculative=True, **SAMPLING)}
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


def make_prompts(docs: list[bytes], n: int, offset: int, sizes: list[int]) -> list[bytes]:
    """n prompts, the i-th of sizes[i mod len(sizes)] bytes, `offset` bytes into each document (several
    per long document)."""
    out, i = [], 0
    while len(out) < n and i <= 100 * n:
        size = sizes[len(out) % len(sizes)]
        long = [d for d in docs if len(d) >= offset + size]
        if not long:
            break
        d = long[i % len(long)]
        at = offset * (1 + i // len(long))
        if at + size <= len(d):
            out.append(d[at:at + size])
        i += 1
    return out


def emit(row: dict, rows: list[dict]) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def compare(model, name: str, kind: str, prompts: list[bytes], batch: int, trees: dict, args,
            rows: list[dict]) -> None:
    """All modes on the same prompts, interleaved, median of args.repeats; trees[mode] is the auto
    tree of a tree mode (None: it chose the chain)."""
    groups = [[p] for p in prompts] if batch == 1 else [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    times: dict[str, list[float]] = {m: [] for m in MODES}
    stats: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode, kw in MODES.items():
            secs, n_bytes, passes, bpp, outs = 0.0, 0, 0, [], []
            for g in groups:
                res = generate(model, g, args.max_bytes, routing_agreement=False, stop_at_eos=False,
                               tree=trees.get(mode), **kw)
                secs += res.seconds
                n_bytes += res.n_bytes
                passes += res.forward_passes
                bpp.append(res.bytes_per_pass)
                outs += res.outputs
            times[mode].append(secs)
            stats[mode] = {"bytes": n_bytes, "passes": passes, "bytes_per_pass": sum(bpp) / len(bpp), "outputs": outs}
    med = {m: statistics.median(t) for m, t in times.items()}
    for mode in MODES:
        st, base = stats[mode], BASELINE[mode]
        ms = 1e3 * med[mode] / st["passes"]
        base_ms = 1e3 * med[base] / stats[base]["passes"]
        tree = trees.get(mode)
        emit({"measurement": "decode", "model": name, "text": kind, "batch": batch, "mode": mode,
              "bytes_per_pass": round(st["bytes_per_pass"], 3), "ms_per_pass": round(ms, 3),
              "pass_cost_vs_plain": round(ms / base_ms, 3), "speedup_vs_plain": round(med[base] / med[mode], 3),
              "bytes_per_s": round(st["bytes"] / med[mode], 1), "seconds_median": round(med[mode], 3),
              "seconds_all": [round(t, 3) for t in times[mode]], "forward_passes": st["passes"], "bytes": st["bytes"],
              # greedy: byte-identical to plain greedy; sampled: same distribution, different draws
              "identical_to_plain": st["outputs"] == stats[base]["outputs"] if base == "plain" else None,
              **({"tree_nodes": 0 if tree is None else len(tree) - 1} if mode.endswith("tree") else {})}, rows)
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


def calibrate(model, name: str, kind: str, docs: list[bytes], batch: int, args, rows: list[dict]) -> dict:
    """The auto tree of each tree mode at this batch size, from the model's own continuations (greedy or
    sampled, as the mode decodes) of 4 held-out prompts other than the benchmark's."""
    calib = make_prompts(docs, 4, args.offset // 2, [256])
    trees = {}
    for mode, kw in (("tree", {}), ("sampled_tree", SAMPLING)):
        outs = generate(model, calib, args.max_bytes, routing_agreement=False, stop_at_eos=False, **kw).outputs
        choice = auto_tree(model, [p + o for p, o in zip(calib, outs)], kw.get("temperature", 0.0),
                           kw.get("top_p", 1.0), batch=batch, seed=1)
        trees[mode] = choice.tree
        emit({"measurement": "auto_tree", "model": name, "text": kind, "batch": batch, "mode": mode,
              "acceptance": [[round(a, 4) for a in row] for row in choice.acceptance],
              "candidates": choice.candidates, "chosen_nodes": 0 if choice.tree is None else len(choice.tree) - 1,
              "paths": None if choice.tree is None else choice.tree.paths, "seconds": round(choice.seconds, 2)}, rows)
    return trees


def breakdown(model, name: str, prompt: bytes, args, rows: list[dict]) -> None:
    """ms per pass by stage (model step, its latent part, heads, verification, drafting, commit), per
    mode, one prompt at batch 1, median of args.repeats: each stage's function is wrapped in a timer."""
    import pico.model.generate as G

    spent: dict[str, float] = {}

    def timer(f, key: str):
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
        return g

    # (owner, attribute, stage); instance attributes shadow the model's methods until deleted
    stages = [(model, "step", "model_step"), (model, "head_logits", "head_logits"),
              (G.Sampler, "verify", "verify"), (G.Sampler, "verify_tree", "verify"), (G.Sampler, "draft", "draft"),
              (G.Sampler, "draft_tree", "draft"), (G.Decoder, "_commit", "commit")]
    if model.router is not None:
        stages.append((model, "_latent_step", "latent_part_of_step"))
    saved = [(o, a, getattr(o, a)) for o, a, _ in stages if o is not model]
    for o, a, key in stages:
        setattr(o, a, timer(getattr(o, a), key))
    per_mode: dict[str, list[dict]] = {}
    try:
        for _ in range(args.repeats):
            for mode in ("plain", "speculative", "sampled_plain", "sampled_speculative"):
                spent.clear()
                res = generate(model, [prompt], args.max_bytes, routing_agreement=False, stop_at_eos=False, **MODES[mode])
                row = {k: 1e3 * v / res.forward_passes for k, v in spent.items()}
                row["total"] = 1e3 * res.seconds / res.forward_passes
                row["bytes_per_pass"] = res.bytes_per_pass
                per_mode.setdefault(mode, []).append(row)
    finally:
        for o, a, f in saved:
            setattr(o, a, f)
        for o, a, _ in stages:
            if o is model:
                delattr(model, a)
    for mode, runs in per_mode.items():
        keys = sorted({k for r in runs for k in r})
        emit({"measurement": "breakdown", "model": name, "mode": mode, "prompt_bytes": len(prompt),
              **{k: round(statistics.median(r.get(k, 0.0) for r in runs), 3) for k in keys}}, rows)


def main() -> None:
    from pico.pipeline.release.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="release or checkpoint directory (repeat)")
    ap.add_argument("--shards", required=True, help="shards whose val split holds the prompts (held out from training)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per kind of text (and the large batch)")
    ap.add_argument("--prompt-bytes", type=int, nargs="+", default=[200, 500, 1000, 2000],
                    help="prompt sizes, cycled over the prompts")
    ap.add_argument("--offset", type=int, default=4000, help="bytes into a document where a prompt starts")
    ap.add_argument("--max-bytes", type=int, default=320, help="bytes generated per prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (8: the prompts in one batch)")
    ap.add_argument("--breakdown", action="store_true", help="also time each stage of a pass (one prose prompt)")
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
        emit({"measurement": "setup", "model": name, "path": portable(path), "n_params": sum(p.numel() for p in model.parameters()),
              "config": {k: getattr(cfg, k) for k in ("d_local", "window", "n_in", "n_out", "d_latent", "n_latent",
                                                       "router", "capacity", "n_predict", "max_seq_len")},
              "step": info.get("step"), "prompts": {k: len(v) for k, v in prompts.items()},
              "prompt_bytes": args.prompt_bytes, "max_bytes": args.max_bytes, "threads": torch.get_num_threads(),
              "torch": torch.__version__}, rows)
        for kind, ps in prompts.items():
            if not ps:  # e.g. shards of prose only
                continue
            acc = head_accuracy(model, docs[kind][:16])
            emit({"measurement": "head_accuracy", "model": name, "text": kind, "top1": [a[0] for a in acc],
                  "by_rank": acc}, rows)
            for batch in args.batches:
                trees = calibrate(model, name, kind, docs[kind], batch, args, rows)
                compare(model, name, kind, ps, batch, trees, args, rows)
        if args.breakdown:
            breakdown(model, name, prompts["prose"][0], args, rows)
    Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
