"""Result JSONs on disk: one small file per finished run, one per failed run, written atomically.

    RESULTS/runs/KEY.json      a finished run (reused by every rerun, never recomputed)
    RESULTS/failed/KEY.json    a failed run: its log path and exit status (redone by the next rerun)
    RESULTS/finished/KEY.json  experiments 2-4's records (benchmarks/experiment.py), read through `legacy`

RESULTS may be a local or shared-filesystem folder; every file is written to a temporary name in
the same folder and renamed, so a reader (or a kill -9) never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pico.configs.errors import UserError


def write_json(path: Path, payload: dict) -> Path:
    """Write `payload` to `path` atomically (tmp + rename in the same folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def portable(path: Path | str) -> str:
    """`path` as a result file may record it: relative to the working directory when it lies under it, else
    its name alone (a shared artefact holds no absolute local path)."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name


def select_bpb(r: dict) -> float:
    """A result's select-set bpb, what LRs and shapes are chosen by; +inf for a run that diverged (it loses)."""
    bpb = None if r.get("diverged") else (r.get("select") or {}).get("bpb")
    return float("inf") if bpb is None else float(bpb)


def result_path(results: Path, key: str) -> Path:
    return results / "runs" / f"{key}.json"


def failure_path(results: Path, key: str) -> Path:
    return results / "failed" / f"{key}.json"


MAX_RESULT_BYTES = 16 << 20  # a result JSON is a few KB


def _read(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            raise ValueError(f"over {MAX_RESULT_BYTES >> 20} MiB")
        r = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not a readable result JSON ({str(e)[:200]}); move it away and rerun") from None
    if not isinstance(r, dict) or not isinstance(r.get("key", path.stem), str):
        raise UserError(f"{path}: not a result JSON (an object with its run's key); move it away and rerun")
    return r


def load_results(results: Path) -> dict[str, dict]:
    """key -> result of every finished run (experiments 2-4's records converted by `legacy`)."""
    found: dict[str, dict] = {}
    for path in sorted((results / "finished").glob("*.json")):
        r = legacy(_read(path))
        found[r["key"]] = r
    for path in sorted((results / "runs").glob("*.json")):
        r = _read(path)
        found[r.setdefault("key", path.stem)] = r
    return found


def load_failures(results: Path) -> dict[str, dict]:
    return {p.stem: _read(p) for p in sorted((results / "failed").glob("*.json"))}


def legacy(old: dict) -> dict:
    """A run JSON of benchmarks/experiment.py (experiments 2-4) in this package's result layout.

    Its routing statistics are the model's own (`eval_router`, from `evaluate`); the old script's
    recount (`routing`) is kept aside, not used by the table."""
    if "test" in old and isinstance(old["test"], dict):
        return old  # already the new layout
    return {
        "key": old["key"], "domain": old["domain"], "model": old["model"], "shape": "base",
        "budget": old["budget"], "lr": old["lr"], "seed": old["seed"], "steps": old["steps"],
        "flops": old.get("flops"), "flops_per_byte": old.get("flops_per_byte"), "router": old.get("router"),
        "git_revision": old.get("rev"), "pico_version": None, "spec_sha": None,
        "config_file": old.get("config"), "overrides": old.get("overrides", []),
        "data": {"test": old.get("test_sha"), "select": old.get("select_sha")},
        "test": {"bpb": old["test_bpb"], "bytes": old.get("test_bytes")},
        "select": {"bpb": old["select_bpb"], "bytes": old.get("select_bytes")},
        "router_stats": old.get("eval_router") or {},
        "train": {"seconds": old.get("train_s"), "bytes_seen": old.get("bytes_seen")},
        "wall_s": old.get("wall_s"), "finished_utc": old.get("finished_utc"), "legacy": True,
    }
