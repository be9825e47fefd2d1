"""Routing that pays? Learned routers vs SpaceByte's rule vs a plain byte Transformer (issue 18).

    nice -n 5 python benchmarks/experiment.py --rev REV [--design experiment2] [--out /work/exp-runs] [--stop-at HH:MM]
    python benchmarks/experiment.py --measure 20          # seconds per step of each model, then exit
    python benchmarks/experiment.py --table --rev REV     # rewrite the table from the committed runs

`--design` picks one experiment of `DESIGNS` (its models, budgets, seeds, LR rule and results
folder); this docstring is experiment 2's protocol, the default. Experiments 3 and 4 (`--design
experiment3`, `experiment4`) are screens of the return path at 1e13 only: see `EXPERIMENT3`, `EXPERIMENT4`.

Models (`MODELS`, each a config plus overrides, all within 3 % of quickstart's training FLOPs
per byte, checked at start): `vanilla` (vanilla.yaml, router none, width matched with
`match_flops`), `spacelike` (spacebyte.yaml, SpaceByte's rule), `pico` (quickstart.yaml with
`router: learned`, MoD top-k), `chunk` (quickstart.yaml, `router: chunk`, H-Net's dynamic chunking, target
rate 0.19, ratio-loss weight 0.3), and the dechunking return path on the three routed ones
(`pico-dechunk`, `spacelike-dechunk`, `chunk-dechunk`).

Domains (`DOMAINS`), each with a held-out *test* set (>= 512 KB, scored in full) and a disjoint
held-out *select* set (picks the LR; never reported as the result):
- `prose`: the 99 novels, `pico prep` val_fraction 0.05 (split by document hash); test = 80 KB
  from the middle of each of the 7 val novels, select = 16 KB from a quarter into each.
- `code`: SymPy 1.13.3 sources + the Python 3.11 docs; the SymPy subpackages in `HELD_OUT` are
  removed from training whole (split by module, so held-out code is no near-duplicate of a
  training file); their files, in id order, go to select (every 4th, up to 128 KB) or test.

Protocol, in the order runs are launched (`plan`):
1. Budget 1e13 training FLOPs, seed 0: each model at each of `LRS` (3e-3, 6e-3, 1.2e-2): the core
   models (vanilla, spacelike, pico, chunk) on prose then code, then the dechunk variants. The LR with
   the lowest select-set bpb is that model's LR in that domain (one rule for all models); when it
   is the grid's lowest (highest), the sweep adds half (twice) that LR, up to `MAX_EXTEND` times.
2. Budget 3e13 at the chosen LR: seed 0 of every model in both domains (core models first), then
   seed 1, then seed 2 (so an interrupted sweep has every model at the same number of seeds).
   steps = budget / (train FLOPs per byte x 8 x 256); a seed sets the init and the data order, and
   every model with the same seed reads the same batches.
3. SOAP, the configs' betas, linear warmup over 10 % of the steps, cosine decay to 0.1 x peak.
4. Each run is scored with causal routing (as in generation) on both held-out sets of its
   domain, in windows of the model's max_seq_len (`pico eval`'s packer and `evaluate`), and its
   router's decisions on the test set are counted: boundary rate, share of boundaries at
   SpaceByte rule positions and at the byte after one (a word's first byte), chunk-length
   histogram, and the routed bytes of one fixed held-out paragraph (the routing picture).

Persistence (each session starts from a fresh clone; only commits survive): run directories
live outside the repo (`--out`, default /work/exp-runs); a scored run's small JSON is written to
benchmarks/results/experiment2/finished/<key>.json and committed at once, with the table
(results.md, results.json, routing-*.png). A committed run JSON is a finished run: it is reused,
never re-run. Every run uses the pico of one commit (`--rev`), extracted with `git archive`; its
rev is in every JSON and the table refuses to mix revs or held-out sets. Runs go one or more at a
time (`--jobs`, or the number in OUT/jobs, re-read between runs), each `pico train` in its own
process with OMP_NUM_THREADS=1; `--stop-at` launches nothing that would end after that time
(UTC). SIGTERM stops the runs in flight and commits nothing half-written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import io
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
RESULTS = ROOT / "benchmarks" / "results" / "experiment2"  # rebound by use(): the design's folder
RUNS = RESULTS / "finished"  # not runs/: .gitignore ignores every runs/ folder, and an ignored result is a lost one
NAME, TITLE = "experiment2", "Experiment 2 (issue 18): learned routing vs SpaceByte's rule vs a plain byte Transformer"

# Ratio-loss weight 0.3, not H-Net's 0.03: at 0.03 the boundary rate swung between 0.03 and 0.25 and ended at 0.12
# in 60-step smoke runs (experiment_notes.md), so the chunk model spent less than the FLOPs it is matched at. Target
# rate 0.19, not 0.2: W_q, W_k (and dechunk's residual) cost 1-1.5 % more per byte; at 0.19 chunk is 1.01x pico.
CHUNK = ["--model.router=chunk", "--model.aux_loss_weight=0.3", "--model.capacity=0.19"]
DECHUNK = ["--model.dechunk=true"]
# quickstart.yaml's router was `learned` up to the pinned rev of experiment 2 and is `spacelike` after it: pico names
# its router, so that the model is the same at every rev.
MOD = ["--model.router=learned"]
MODELS = {  # name: (config, overrides); the order is the launch order within a phase
    "vanilla": ("configs/vanilla.yaml", []),
    "spacelike": ("configs/spacebyte.yaml", []),
    "pico": ("configs/quickstart.yaml", MOD),
    "chunk": ("configs/quickstart.yaml", CHUNK),
    "spacelike-dechunk": ("configs/spacebyte.yaml", DECHUNK),
    "pico-dechunk": ("configs/quickstart.yaml", [*MOD, *DECHUNK]),
    "chunk-dechunk": ("configs/quickstart.yaml", [*CHUNK, *DECHUNK]),
}
CORE = ("vanilla", "spacelike", "pico", "chunk")
COMPARED = ("pico", "chunk", "pico-dechunk", "chunk-dechunk")  # each one's ratio to each baseline is reported
# A baseline whose name carries tags (spacelike-dechunk: the rule with the dechunk return path) is the baseline of the
# models that carry the same tags only; a plain one (spacelike, vanilla) of every compared model.
BASELINES = ("spacelike", "vanilla", "spacelike-dechunk")
TARGETS = {("code", "spacelike"): 0.97, ("prose", "spacelike"): 1.00, ("code", "vanilla"): 0.93,
           ("prose", "vanilla"): 0.93}  # issue 18: best learned router / baseline at 3e13, mean of 3 seeds
DOMAINS = ("prose", "code")
SWEEP_BUDGET, FINAL_BUDGET = 1e13, 3e13
LRS = (3e-3, 6e-3, 1.2e-2)
MAX_EXTEND = 2  # a sweep whose best LR is at the grid's edge grows past that edge, at most this many times
SEEDS = (0, 1, 2)
FIXED_LR: dict[str, float] = {}  # domain -> LR for every model, instead of a sweep (a design without SWEEP_BUDGET)
FLOPS_REF = "pico"  # every model's training FLOPs per byte within FLOPS_TOLERANCE of this one's
FLOPS_TOLERANCE = 0.03  # every model's training FLOPs per byte within 3 % of pico's
HELD_OUT = ("stats", "crypto", "logic")  # SymPy subpackages kept out of code training (test + select)
PROSE_TEST_KB, PROSE_SELECT_KB, CODE_SELECT_KB, MIN_TEST_KB = 80, 16, 128, 512
HIST_MAX = 32  # chunk lengths 1..32 counted one by one, longer ones in one bin

# Experiment 3: does a return at the byte stream's scale make dechunking (H-Net's return path) pay? Experiment 2 found
# dechunking hurt every router, the rule included, and the latent output returning at 2.2-4.2x the stream's RMS at
# init (model.return_init=1). A screen, not a verdict: 1e13 FLOPs only (where experiment 2's dechunk gap was 1.5-4 %),
# seeds 0 and 1, and every model at experiment 2's chosen LR of its domain (0.006 prose, 0.003 code: the choice of
# spacelike, chunk and every dechunk variant there), so the LR rule is the same for all. A variant that wins here goes
# to a full experiment (LR sweep, 3e13, 3 seeds).
RI = ["--model.return_init=0.25"]  # the return starts at 0.55-1.06x the stream's RMS (measured at init)
# What every screen shares: its protocol (one budget, two seeds, experiment 2's LR per domain) and its two rule baselines.
SCREEN = dict(TARGETS={}, SWEEP_BUDGET=None, FINAL_BUDGET=1e13, SEEDS=(0, 1), FIXED_LR={"prose": 6e-3, "code": 3e-3},
              FLOPS_REF="spacelike")
RULES = {"spacelike": ("configs/spacebyte.yaml", []), "spacelike-dechunk": ("configs/spacebyte.yaml", DECHUNK)}
EXPERIMENT3 = dict(
    **SCREEN,
    NAME="experiment3",
    TITLE="Experiment 3 (issue 18): the return path at the byte stream's scale (model.return_init)",
    MODELS={
        **RULES,
        "spacelike-ri0.25": ("configs/spacebyte.yaml", RI),
        "spacelike-dechunk-ri0.25": ("configs/spacebyte.yaml", [*DECHUNK, *RI]),
        "chunk-ri0.25": ("configs/quickstart.yaml", [*CHUNK, *RI]),
        "chunk-dechunk-ri0.25": ("configs/quickstart.yaml", [*CHUNK, *DECHUNK, *RI]),
        # H-Net's outer stages train at a higher LR than the inner one (e.g. 3.0/1.7/0.9); here the latent blocks at half
        # the local blocks' (experiment 2's sweep found the local LR past 2x the chosen one worse for every model).
        "chunk-dechunk-ri0.25-lat0.5": ("configs/quickstart.yaml", [*CHUNK, *DECHUNK, *RI, "--optim.lr_scale_latent=0.5"]),
    },
    CORE=("spacelike", "spacelike-dechunk", "spacelike-ri0.25", "spacelike-dechunk-ri0.25", "chunk-ri0.25",
          "chunk-dechunk-ri0.25", "chunk-dechunk-ri0.25-lat0.5"),
    COMPARED=("spacelike-ri0.25", "spacelike-dechunk", "spacelike-dechunk-ri0.25", "chunk-ri0.25", "chunk-dechunk-ri0.25",
              "chunk-dechunk-ri0.25-lat0.5"),
    BASELINES=("spacelike", "spacelike-dechunk", "spacelike-ri0.25", "spacelike-dechunk-ri0.25"),
)
# Experiment 4: H-Net's sum on the return path (model.dechunk_skip=linear: the bytes after the latent stage start from
# the dechunked output alone, and the stream comes back through a zero-initialised map), and a ratio loss nearer
# H-Net's weight (0.1 against 0.3; H-Net uses 0.03, which let the rate swing in smoke runs). The same screen as
# experiment 3: 1e13, seeds 0 and 1, experiment 2's LR per domain for every model.
LIN = ["--model.dechunk_skip=linear"]
CHUNK_AUX01 = ["--model.router=chunk", "--model.aux_loss_weight=0.1", "--model.capacity=0.19"]
EXPERIMENT4 = dict(
    **SCREEN,
    NAME="experiment4",
    TITLE="Experiment 4 (issue 18): H-Net's sum on the return path (model.dechunk_skip) and a lighter ratio loss",
    MODELS={
        **RULES,
        "spacelike-dechunk-lin": ("configs/spacebyte.yaml", [*DECHUNK, *LIN]),
        "chunk-dechunk-lin": ("configs/quickstart.yaml", [*CHUNK, *DECHUNK, *LIN]),
        "chunk-aux0.1": ("configs/quickstart.yaml", CHUNK_AUX01),
        "chunk-dechunk-aux0.1": ("configs/quickstart.yaml", [*CHUNK_AUX01, *DECHUNK]),
    },
    CORE=("spacelike", "spacelike-dechunk", "spacelike-dechunk-lin", "chunk-dechunk-lin", "chunk-aux0.1",
          "chunk-dechunk-aux0.1"),
    COMPARED=("spacelike-dechunk", "spacelike-dechunk-lin", "chunk-dechunk-lin", "chunk-aux0.1", "chunk-dechunk-aux0.1"),
    BASELINES=("spacelike", "spacelike-dechunk", "spacelike-dechunk-lin"),
)
DESIGNS = {"experiment2": {}, "experiment3": EXPERIMENT3, "experiment4": EXPERIMENT4}  # experiment 2: the module's names


def use(design: str) -> None:
    """Make `design` the experiment this process runs: rebinds the module's design names (one design per process,
    chosen before anything reads them; the driver passes it on to every job it starts)."""
    if design not in DESIGNS:
        raise SystemExit(f"--design {design!r}: not one of {', '.join(DESIGNS)}")
    names = dict(DESIGNS[design])
    names.setdefault("NAME", design)
    results = ROOT / "benchmarks" / "results" / names["NAME"]
    globals().update(names, RESULTS=results, RUNS=results / "finished")


def budgets() -> list[float]:
    return sorted({b for b in (SWEEP_BUDGET, FINAL_BUDGET) if b is not None})


def applies(base: str, model: str) -> bool:
    """Whether `base` is a baseline of `model`: the model carries every tag of the baseline's name (the parts after
    its first), and is not the baseline itself."""
    tags = set(model.split("-")[1:])
    return base != model and set(base.split("-")[1:]) <= tags


# ----------------------------------------------------------------------------- code pinning and processes


def pin_code(out: Path, rev: str) -> None:
    """Re-run this script on the pico of commit `rev` (git archive under out/snapshots/REV), once.

    Other engineers edit model/ and pipeline/ while a sweep runs; every run of one sweep must use
    the same code, so the driver and each `pico train` import pico from that snapshot
    (PYTHONPATH is searched before the editable install's finder)."""
    if os.environ.get("PICO_EXPERIMENT_REV"):
        return
    rev = git("rev-parse", rev).strip()
    dest = out / "snapshots" / rev[:12]
    if not (dest / "pico" / "model").exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "--prefix=pico/", rev, "model", "pipeline", "data_prep", "cluster",
                                  "configs"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(dest)
    environ = dict(os.environ, PICO_EXPERIMENT_REV=rev, PYTHONPATH=str(dest))
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], environ)


