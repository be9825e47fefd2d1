"""One run, wherever it executes (a local process, a Slurm array task, a Ray job): `pico train`, then
`pico eval` on the domain's test and select sets, then one result JSON.

    pico experiment run-one DESIGN.yaml --run '{"domain": ..., "model": ..., "shape": ..., "budget": ..., "lr": ..., "seed": ...}'

The run holds a lock on WORK/locks/KEY.lock for its whole life (released by the OS if it is killed),
so a second copy of the same run (a rerun after the driver was killed, a requeued task) waits for
the first and then finds its result. Training always passes `--resume`: a run that was killed or
preempted continues from its newest checkpoint. The result JSON is written atomically (tmp +
rename); a failure leaves RESULTS/failed/KEY.json with the log path instead.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pico.configs.errors import UserError
from pico.pipeline.experiment import data as domain_data
from pico.pipeline.experiment.design import Design, Run, Shape, resolve_shape, spec_hash, steps_for
from pico.pipeline.experiment.store import failure_path, portable, result_path, write_json

CODE = ("model", "pipeline", "data_prep", "cluster", "configs", "pyproject.toml")
# Code that changes neither what a run trains nor how it is scored: the planner and the designs, and
# decoding (neither `pico train` nor `pico eval` imports it; tests/pipeline/experiment checks that).
NOT_RUN_CODE = ("pipeline/experiment", "configs/experiments", "model/generate.py", "pipeline/commands/generate.py")
CODE_SPEC = (*CODE, *(f":(exclude){p}" for p in NOT_RUN_CODE))
EXIT_PREEMPTED = 75  # pico train's exit status after a checkpoint on a stop signal


def run_dir(design: Design, key: str) -> Path:
    return design.work / "runs" / key


def log_path(design: Design, key: str) -> Path:
    return design.work / "logs" / f"{key}.log"


def train_args(design: Design, run: Run, shape: Shape, steps: int, train: list[str], out: Path) -> list[str]:
    """`pico train` arguments of a run: the shape's config and overrides, then the protocol's."""
    return ["train", "--config", shape.config, "--no-progress", "--json", "--resume", *shape.overrides,
            f"--train.out_dir={out}", f"--train.steps={steps}", f"--train.seed={run.seed}",
            f"--optim.lr={run.lr}", f"--optim.warmup_steps={max(1, round(design.warmup_fraction * steps))}",
            "--optim.schedule=cosine", "--optim.min_lr_ratio=0.1",
            f"--train.eval_every={steps}", "--train.eval_batches=4", f"--train.log_every={max(1, min(25, steps // 10))}",
            f"--checkpoint.every={max(1, math.ceil(steps / 4))}", "--checkpoint.keep_last=1",
            "--logging.wandb_mode=disabled", "--data.mix=[]", f"--data.train=[{','.join(train)}]"]


def protocol_hash(design: Design, run: Run, shape: Shape, steps: int) -> str:
    """A fingerprint of how a run trains beyond its spec (`design.spec_hash`): `pico train`'s arguments, so the
    warmup, schedule, evaluation and checkpoint cadence too; its run and data folders left out (the data's
    identity is its fingerprints)."""
    args = train_args(design, run, shape, steps, ["TRAIN"], Path("OUT"))
    return hashlib.sha256(json.dumps(args).encode()).hexdigest()[:16]


def current(record: dict, spec: str, protocol: str) -> bool:
    """Whether a result (or a run folder's stamp) was made by this spec and protocol; a record older than
    either field counts by the ones it has."""
    return record.get("spec_sha") in (spec, None) and record.get("protocol_sha") in (protocol, None)


def _die_with_parent() -> None:
    """Children die with the run (Linux PR_SET_PDEATHSIG), so a kill -9 of the run leaves no orphan training."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (AttributeError, OSError):
        pass


class Preempted(BaseException):
    """A stop signal arrived while the run had no subprocess to pass it to (waiting on a lock, preparing data)."""


class Child:
    """The run's current subprocess; stop signals sent to the run go on to it (pico train checkpoints and exits
    75). With none running, the signal stops the run itself (`Preempted`): a driver that stops its runs never
    waits on one stuck behind a lock."""

    proc: subprocess.Popen | None = None
    stopping = False

    @classmethod
    def forward(cls, signum, frame) -> None:
        cls.stopping = True
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.send_signal(signum)
        else:
            raise Preempted


def call(argv: list[str], log) -> tuple[int, str]:
    """Run `python -m pico.pipeline.cli ARGV`, stderr to the log; (exit status, stdout)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.setdefault("OMP_NUM_THREADS", "1")
    print(f"[experiment] {dt.datetime.now(dt.timezone.utc):%FT%TZ} pico {' '.join(argv)}", file=log, flush=True)
    Child.proc = subprocess.Popen([sys.executable, "-m", "pico.pipeline.cli", *argv], stdout=subprocess.PIPE,
                                  stderr=log, text=True, env=env, preexec_fn=_die_with_parent)
    out, _ = Child.proc.communicate()
    rc = Child.proc.returncode
    Child.proc = None
    log.write(out)
    log.flush()
    return rc, out


def last_json(out: str) -> dict:
    lines = [x for x in out.strip().splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def revision() -> tuple[str, str]:
    """(package version, git revision of the pico source that runs, +dirty when it has uncommitted changes)."""
    from importlib import metadata

    import pico.pipeline

    try:
        version = metadata.version("pico")
    except metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(pico.pipeline.__file__).resolve().parents[1]
    try:
        # the last commit that changed the code a run trains and is scored with (a README, results, design,
        # planner or decoding commit does not split a table)
        rev = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%H", "--", *CODE_SPEC], capture_output=True,
                             text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *CODE_SPEC], capture_output=True,
                               text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return version, "unknown"
    return version, (rev + ("+dirty" if dirty else "")) if rev else "unknown"


CODE_DIRS = ("model", "pipeline", "data_prep", "cluster", "configs")
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".toml", ".json")


def _counts(rel: str) -> bool:
    """Whether a file (path relative to the package root) is code a run trains or is scored with."""
    return (rel.split("/", 1)[0] in CODE_DIRS and rel.endswith(CODE_SUFFIXES) and "__pycache__" not in rel
            and not any(rel == p or rel.startswith(p + "/") for p in NOT_RUN_CODE))


def _digest(files: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for rel, data in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


def code_fingerprint(root: Path | None = None) -> str:
    """A content hash of the code a run trains and is scored with, as it is on disk where it runs (every
    counted file's path and bytes; `_counts`): two checkouts with the same such code share it, whatever
    their history, a revert included."""
    import pico.pipeline

    root = root or Path(pico.pipeline.__file__).resolve().parents[1]
    files = []
    for top in CODE_DIRS:
        for dirpath, dirnames, names in os.walk(root / top, followlinks=True):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                if _counts(rel):
                    files.append((rel, Path(dirpath, name).read_bytes()))
    return _digest(files)


@functools.lru_cache(maxsize=64)
def fingerprint_at(rev: str, root: Path | None = None) -> str | None:
    """`code_fingerprint` of commit `rev` of the pico checkout (from git's objects); None when git cannot tell."""
    import pico.pipeline

    root = root or Path(pico.pipeline.__file__).resolve().parents[1]
    if not re.fullmatch(r"[0-9a-f]{7,40}", rev):
        return None
    try:
        names = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", "-z", "--name-only", rev, "--", *CODE_DIRS],
                               capture_output=True, timeout=60)
        if names.returncode != 0:
            return None
        rels = [n.decode() for n in names.stdout.split(b"\0") if n and _counts(n.decode())]
        blobs = subprocess.run(["git", "-C", str(root), "cat-file", "--batch"], capture_output=True, timeout=120,
                               input="".join(f"{rev}:{r}\n" for r in rels).encode())
    except (OSError, subprocess.TimeoutExpired):
        return None
    out, files, at = blobs.stdout, [], 0
    for rel in rels:  # "<sha> blob <size>\n<bytes>\n" each
        head_end = out.index(b"\n", at)
        size = int(out[at:head_end].split()[2])
        files.append((rel, out[head_end + 1:head_end + 1 + size]))
        at = head_end + 1 + size + 1
    return _digest(files)


def run_one(design: Design, run: Run) -> int:
    """Train, score and record one run; 0 when its result exists afterwards, 75 when preempted."""
    key = run.key(design)
    shape = resolve_shape(design, run.model, run.shape)
    steps = steps_for(shape, run.budget)
    sha = spec_hash(run, shape, steps)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, Child.forward)
    try:
        return _locked_run(design, run, key, shape, steps, sha)
    except Preempted:
        print(f"[experiment] {key}: stopped before it trained or while it was recorded; the rerun resumes it",
              file=sys.stderr, flush=True)
        return EXIT_PREEMPTED


def _locked_run(design: Design, run: Run, key: str, shape: Shape, steps: int, sha: str) -> int:
    results = design.results_dir
    with domain_data.locked(design.work / "locks" / f"{key}.lock"):
        done = result_path(results, key)
        if done.is_file() and current(json.loads(done.read_text()), sha, protocol_hash(design, run, shape, steps)):
            print(f"[experiment] {key}: already finished ({done})", file=sys.stderr)
            return 0
        log_file = log_path(design, key)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as log:
            try:
                return _train_and_score(design, run, shape, steps, sha, log, log_file)
            except UserError as e:
                print(f"[experiment] {key}: {e}", file=log, flush=True)
                _record_failure(design, key, log_file, "prepare", 2, str(e))
                raise


def _train_and_score(design: Design, run: Run, shape: Shape, steps: int, sha: str, log, log_file: Path) -> int:
    key = run.key(design)
    t0 = time.time()
    data = domain_data.prepare(design, run.domain)
    out = run_dir(design, key)
    stamp = out / "experiment-spec.json"
    protocol = protocol_hash(design, run, shape, steps)
    old = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if out.exists() and (old.get("spec_sha") is None or not current(old, sha, protocol)):
        shutil.rmtree(out)  # a run directory of another spec or protocol (the design changed): start over
    out.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"key": key, "spec_sha": sha, "protocol_sha": protocol})
    code = code_fingerprint()  # the code this run trains with (compared again when it is recorded)
    log.flush()
    start = log_file.stat().st_size
    rc, stdout = call(train_args(design, run, shape, steps, data["train"], out), log)
    if rc == EXIT_PREEMPTED:
        print(f"[experiment] {key}: preempted; the rerun resumes from its checkpoint", file=log, flush=True)
        return EXIT_PREEMPTED
    if rc != 0 and _diverged(log_file, start):
        return _record_diverged(design, run, shape, steps, sha, data, code, log, log_file, t0)
    if rc != 0:
        return _record_failure(design, key, log_file, "train", rc)
    trained = last_json(stdout)
    t1 = time.time()
    scored = {}
    for split in ("test", "select"):
        rc, stdout = call(["eval", "--checkpoint", str(out), "--data", *data[split], "--json"], log)
        if rc != 0 and Child.stopping:  # stopped while scoring: the rerun scores the trained model again
            print(f"[experiment] {key}: stopped while scoring; the rerun scores it", file=log, flush=True)
            return EXIT_PREEMPTED
        if rc != 0:
            return _record_failure(design, key, log_file, f"eval {split}", rc)
        scored[split] = last_json(stdout)
        if "bpb" not in scored[split]:  # a result that says nothing is a failure to retry, not a divergence
            return _record_failure(design, key, log_file, f"eval {split}", 1, "pico eval printed no bpb")
    if not all(math.isfinite(scored[split].get("bpb", math.nan)) for split in scored):  # finite loss, NaN on held-out
        return _record_diverged(design, run, shape, steps, sha, data, code, log, log_file, t0)
    if code_fingerprint() != code:
        return _record_failure(design, key, log_file, "record", 1, "the training code changed while the run trained; "
                               "rerun it with the code frozen")
    version, rev = revision()
    config = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").is_file() else None
    for section, field in (("data", "train"), ("data", "val"), ("train", "out_dir"), ("checkpoint", "dir")):
        value = ((config or {}).get(section) or {}).get(field)  # relative to where the experiment runs, never
        if value:                                               # this machine's absolute paths
            config[section][field] = [portable(v) for v in value] if isinstance(value, list) else portable(value)
    result = {
        "key": key, "design": design.name, "domain": run.domain, "model": run.model, "shape": run.shape,
        "budget": run.budget, "lr": run.lr, "seed": run.seed, "steps": steps, "spec_sha": sha, "protocol_sha": protocol_hash(design, run, shape, steps),
        "flops": steps * shape.flops_per_byte * shape.bytes_per_step, "flops_per_byte": shape.flops_per_byte,
        "params": shape.params, "router": shape.router, "config_file": shape.config, "overrides": shape.overrides,
        "config": config, "pico_version": version, "git_revision": rev, "code_sha": code,
        "data": data["fingerprints"],
        "test": {"bpb": scored["test"]["bpb"], "bytes": scored["test"]["bytes"]},
        "select": {"bpb": scored["select"]["bpb"], "bytes": scored["select"]["bytes"]},
        # the router's behaviour on the test set as `pico eval` reports it (the model's own statistics)
        "router_stats": {k.split("/", 1)[1]: v for k, v in scored["test"].items() if k.startswith("router/")},
        "train": {"seconds": t1 - t0, "bytes_seen": trained.get("bytes_seen"),
                  "bytes_per_s_median": trained.get("bytes_per_s_median"), "device": trained.get("peak_kind")},
        "wall_s": time.time() - t0, "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                                               f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}",
        "log": portable(log_file), "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(result_path(design.results_dir, key), result)
    failure_path(design.results_dir, key).unlink(missing_ok=True)
    print(f"[experiment] {key}: test bpb {result['test']['bpb']:.4f} ({result['wall_s']:.0f} s)", file=log, flush=True)
    _prune(design, out, log)
    return 0


def rescore(design: Design, results: dict[str, dict]) -> dict[str, list[str]]:
    """Score finished runs again on held-out sets that changed since they ran (a new cut, a new version of
    the data), from the model each run kept (RUN/release, else its last checkpoint): their result JSONs get
    the new bpb and fingerprints, and `rescored` records the old ones. Runs that kept no model, or whose
    training data changed too, are listed under "rerun" (delete their result JSON to redo them)."""
    out: dict[str, list[str]] = {"rescored": [], "current": [], "rerun": []}
    data = {d: domain_data.prepare(design, d) for d in {r["domain"] for r in results.values()}}
    for key, r in sorted(results.items()):
        now = data[r["domain"]]
        stale = [split for split in ("test", "select") if r["data"].get(split) != now["fingerprints"][split]]
        if not stale or r.get("diverged") and r["data"].get("train") == now["fingerprints"]["train"]:
            out["current"].append(key)
            continue
        run = run_dir(design, key)
        model = run / "release" if (run / "release").is_dir() else run if (run / "checkpoints").is_dir() else None
        if model is None or r["data"].get("train") != now["fingerprints"]["train"]:  # trained on other data: redo
            out["rerun"].append(key)
            continue
        log_file = log_path(design, key)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with domain_data.locked(design.work / "locks" / f"{key}.lock"), open(log_file, "a") as log:
            new = json.loads(result_path(design.results_dir, key).read_text())
            for split in stale:
                rc, stdout = call(["eval", "--checkpoint", str(model), "--data", *now[split], "--json"], log)
                if rc != 0:
                    raise UserError(f"{key}: pico eval of {model} on the new {split} set failed (exit {rc}); "
                                    f"see {log_file}")
                scored = last_json(stdout)
                new.setdefault("rescored", []).append({
                    "split": split, "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "old_bpb": new[split]["bpb"], "old_data": new["data"].get(split), "model": portable(model)})
                new[split] = {"bpb": scored["bpb"], "bytes": scored["bytes"]}
                new["data"][split] = now["fingerprints"][split]
                if split == "test":
                    new["router_stats"] = {k.split("/", 1)[1]: v for k, v in scored.items() if k.startswith("router/")}
            write_json(result_path(design.results_dir, key), new)
        out["rescored"].append(key)
    return out


def _prune(design: Design, out: Path, log) -> None:
    """Shrink a scored run's directory to what `design.keep` asks; a failed conversion keeps the checkpoints."""
    if design.keep == "checkpoints" or not (out / "checkpoints").is_dir():
        return
    if design.keep == "release":
        release = out / "release"
        rc, _ = call(["convert", str(out), str(release), "--overwrite"], log)
        if rc != 0:
            print(f"[experiment] pico convert failed (exit {rc}): the checkpoints stay in {out / 'checkpoints'}",
                  file=log, flush=True)
            return
    shutil.rmtree(out / "checkpoints")


DIVERGED = ("loss is NaN or infinite", "weights became NaN or infinite")  # pico train's TrainingDiverged messages


def _diverged(log_file: Path, start: int) -> bool:
    with open(log_file, "rb") as f:
        f.seek(start)
        tail = f.read().decode("utf-8", "replace")
    return any(m in tail for m in DIVERGED)


def _record_diverged(design: Design, run: Run, shape: Shape, steps: int, sha: str, data: dict, code: str, log,
                     log_file: Path, t0: float) -> int:
    """A run whose loss or held-out bpb became NaN/inf is a result, not a failure: it loses the LR and shape
    choices (select bpb +inf, `store.select_bpb`) instead of blocking its family's sweep on every rerun."""
    key = run.key(design)
    version, rev = revision()
    write_json(result_path(design.results_dir, key), {
        "key": key, "design": design.name, "domain": run.domain, "model": run.model, "shape": run.shape,
        "budget": run.budget, "lr": run.lr, "seed": run.seed, "steps": steps, "spec_sha": sha, "protocol_sha": protocol_hash(design, run, shape, steps), "diverged": True,
        "flops": steps * shape.flops_per_byte * shape.bytes_per_step, "flops_per_byte": shape.flops_per_byte,
        "params": shape.params, "router": shape.router, "config_file": shape.config, "overrides": shape.overrides,
        "pico_version": version, "git_revision": rev, "code_sha": code, "data": data["fingerprints"],
        "test": {"bpb": None}, "select": {"bpb": None}, "router_stats": {}, "wall_s": time.time() - t0,
        "log": portable(log_file), "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    failure_path(design.results_dir, key).unlink(missing_ok=True)
    print(f"[experiment] {key}: diverged (NaN or infinite loss); recorded as a loser of the LR and shape choices",
          file=log, flush=True)
    return 0


def _record_failure(design: Design, key: str, log_file: Path, stage: str, rc: int, error: str = "") -> int:
    write_json(failure_path(design.results_dir, key),
               {"key": key, "stage": stage, "returncode": rc, "log": portable(log_file), "error": error,
                "failed_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    return rc if rc > 0 else 1