def pinned_rev() -> str:
    return os.environ.get("PICO_EXPERIMENT_REV", "working-tree")


def config_path(config: str) -> str:
    """A config from the pinned snapshot (the code every run uses), else from the tree."""
    pinned = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    if pinned and (Path(pinned) / "pico" / config).exists():
        return str(Path(pinned) / "pico" / config)
    return str(ROOT / config)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def emit(record: dict) -> None:
    """One JSON line per measurement on stdout."""
    print(json.dumps(record, default=float), flush=True)


def env() -> dict[str, str]:
    e = dict(os.environ, DS_ACCELERATOR="cpu", TORCHDYNAMO_DISABLE="1", WANDB_MODE="disabled",
             PYTHONUNBUFFERED="1")
    e.setdefault("OMP_NUM_THREADS", "1")  # two torch threads on a shared core spin in barriers (experiment_notes)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pico-torch-extensions"))
    return e


def commit(paths: list[Path], message: str) -> None:
    """Commit exactly `paths` (others' staged work untouched), waiting out another process's index.lock."""
    rel = [str(p.relative_to(ROOT)) for p in paths if p.exists()]
    if not rel:
        return
    lock = ROOT / git("rev-parse", "--git-path", "index.lock").strip()
    for attempt in range(60):
        if lock.exists():
            time.sleep(2)
            continue
        add = subprocess.run(["git", "add", "--", *rel], cwd=ROOT, capture_output=True, text=True)
        if add.returncode == 0:
            staged = subprocess.run(["git", "diff", "--cached", "--quiet", "--", *rel], cwd=ROOT)
            if staged.returncode == 0:
                return  # nothing changed
            done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=ROOT, capture_output=True,
                                  text=True)
            if done.returncode == 0:
                return
            add = done
        if "index.lock" not in add.stderr:
            raise RuntimeError(f"git commit of {rel} failed: {add.stderr.strip()}")
        time.sleep(2)
    raise RuntimeError(f"git commit of {rel}: {lock} stayed locked for 2 minutes")


# ----------------------------------------------------------------------------- data


def sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def write_once(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


def prepare(inputs: list[str], shards: Path, val_fraction: float) -> Path:
    """`pico prep` into `shards`, once (reused when the manifest is there)."""
    if not (shards / "manifest.json").exists():
        from pico.data_prep import prepare as prep

        prep(inputs=inputs, output=str(shards), val_fraction=val_fraction, workers=1, progress=False)
    return shards


def prose_data(out: Path) -> dict:
    """Shards of the novels; test and select slices of every val novel (disjoint byte ranges)."""
    import zstandard

    from pico.pipeline.data.loader import _eval_documents, resolve_shards

    shards = prepare([str(CORPUS / "novels")], out / "prose" / "shards", 0.05)
    folder = out / "prose" / "heldout"
    if not (folder / "done").exists():
        for split in ("test", "select"):
            (folder / split).mkdir(parents=True, exist_ok=True)
        dctx = zstandard.ZstdDecompressor()
        docs = [doc for url in resolve_shards([str(shards)], "val") for _, doc in _eval_documents(url, dctx, False)]
        for i, doc in enumerate(docs):
            mid = doc.find(b"\n", len(doc) // 2) + 1  # start on a line, in the middle of the novel
            quarter = doc.find(b"\n", len(doc) // 4) + 1
            assert quarter + PROSE_SELECT_KB * 1024 < mid, f"val novel {i} is too short for disjoint slices"
            write_once(folder / "test" / f"doc{i}.txt", doc[mid:mid + PROSE_TEST_KB * 1024])
            write_once(folder / "select" / f"doc{i}.txt", doc[quarter:quarter + PROSE_SELECT_KB * 1024])
        (folder / "done").write_text("")
    test = sorted((folder / "test").glob("doc*.txt"))
    text = test[0].read_bytes()
    start = text.find(b"\n\n") + 2  # the first whole paragraph of the first test slice
    return {"shards": shards, "test": test, "select": sorted((folder / "select").glob("doc*.txt")),
            "paragraph": text[start:start + 255]}


def sympy_files() -> list[dict]:
    import zstandard

    with open(CORPUS / "sympy-code.jsonl.zst", "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        return sorted((json.loads(line) for line in reader), key=lambda r: r["id"])


def held_out(file_id: str) -> bool:
    """A file of one of the HELD_OUT SymPy subpackages (ids look like sympy/stats/rv.py)."""
    parts = file_id.split("/")
    return len(parts) > 2 and parts[0] == "sympy" and parts[1] in HELD_OUT


def split_held_out(files: list[dict]) -> tuple[list[dict], list[dict]]:
    """(test, select) of the non-empty held-out files in id order: every 4th to select until it holds CODE_SELECT_KB."""
    test, select, size = [], [], 0
    for i, f in enumerate(x for x in files if held_out(x["id"]) and x["text"].strip()):  # no empty __init__.py
        if i % 4 == 3 and size < CODE_SELECT_KB * 1024:
            select.append(f)
            size += len(f["text"].encode("utf-8"))
        else:
            test.append(f)
    return test, select


def code_data(out: Path) -> dict:
    """Shards of the SymPy sources outside HELD_OUT plus the Python docs; held-out SymPy files as test and select."""
    root = out / "code"
    raw = root / "raw"
    folder = root / "heldout"
    if not (folder / "done").exists():
        files = sympy_files()
        raw.mkdir(parents=True, exist_ok=True)
        train = "".join(json.dumps({"id": f["id"], "text": f["text"]}) + "\n" for f in files if not held_out(f["id"]))
        write_once(raw / "sympy-train.jsonl", train.encode("utf-8"))
        test, select = split_held_out(files)
        for split, part in (("test", test), ("select", select)):
            (folder / split).mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(part):
                write_once(folder / split / f"{i:04d}-{f['id'].replace('/', '.')}", f["text"].encode("utf-8"))
        (folder / "done").write_text("")
    shards = prepare([str(raw / "sympy-train.jsonl"), str(CORPUS / "python-docs.jsonl.gz")], root / "shards", 0.02)
    test = sorted((folder / "test").iterdir())
    text = b"".join(p.read_bytes() for p in test[:8])
    start = text.find(b"\ndef ") + 1  # a function of a held-out module
    return {"shards": shards, "test": test, "select": sorted((folder / "select").iterdir()),
            "paragraph": text[start:start + 255]}


def domain_data(out: Path, domain: str) -> dict:
    data = prose_data(out) if domain == "prose" else code_data(out)
    test_kb = sum(p.stat().st_size for p in data["test"]) / 1024
    if test_kb < MIN_TEST_KB:
        raise RuntimeError(f"{domain}: the test set holds {test_kb:.0f} KB, fewer than {MIN_TEST_KB}")
    data.update(test_sha=sha(data["test"]), select_sha=sha(data["select"]), test_kb=test_kb,
                select_kb=sum(p.stat().st_size for p in data["select"]) / 1024)
    return data


# ----------------------------------------------------------------------------- one run


def run_key(domain: str, model: str, budget: float, lr: float, seed: int) -> str:
    return f"{domain}-{model}-{budget:.0e}".replace("+", "") + f"-lr{lr:g}-s{seed}"


def model_info(model: str) -> dict:
    from pico.configs.tree import load_config
    from pico.model.flops import flops_at_rate

    config, overrides = MODELS[model]
    cfg = load_config(config_path(config), overrides)
    f = flops_at_rate(cfg.model)
    return {"router": cfg.model.router, "seq_len": cfg.model.max_seq_len, "batch_size": cfg.data.batch_size,
            "data_seq_len": cfg.data.seq_len, "flops_per_byte": f["at_capacity"], "flops_per_byte_at_cap": f["at_cap"]}


def steps_for(budget: float, info: dict) -> int:
    return max(1, round(budget / (info["flops_per_byte"] * info["batch_size"] * info["data_seq_len"])))


def train_run(run_dir: Path, model: str, steps: int, lr: float, seed: int, shards: Path) -> dict:
    """One `pico train` process from scratch; its JSON summary, wall seconds and last logged router stats."""
    config, overrides = MODELS[model]
    cmd = [sys.executable, "-m", "pico.pipeline.cli", "train", "--config", config_path(config), "--no-progress",
           "--json", f"--train.out_dir={run_dir}", f"--train.steps={steps}", f"--optim.lr={lr}",
           f"--optim.warmup_steps={max(1, round(0.1 * steps))}", "--optim.schedule=cosine",
           "--optim.min_lr_ratio=0.1", f"--train.seed={seed}", f"--train.eval_every={steps}",
           "--train.eval_batches=4", f"--train.log_every={max(1, min(25, steps // 10))}",
           f"--checkpoint.every={steps}", "--checkpoint.keep_last=1", "--logging.wandb_mode=disabled",
           f"--data.train=[{shards}]", *overrides]
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts again from scratch
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pico train failed ({run_dir}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = ([r for r in rows if "loss" in r] or [{}])[-1]
    bps = summary.get("bytes_per_s_median")
    return {"train_s": seconds, "seconds_per_step": summary["bytes_seen"] / bps / steps if bps else None,
            "bytes_seen": summary["bytes_seen"], "train_bpb_last": last.get("bpb_train"),
            "train_router_last": {k[len("router/"):]: v for k, v in last.items() if k.startswith("router/")}}


class Recorder:
    """The model as `evaluate` calls it, keeping each batch's inputs, valid positions and routed mask."""

    def __init__(self, model):
        self.model, self.cfg, self.seen = model, model.cfg, []

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self):
        self.model.eval()

    def train(self, mode: bool = True):
        self.model.train(mode)

    def __call__(self, idx, targets, **kw):
        from pico.model.pico import IGNORE

        out = self.model(idx, targets, **kw)
        if out.routed is not None:
            self.seen.append((idx, targets[..., 0] != IGNORE, out.routed))
        return out


def routing_counts(seen: list) -> dict:
    """Boundary rate, share at SpaceByte rule positions and at the byte after one, chunk-length histogram."""
    import torch

    from pico.model.spacelike import spacelike_boundaries

    n = routed = rule = at_rule = after = length_sum = 0
    hist = [0] * (HIST_MAX + 1)  # hist[k-1]: chunks of k bytes; hist[HIST_MAX]: longer
    for idx, valid, mask in seen:
        valid = valid if valid is not None else torch.ones_like(mask)
        r = spacelike_boundaries(idx)
        a = torch.zeros_like(r)
        a[:, 1:] = r[:, :-1]
        m = mask & valid
        n += int(valid.sum())
        routed += int(m.sum())
        rule += int((r & valid).sum())
        at_rule += int((m & r).sum())
        after += int((m & a).sum())
        for row, v in zip(m, valid.sum(1).tolist()):  # a chunk runs to the next boundary or the row's last byte
            pos = row[:v].nonzero().flatten().tolist()
            for length in (b - s for s, b in zip(pos, pos[1:] + [v])):
                hist[min(length, HIST_MAX + 1) - 1] += 1
                length_sum += length
    lengths = [(k + 1, c) for k, c in enumerate(hist) if c]
    total = sum(hist)

    def quantile(q: float) -> float | None:
        acc = 0
        for k, c in lengths:
            acc += c
            if acc >= q * total:
                return k
        return None

    return {"positions": n, "boundary_rate": routed / max(1, n), "rule_rate": rule / max(1, n),
            "share_at_rule": at_rule / max(1, routed), "share_after_rule": after / max(1, routed),
            "share_at_or_after_rule": (at_rule + after) / max(1, routed), "rule_recall": at_rule / max(1, rule),
            "chunks": total, "chunk_len_mean": length_sum / max(1, total),
            "chunk_len_p50": quantile(0.5), "chunk_len_p90": quantile(0.9), "chunk_len_hist": hist}


def score_main(args: argparse.Namespace) -> None:
    """Internal (`--score RUN_DIR`): both held-out sets and the routing picture of one run, one JSON line."""
    import torch

    from pico.pipeline.data.eval_packing import pack_eval, text_file_batches
    from pico.pipeline.eval.evaluate import evaluate
    from pico.pipeline.release.load import load_model

    model, _ = load_model(Path(args.score), "cpu")
    T, extra = model.cfg.max_seq_len, model.cfg.n_predict
    out = {}
    for split in ("select", "test"):
        files = [Path(f) for f in json.loads(args.files_json)[split]]
        rec = Recorder(model)
        t0 = time.perf_counter()
        res = evaluate(rec, text_file_batches(files, T, extra, 8), torch.device("cpu"), routing="causal")
        out[split] = {"bpb": res["bpb"], "bytes": res["bytes"], "seconds": time.perf_counter() - t0,
                      "router": {k[len("router/"):]: v for k, v in res.items() if k.startswith("router/")}}
        if split == "test" and rec.seen:
            out["routing"] = routing_counts(rec.seen)
    if model.cfg.router != "none":
        paragraph = bytes.fromhex(args.paragraph)
        batch, n_valid = next(pack_eval([paragraph], T, extra=extra, batch_size=1))
        idx = batch[:, :T]
        with torch.no_grad():
            routed = model.eval()(idx, routing="causal").routed[0, :int(n_valid[0])]
        out["picture"] = {"ids": idx[0, :int(n_valid[0])].tolist(), "routed": "".join("1" if x else "0" for x in routed)}
    print(json.dumps(out))


def run_job(spec: dict, out: Path) -> Path:
    """Train, score and write one run's result JSON (written under a temporary name, then renamed)."""
    domain, model, budget, lr, seed = spec["domain"], spec["model"], spec["budget"], spec["lr"], spec["seed"]
    key = run_key(domain, model, budget, lr, seed)
    data = domain_data(out, domain)
    info = model_info(model)
    steps = steps_for(budget, info)
    run_dir = out / "runs" / (pinned_rev()[:12] if NAME == "experiment2" else f"{NAME}-{pinned_rev()[:12]}") / key
    t0 = time.perf_counter()
    trained = train_run(run_dir, model, steps, lr, seed, data["shards"])
    files = json.dumps({s: [str(p) for p in data[s]] for s in ("select", "test")})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--score", str(run_dir), "--files-json", files,
           "--paragraph", data["paragraph"].hex()]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scoring {run_dir} failed:\n{proc.stderr[-3000:]}")
    scored = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"key": key, "rev": pinned_rev(), "domain": domain, "model": model, "router": info["router"],
              "config": MODELS[model][0], "overrides": MODELS[model][1], "budget": budget, "lr": lr, "seed": seed,
              "steps": steps, "flops_per_byte": info["flops_per_byte"], "flops_per_byte_at_cap": info["flops_per_byte_at_cap"],
              "flops": steps * info["flops_per_byte"] * info["batch_size"] * info["data_seq_len"],
              "test_bpb": scored["test"]["bpb"], "select_bpb": scored["select"]["bpb"],
              "test_bytes": scored["test"]["bytes"], "select_bytes": scored["select"]["bytes"],
              "test_sha": data["test_sha"], "select_sha": data["select_sha"],
              "eval_router": scored["test"]["router"], "routing": scored.get("routing"),
              "picture": scored.get("picture"), **trained,
              "score_s": scored["test"]["seconds"] + scored["select"]["seconds"],
              "wall_s": time.perf_counter() - t0, "machine": machine(),
              "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    RUNS.mkdir(parents=True, exist_ok=True)
    path = RUNS / f"{key}.json"
    write_once(path, json.dumps(result, indent=1, default=float).encode())
    return path


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {os.environ.get('OMP_NUM_THREADS', '?')} thread(s)/run"


# ----------------------------------------------------------------------------- results (pure: tested with fake runs)


def load_runs(folder: Path | None = None) -> list[dict]:
    """Every committed run JSON; one rev and one held-out set per domain, or an error saying which differ."""
    folder = folder or RUNS
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    revs = sorted({r["rev"] for r in runs})
    if len(revs) > 1:
        raise SystemExit(f"{folder} holds runs of {len(revs)} pico revs ({', '.join(r[:12] for r in revs)}); "
                         "one table is one rev: move the other rev's runs away or pass its --rev")
    for domain in {r["domain"] for r in runs}:
        shas = {(r["test_sha"], r["select_sha"]) for r in runs if r["domain"] == domain}
        if len(shas) > 1:
            raise SystemExit(f"{folder}: {domain} runs were scored on {len(shas)} different held-out sets")
    return runs


def lr_grid(runs: list[dict], domain: str, model: str, lrs=None) -> tuple[list[float], float | None]:
    """(the LRs to sweep for (domain, model), the chosen one or None while the sweep is incomplete).

    One rule for every model: sweep `lrs`; while the lowest select bpb is at an edge of the grid, add the
    next LR past that edge (x0.5 or x2), at most MAX_EXTEND times. An edge pick after that is kept.
    A design with FIXED_LR sweeps nothing: the domain's LR is every model's."""
    if FIXED_LR:
        return [FIXED_LR[domain]], FIXED_LR[domain]
    lrs = lrs or LRS
    sweep = {r["lr"]: r["select_bpb"] for r in runs if (r["domain"], r["model"], r["budget"], r["seed"])
             == (domain, model, SWEEP_BUDGET, 0)}
    grid = sorted(lrs)
    for _ in range(MAX_EXTEND + 1):
        if not all(lr in sweep for lr in grid):
            return grid, None
        best = min(grid, key=lambda lr: (sweep[lr], lr))
        if len(grid) - len(lrs) == MAX_EXTEND or grid[0] < best < grid[-1]:
            return grid, best
        grid = [best / 2, *grid] if best == grid[0] else [*grid, best * 2]
    raise AssertionError("unreachable")


def choose_lrs(runs: list[dict], lrs=None) -> dict[tuple[str, str], float]:
    """(domain, model) -> the chosen LR (`lr_grid`), once its sweep is complete."""
    out = {}
    pairs = {(d, m) for d in DOMAINS for m in MODELS} if FIXED_LR else {(r["domain"], r["model"]) for r in runs}
    for domain, model in pairs:
        best = lr_grid(runs, domain, model, lrs)[1]
        if best is not None:
            out[domain, model] = best
    return out


def plan(runs: list[dict], models=None, lrs=None, seeds=None) -> tuple[list[dict], int]:
    """(runs ready to launch, in launch order, not yet finished; number of runs the protocol has in all)."""
    models, lrs, seeds = tuple(models or MODELS), lrs or LRS, seeds or SEEDS
    done = {r["key"] for r in runs}
    chosen = choose_lrs(runs, lrs)
    groups = [[m for m in models if m in CORE], [m for m in models if m not in CORE]]
    order, total = [], len(models) * len(DOMAINS) * len(seeds)
    for group in groups if SWEEP_BUDGET is not None else []:  # 1. LR sweeps: the core models, then the dechunk variants
        for domain in DOMAINS:
            grids = {m: lr_grid(runs, domain, m, lrs)[0] for m in group}
            order += [dict(domain=domain, model=m, budget=SWEEP_BUDGET, lr=lr, seed=0) for m in group for lr in grids[m]]
            total += sum(map(len, grids.values()))
    for seed in seeds:  # 2. each seed of every model (core first) before the next seed
        for group in groups:
            for domain in DOMAINS:
                order += [dict(domain=domain, model=m, budget=FINAL_BUDGET, lr=chosen[domain, m], seed=seed)
                          for m in group if (domain, m) in chosen]
    ready = [s for s in order if run_key(**s) not in done]
    return ready, total


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def aggregate(runs: list[dict], lrs=None) -> dict:
    """Per domain, model and budget: bpb at the chosen LR over seeds (mean, std), with per-seed values;
    ratios of each learned model to each baseline over the seeds both have (ratio of means; per-seed ratios)."""
    chosen = choose_lrs(runs, lrs)
    cells: dict[str, dict] = {}
    for (domain, model), lr in sorted(chosen.items()):
        for budget in budgets():
            rs = sorted((r for r in runs if (r["domain"], r["model"], r["budget"], r["lr"]) == (domain, model, budget, lr)),
                        key=lambda r: r["seed"])
            if rs:
                m, s = mean_std([r["test_bpb"] for r in rs])
                cells[f"{domain}/{model}/{budget:.0e}"] = {
                    "domain": domain, "model": model, "budget": budget, "lr": lr, "n_seeds": len(rs), "mean": m,
                    "std": s, "per_seed": {r["seed"]: r["test_bpb"] for r in rs}}
    ratios = {}
    for c in cells.values():
        if c["model"] not in COMPARED:
            continue
        for base in BASELINES:
            if not applies(base, c["model"]):
                continue  # e.g. the rule with the dechunk return path is the baseline of the dechunk variants only
            b = cells.get(f"{c['domain']}/{base}/{c['budget']:.0e}")
            if not b:
                continue
            shared = [s for s in sorted(c["per_seed"]) if s in b["per_seed"]]
            if not shared:
                continue
            paired = [c["per_seed"][s] / b["per_seed"][s] for s in shared]
            # The ratio of means is over the shared seeds only: a seed's data order moves bpb by several percent
            # (both models alike), so a mean over unpaired seeds would compare data orders, not models.
            means = [statistics.fmean(cell["per_seed"][s] for s in shared) for cell in (c, b)]
            ratios[f"{c['domain']}/{c['model']}/{base}/{c['budget']:.0e}"] = {
                "domain": c["domain"], "model": c["model"], "baseline": base, "budget": c["budget"],
                "ratio_of_means": means[0] / means[1], "n_pairs": len(paired), "seeds": shared,
                "per_seed": paired, "min": min(paired, default=None), "max": max(paired, default=None),
                "std": statistics.stdev(paired) if len(paired) > 1 else None,
                "target": TARGETS.get((c["domain"], base)) if c["budget"] == FINAL_BUDGET else None}
    return {"chosen_lr": {f"{d}/{m}": lr for (d, m), lr in sorted(chosen.items())}, "cells": cells, "ratios": ratios}


def router_table(runs: list[dict], chosen: dict) -> list[dict]:
    """Router behaviour on the test set per domain, model and budget (chosen LR), summed over seeds."""
    out = []
    for (domain, model), lr in sorted(chosen.items()):
        for budget in budgets():
            rs = [r for r in runs if (r["domain"], r["model"], r["budget"], r["lr"]) == (domain, model, budget, lr)
                  and r.get("routing")]
            if not rs:
                continue
            hist = [sum(h) for h in zip(*(r["routing"]["chunk_len_hist"] for r in rs))]
            row = {"domain": domain, "model": model, "budget": budget, "n_seeds": len(rs), "hist": hist}
            for k in ("boundary_rate", "rule_rate", "share_at_rule", "share_after_rule", "share_at_or_after_rule",
                      "rule_recall", "chunk_len_mean", "chunk_len_p50", "chunk_len_p90"):
                vals = [r["routing"][k] for r in rs if r["routing"].get(k) is not None]
                row[k] = statistics.fmean(vals) if vals else None
            rates = [r["eval_router"].get("flops_per_byte_at_rate") for r in rs]
            row["flops_at_rate_ratio"] = (statistics.fmean(rates) / rs[0]["flops_per_byte"]
                                          if None not in rates else None)
            out.append(row)
    return out


HIST_BINS = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 6), (7, 8), (9, 12), (13, 16), (17, 32), (33, 10**9))


def hist_cells(hist: list[int]) -> list[str]:
    total = max(1, sum(hist))
    return [f"{100 * sum(hist[k - 1] for k in range(lo, min(hi, len(hist)) + 1)) / total:.1f}" for lo, hi in HIST_BINS]


def chunk_len(x) -> str:
    """A chunk-length quantile; HIST_MAX + 1 stands for the open last bin."""
    return "-" if x is None else (f">{HIST_MAX}" if x > HIST_MAX else f"{x:g}")


def fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def label(budget: float) -> str:
    return f"{budget:.0e}".replace("+", "")


def table_lines(runs: list[dict], total: int) -> tuple[list[str], dict]:
    """results.md's body and results.json's payload from the finished runs."""
    agg = aggregate(runs)
    chosen = {tuple(k.split("/")): v for k, v in agg["chosen_lr"].items()}
    routers = router_table(runs, chosen)
    rev = runs[0]["rev"] if runs else None
    sweeps = SWEEP_BUDGET is not None and SWEEP_BUDGET != FINAL_BUDGET
    lr_rule = ("the LR was chosen on the disjoint *select* set" if not FIXED_LR else
               "one fixed LR per domain for every model (" + ", ".join(f"{d} {lr:g}" for d, lr in FIXED_LR.items()) + ")")
    md = [f"# {TITLE}", "",
          f"pico rev `{rev}` (every run; a `git archive` snapshot). **{len(runs)} of {total}** planned runs finished. "
          "Protocol and resume command: [README.md](README.md). bpb: bits per byte on the domain's held-out "
          f"*test* set, causal routing, 256-byte windows; {lr_rule}.", ""]
    final = label(FINAL_BUDGET)
    md += ["## Bits per byte at the chosen LR", "",
           "mean over the seeds that finished; std is the sample standard deviation over seeds (n-1)"
           + (f"; {label(SWEEP_BUDGET)} has seed 0 only" if sweeps else "") + ". Means over different seed sets do "
           "not compare: compare models by the paired ratios below.", "",
           "| domain | model | LR |" + (f" {label(SWEEP_BUDGET)} (seed 0) |" if sweeps else "")
           + f" {final} mean | {final} std | {final} seeds | {final} per seed |",
           "| --- | --- | ---: |" + (" ---: |" if sweeps else "") + " ---: | ---: | ---: | --- |"]
    for (domain, model), lr in sorted(chosen.items(), key=lambda x: (DOMAINS.index(x[0][0]), list(MODELS).index(x[0][1]))):
        b = agg["cells"].get(f"{domain}/{model}/{FINAL_BUDGET:.0e}")
        if not b and not sweeps:
            continue  # a fixed-LR design's model that has no run yet
        a = agg["cells"].get(f"{domain}/{model}/{SWEEP_BUDGET:.0e}") if sweeps else None
        md.append(f"| {domain} | {model} | {lr:g} |" + (f" {fmt(a and a['mean'])} |" if sweeps else "")
                  + f" {fmt(b and b['mean'])} | {fmt(b and b['std'])} | {b['n_seeds'] if b else 0} | "
                  f"{', '.join(f'{v:.4f}' for v in b['per_seed'].values()) if b else '-'} |")
    md += ["", "## Ratios (compared model / baseline)", "",
           "ratio of means over the seeds both models finished (a seed's data order moves bpb by several percent for "
           "every model alike, so only paired seeds compare models); spread = min..max and std of the per-seed ratios, seeds paired (the same seed gives "
           "both models the same data order)." + (" Targets (issue 18) apply at 3e13 with 3 seeds." if TARGETS else ""), "",
           "| domain | budget | model | baseline | ratio of means | pairs | per-seed min..max | per-seed std | target |",
           "| --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in sorted(agg["ratios"].values(), key=lambda r: (DOMAINS.index(r["domain"]), r["budget"], r["model"], r["baseline"])):
        md.append(f"| {r['domain']} | {r['budget']:.0e} | {r['model']} | {r['baseline']} | {r['ratio_of_means']:.4f} | "
                  f"{r['n_pairs']} | {fmt(r['min'])}..{fmt(r['max'])} | {fmt(r['std'])} | {fmt(r['target'], '.2f')} |")
    sweep = sorted((r for r in runs if r["budget"] == SWEEP_BUDGET and r["seed"] == 0),
                   key=lambda r: (DOMAINS.index(r["domain"]), list(MODELS).index(r["model"]), r["lr"])) if sweeps else []
    if sweeps:
        md += ["", f"## LR sweep ({label(SWEEP_BUDGET)} FLOPs, seed 0)", "",
               "| domain | model | LR | steps | select bpb | test bpb | chosen | wall s |",
               "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in sweep:
        pick = chosen.get((r["domain"], r["model"]))
        grid = lr_grid(runs, r["domain"], r["model"])[0]
        mark = "-" if pick is None else ("**yes**" + (" (grid edge)" if pick in (grid[0], grid[-1]) else "")
                                         if pick == r["lr"] else "")
        md.append(f"| {r['domain']} | {r['model']} | {r['lr']:g} | {r['steps']} | {r['select_bpb']:.4f} | "
                  f"{r['test_bpb']:.4f} | {mark} | {r['wall_s']:.0f} |")
    md += ["", "## Router behaviour on the test set (causal routing, chosen LR, mean over seeds)", "",
           "boundary rate: routed share of positions; at rule: share of boundaries at SpaceByte rule positions "
           "(a spacelike byte after a non-spacelike one); after rule: at the byte after one (a word's first byte); "
           "rule recall: share of rule positions routed; last column: training FLOPs per byte at the test set's "
           "boundary rate over those the run was matched at (its `capacity`): the chunk router's rate is learned, "
           "so its real cost can drift from the match.", "",
           "| domain | model | budget | seeds | boundary rate | rule rate | at rule | after rule | at or after | "
           "rule recall | chunk len mean | p50 | p90 | FLOPs at rate / as matched |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in routers:
        md.append(f"| {r['domain']} | {r['model']} | {r['budget']:.0e} | {r['n_seeds']} | {fmt(r['boundary_rate'], '.3f')} | "
                  f"{fmt(r['rule_rate'], '.3f')} | {fmt(r['share_at_rule'], '.3f')} | {fmt(r['share_after_rule'], '.3f')} | "
                  f"{fmt(r['share_at_or_after_rule'], '.3f')} | {fmt(r['rule_recall'], '.3f')} | "
                  f"{fmt(r['chunk_len_mean'], '.2f')} | {chunk_len(r['chunk_len_p50'])} | {chunk_len(r['chunk_len_p90'])} | "
                  f"{fmt(r['flops_at_rate_ratio'], '.3f')} |")
    md += ["", "Chunk-length histogram (% of chunks; a chunk runs from a boundary to the next one):", "",
           "| domain | model | budget | " + " | ".join(f"{lo}" if lo == hi else (f"{lo}+" if hi > 10**6 else f"{lo}-{hi}")
                                                    for lo, hi in HIST_BINS) + " |",
           "| --- | --- | ---: |" + " ---: |" * len(HIST_BINS)]
    for r in routers:
        md.append(f"| {r['domain']} | {r['model']} | {r['budget']:.0e} | " + " | ".join(hist_cells(r["hist"])) + " |")
    md += ["", "## Routing pictures (one held-out paragraph per domain, the same for every router)", ""]
    md += [f"![{d} {m}](routing-{d}-{m}.png)" for d, m in picture_runs(runs)]
    md += ["", "## All finished runs", "", "| key | steps | FLOPs/byte | select bpb | test bpb | s/step | train s | "
           "score s | wall s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['key']} | {r['steps']} | {r['flops_per_byte'] / 1e6:.2f} M | {r['select_bpb']:.4f} | "
           f"{r['test_bpb']:.4f} | {fmt(r.get('seconds_per_step'), '.2f')} | {r['train_s']:.0f} | {r['score_s']:.0f} | "
           f"{r['wall_s']:.0f} |" for r in runs]
    payload = {"rev": rev, "finished": len(runs), "planned": total, **agg,
               "chosen_lr": agg["chosen_lr"], "router": routers,
               "runs": [{k: v for k, v in r.items() if k not in ("picture",)} for r in runs]}
    return md, payload


def picture_runs(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """(domain, model) -> the run whose picture is shown: the largest budget, lowest seed, at the chosen LR."""
    chosen = choose_lrs(runs)
    best = {}
    for r in runs:
        dm = (r["domain"], r["model"])
        if r.get("picture") and (dm not in chosen or chosen[dm] == r["lr"]):
            old = best.get(dm)
            if old is None or (r["budget"], -r["seed"]) > (old["budget"], -old["seed"]):
                best[dm] = r
    return dict(sorted(best.items()))


def write_table(runs: list[dict], total: int, folder: Path | None = None, pictures: bool = True) -> list[Path]:
    """results.md, results.json and the routing pictures; returns the paths written."""
    folder = folder or RESULTS
    md, payload = table_lines(runs, total)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.md", folder / "results.json"]
    write_once(written[0], ("\n".join(md) + "\n").encode())
    write_once(written[1], json.dumps(payload, indent=1, default=float).encode())
    if pictures:
        from pico.pipeline.train.pictures import render_png

        for (domain, model), r in picture_runs(runs).items():
            path = folder / f"routing-{domain}-{model}.png"
            pic = r["picture"]
            render_png(pic["ids"], [c == "1" for c in pic["routed"]], path,
                       f"{model}, {domain}, {r['budget']:.0e} FLOPs, lr {r['lr']:g}, seed {r['seed']}")
            written.append(path)
    return written


# ----------------------------------------------------------------------------- the driver


def check_flops() -> None:
    """Training FLOPs per byte of each model against FLOPS_REF's (emitted); an error for any outside FLOPS_TOLERANCE."""
    ref = model_info(FLOPS_REF)["flops_per_byte"]
    for name in MODELS:
        info = model_info(name)
        ratio = info["flops_per_byte"] / ref
        emit({"measurement": "flops_match", "model": name, "train_flops_per_byte": info["flops_per_byte"],
              "at_cap": info["flops_per_byte_at_cap"], f"ratio_to_{FLOPS_REF}": ratio})
        if abs(ratio - 1) > FLOPS_TOLERANCE:
            raise SystemExit(f"{name} costs {ratio:.3f}x {FLOPS_REF}'s training FLOPs per byte (outside {FLOPS_TOLERANCE:.0%})")


def jobs_wanted(args: argparse.Namespace, out: Path) -> int:
    """--jobs, or the number in OUT/jobs (OUT/jobs-NAME for a design other than experiment 2) when that file exists:
    change it while the sweep runs."""
    try:
        return max(1, int((out / ("jobs" if NAME == "experiment2" else f"jobs-{NAME}")).read_text().strip()))
    except (FileNotFoundError, ValueError):
        return args.jobs


def stop_time(spec: str) -> dt.datetime | None:
    """The next HH:MM UTC from now (tomorrow's when today's has passed: a session may cross midnight)."""
    if not spec:
        return None
    now = dt.datetime.now(dt.timezone.utc)
    h, m = map(int, spec.split(":"))
    at = now.replace(hour=h, minute=m, second=0, microsecond=0)
    return at if at > now else at + dt.timedelta(days=1)


def predicted_seconds(runs: list[dict], spec: dict) -> float | None:
    """Wall seconds a run will take: the median of finished runs' seconds per FLOP at the same budget."""
    same = [r["wall_s"] / r["flops"] for r in runs if r["budget"] == spec["budget"]]
    return statistics.median(same) * spec["budget"] if same else None


def refresh(models) -> list[dict]:
    """Commit run JSONs not committed yet (a finished run of an interrupted driver), then the table."""
    runs = load_runs()
    total = plan(runs, models)[1]
    tracked = set(git("ls-files", "--", str(RUNS.relative_to(ROOT))).split())
    for path in sorted(RUNS.glob("*.json")):
        if str(path.relative_to(ROOT)) not in tracked:
            commit([path], f"{NAME}: {path.stem}")
    if runs:
        commit(write_table(runs, total), f"{NAME}: results table ({len(runs)} of {total} runs)")
    return runs


def drive(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    check_flops()
    for domain in DOMAINS:  # prepare both domains before the first run
        data = domain_data(out, domain)
        emit({"measurement": "data", "domain": domain, "test_kb": data["test_kb"], "select_kb": data["select_kb"],
              "test_files": len(data["test"]), "test_sha": data["test_sha"], "select_sha": data["select_sha"],
              "paragraph": data["paragraph"][:60].decode("utf-8", "replace")})
    running: dict[str, tuple[subprocess.Popen, dict, float]] = {}

    def stop(signum, frame):  # the runs in flight die with their process groups; nothing half-written is committed
        for proc, _, _ in running.values():
            os.killpg(proc.pid, signal.SIGTERM)
        emit({"measurement": "stopped", "signal": signum, "killed": sorted(running)})
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop)
    deadline = stop_time(args.stop_at)
    failed: set[str] = set()
    held = 0  # runs ready but not launched because they would end after --stop-at
    runs = refresh(args.models)
    while True:
        for key, (proc, spec, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                if proc.returncode != 0:
                    failed.add(key)
                    emit({"measurement": "failed", "key": key, "returncode": proc.returncode})
                else:
                    emit({"measurement": "run_done", "key": key, "wall_s": time.time() - t0})
                runs = refresh(args.models)
        ready = [s for s in plan(runs, args.models)[0] if run_key(**s) not in running and run_key(**s) not in failed]
        while ready and len(running) < jobs_wanted(args, out):
            spec = ready.pop(0)
            guess = predicted_seconds(runs, spec)
            now = dt.datetime.now(dt.timezone.utc)
            if deadline and (now >= deadline or (guess and now + dt.timedelta(seconds=guess) > deadline)):
                held = len(ready) + 1
                ready = []
                break
            key = run_key(**spec)
            log = out / "logs" / ("" if NAME == "experiment2" else NAME) / f"{key}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--job", json.dumps(spec),
                                     "--out", str(out), "--design", NAME], cwd=ROOT, env=env(), stdout=log.open("w"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
            running[key] = (proc, spec, time.time())
            emit({"measurement": "launch", "key": key, "predicted_s": guess, "running": sorted(running)})
        if not running:
            emit({"measurement": "idle", "finished": len(runs), "planned": plan(runs, args.models)[1], "failed": sorted(failed),
                  "held_by_stop_at": held, "stop_at": deadline.isoformat() if deadline else None})
            return
        time.sleep(5)


def measure(args: argparse.Namespace) -> None:
    """Seconds per step and per run start of each core model on prose (N steps, lr 6e-3), and the
    predicted wall time of each budget's run; then exit."""
    out = Path(args.out).resolve()
    data = domain_data(out, "prose")
    for name in CORE:
        info = model_info(name)
        r = train_run(out / "measure" / name, name, args.measure, 6e-3, 0, data["shards"])
        per_step = r["seconds_per_step"]
        emit({"measurement": "speed", "model": name, "steps": args.measure, "train_s": r["train_s"],
              "seconds_per_step": per_step, "start_s": r["train_s"] - per_step * args.measure,
              "predicted_train_s": {f"{b:.0e}": r["train_s"] - per_step * args.measure + per_step * steps_for(b, info)
                                    for b in budgets()}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/work/exp-runs", help="shards, held-out sets, code snapshots, run directories "
                   "(outside the repo; only the result JSONs under benchmarks/results/<design>/finished are kept)")
    p.add_argument("--rev", default="HEAD", help="commit whose pico every run uses (the README's, to resume)")
    p.add_argument("--design", default="experiment2", choices=list(DESIGNS),
                   help="which experiment: its models, budgets, seeds, LR rule and results folder")
    p.add_argument("--models", nargs="+", default=None, help="a subset of the design's models (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (OUT/jobs, or OUT/jobs-DESIGN for another "
                   "design than experiment2, overrides it while running)")
    p.add_argument("--stop-at", default="", help="HH:MM UTC: launch no run predicted to end after it")
    p.add_argument("--measure", type=int, default=0, help="time N steps of each core model on prose and exit")
    p.add_argument("--table", action="store_true", help="rewrite and commit the table from the committed runs")
    p.add_argument("--job", default="", help=argparse.SUPPRESS)  # internal: one run, spec as JSON
    p.add_argument("--score", default="", help=argparse.SUPPRESS)  # internal: score one run, print JSON
    p.add_argument("--files-json", default="", help=argparse.SUPPRESS)
    p.add_argument("--paragraph", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    use(args.design)
    unknown = sorted(set(args.models or []) - set(MODELS))
    if unknown:
        p.error(f"--models: {', '.join(unknown)} not in {args.design} (it has {', '.join(MODELS)})")
    args.models = tuple(args.models or MODELS)
    if args.score:
        return score_main(args)
    pin_code(Path(args.out).resolve(), args.rev)
    if args.job:
        path = run_job(json.loads(args.job), Path(args.out).resolve())
        return emit({"measurement": "result", "path": str(path)})
    if args.measure:
        return measure(args)
    if args.table:
        refresh(args.models)
        return
    drive(args)


if __name__ == "__main__":
    main()
