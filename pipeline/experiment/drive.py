"""The driver: prepare the data, then launch the ready runs until the design is done.

Runs go to one of three backends, each starting `pico experiment run-one` (job.py) per run:
- `local`: subprocesses on this machine, `--jobs` at a time;
- `slurm`: the ready runs as one Slurm array job (cluster/slurm.py renders it), results on the
  shared filesystem the design's `results` and `work_dir` point to;
- `ray`: one Ray Job per run through the cluster's dashboard (cluster/ray_jobs.py), `--jobs` at a time.
The driver waits for what it launched, replans (the sweeps decide the later runs' LRs) and goes
on. A killed driver loses nothing: rerun it, and finished runs are reused; a run still going
from the killed driver holds its lock, so its second copy waits for it and finds its result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pico.configs.errors import UserError
from pico.pipeline.experiment import data as domain_data
from pico.pipeline.experiment.design import (Design, Run, Shape, check_models, label, picks_best, spec_hash,
                                             steps_for)
from pico.pipeline.experiment.job import current, log_path, protocol_hash
from pico.pipeline.experiment.plan import plan
from pico.pipeline.experiment.store import failure_path, load_results, portable, result_path, write_json


def say(msg: str) -> None:
    print(f"[experiment] {msg}", file=sys.stderr, flush=True)


def check_code(design: Design) -> None:
    """Refuse to add runs of other training code to a design's finished ones (a table holds one version of
    the code, `table.check_revisions`): found at the start, not after hours of runs that could not be
    tabulated with the rest."""
    from pico.pipeline.experiment.job import code_fingerprint
    from pico.pipeline.experiment.table import code_identity

    results = finished(design, check_models(design))
    theirs: dict[str, set[str]] = {}
    for r in results.values():
        theirs.setdefault(code_identity(r), set()).add(str(r.get("git_revision")))
    mine = code_fingerprint()
    if theirs and mine not in theirs:
        code, revs = max(theirs.items(), key=lambda x: len(x[1]))
        raise UserError(f"{design.name}: its {len(results)} finished runs trained with pico training code {code} "
                        f"(revision {sorted(revs)[0][:12]}), this checkout's is {mine}: a table holds one version, so run "
                        f"from a checkout of that code (git worktree add ../pinned {sorted(revs)[0][:12]}), or pass "
                        "--allow-mixed-revisions")


def finished(design: Design, shapes: dict[tuple[str, str], Shape]) -> dict[str, dict]:
    """The finished results of this design's runs; one whose spec or protocol changed since (stale) does not
    count (`job.current`)."""
    out = {}
    for key, r in load_results(design.results_dir).items():
        shape = shapes.get((r["model"], r.get("shape", "base")))
        if shape is None or r["domain"] not in design.domains:
            continue
        if r.get("spec_sha") is not None:
            run = Run(r["domain"], r["model"], r["shape"], r["budget"], r["lr"], r["seed"])
            steps = steps_for(shape, run.budget)
            if not current(r, spec_hash(run, shape, steps), protocol_hash(design, run, shape, steps)):
                continue
        out[key] = r
    return out


def run_command(design_path: Path) -> list[str]:
    """What starts one run, before its JSON spec (the working directory is the driver's)."""
    return [sys.executable, "-m", "pico.pipeline.cli", "experiment", "run-one", str(design_path.resolve()),
            "--cwd", os.getcwd(), "--run"]


def run_json(run: Run) -> str:
    return json.dumps(asdict(run), separators=(",", ":"))


class Local:
    """Subprocesses on this machine, each in its own session (a killed driver leaves its runs running)."""

    def __init__(self, design: Design, design_path: Path, jobs: int):
        self.design, self.cmd, self.slots = design, run_command(design_path), max(1, jobs)
        self.procs: dict[str, subprocess.Popen] = {}
        signal.signal(signal.SIGTERM, self.stop)

    def stop(self, signum, frame):  # the runs checkpoint (pico train exits 75) and the rerun resumes them
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            p.wait()
        say(f"stopped by signal {signum}; rerun to continue")
        sys.exit(1)

    def launch(self, runs: list[Run]) -> list[str]:
        started = []
        for run in runs[: self.slots - len(self.procs)]:
            key = run.key(self.design)
            out = self.design.work / "logs" / f"{key}.driver.log"
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                self.procs[key] = subprocess.Popen([*self.cmd, run_json(run)], stdout=f, stderr=subprocess.STDOUT,
                                                   start_new_session=True)
            started.append(key)
        return started

    def poll(self) -> dict[str, int]:
        """key -> exit status of every run that ended since the last poll."""
        ended = {k: p.returncode for k, p in self.procs.items() if p.poll() is not None}
        for k in ended:
            del self.procs[k]
        return ended

    def busy(self) -> int:
        return len(self.procs)


class Slurm:
    """The ready runs as one array job per launch; results come back through the shared filesystem."""

    def __init__(self, design: Design, design_path: Path, jobs: int):
        self.design, self.cmd = design, run_command(design_path)
        self.arrays: dict[str, list[str]] = {}  # array job id -> keys by task index
        self.jobs = jobs

    def resources(self):
        from pico.cluster.plan import Resources

        c = self.design.cluster
        return Resources(nodes=1, gpus_per_node=c.gpus, ranks_per_node=1, cpus_per_task=c.cpus, mem=c.mem,
                         time=c.time, partition=c.partition, account=c.account, qos=c.qos,
                         signal_grace=min(300, max(10, _seconds(c.time) // 10)))

    def render(self, runs: list[Run]) -> tuple[str, object]:
        from pico.cluster.slurm import ArrayJob, render_array

        folder = (self.design.work / "slurm").resolve()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        job = ArrayJob(name=f"pico-exp-{self.design.name}-{stamp}", tasks=folder / f"tasks-{stamp}.txt",
                       n_tasks=len(runs), command=self.cmd, log_dir=folder, workdir=Path.cwd(),
                       max_parallel=self.design.cluster.max_parallel or (self.jobs if self.jobs > 1 else 0))
        return render_array(job, self.resources()), job

    def launch(self, runs: list[Run]) -> list[str]:
        from pico.cluster import slurm

        if not runs:
            return []
        slurm.tool("sbatch")
        script, job = self.render(runs)
        job.log_dir.mkdir(parents=True, exist_ok=True)
        job.tasks.write_text("".join(run_json(r) + "\n" for r in runs))
        job.script.write_text(script)
        array = slurm.submit(job.script)
        keys = [r.key(self.design) for r in runs]
        self.arrays[array] = keys
        say(f"submitted array job {array} ({len(runs)} runs): {job.script}")
        return keys

    def poll(self) -> dict[str, int]:
        from pico.cluster import slurm

        ended = {}
        for array, keys in list(self.arrays.items()):
            active = slurm.array_tasks_active(array) or set()
            for i, key in enumerate(keys):
                if key is not None and i not in active:
                    ended[key] = 0 if result_path(self.design.results_dir, key).is_file() else 1
                    keys[i] = None
            if all(k is None for k in keys):
                del self.arrays[array]
        return ended

    def busy(self) -> int:
        return sum(k is not None for keys in self.arrays.values() for k in keys)


class Ray:
    """One Ray Job per run (`pico experiment run-one ...` as the entrypoint), `--jobs` at a time."""

    def __init__(self, design: Design, design_path: Path, jobs: int, address: str | None):
        self.design, self.cmd, self.slots, self.address = design, run_command(design_path), max(1, jobs), address
        self.jobs: dict[str, str] = {}

    def launch(self, runs: list[Run]) -> list[str]:
        from pico.cluster import ray_jobs

        started = []
        c = self.design.cluster
        for run in runs[: self.slots - len(self.jobs)]:
            key = run.key(self.design)
            args = ["experiment", *self.cmd[4:], run_json(run)]
            env = {"OMP_NUM_THREADS": str(c.cpus), **({"DS_ACCELERATOR": "cpu"} if not c.gpus else {})}
            self.jobs[key] = ray_jobs.submit(self.address, args, env=env, num_cpus=c.cpus, num_gpus=c.gpus or None)
            started.append(key)
        return started

    def poll(self) -> dict[str, int]:
        from pico.cluster import ray_jobs

        ended = {}
        for key, job in list(self.jobs.items()):
            state = ray_jobs.status(self.address, job)["state"]
            if state in ray_jobs.TERMINAL:
                ended[key] = 0 if state == "SUCCEEDED" else 1
                del self.jobs[key]
        return ended

    def busy(self) -> int:
        return len(self.jobs)


def _seconds(text: str) -> int:
    from pico.cluster.plan import time_seconds

    return time_seconds(text)


def prepare_all(design: Design) -> None:
    for domain in design.domains:
        d = domain_data.prepare(design, domain)
        say(f"{domain}: {len(d['test'])} test files ({d['kb']['test']:.0f} KB), {len(d['select'])} select files "
            f"({d['kb']['select']:.0f} KB), train {', '.join(d['train'])}")


def drive(design: Design, design_path: Path, backend: str = "local", jobs: int = 1, address: str | None = None,
          poll_s: float = 2.0) -> dict:
    """Run the design to the end (or until only failed runs are left); a summary of what happened."""
    shapes = check_models(design)
    prepare_all(design)
    ex = {"local": lambda: Local(design, design_path, jobs), "slurm": lambda: Slurm(design, design_path, jobs),
          "ray": lambda: Ray(design, design_path, jobs, address)}[backend]()
    failed: dict[str, int] = {}
    inflight: set[str] = set()
    while True:
        results = finished(design, shapes)
        for key, rc in ex.poll().items():
            inflight.discard(key)
            if key in finished(design, shapes):
                say(f"{key}: finished")
                continue
            failed[key] = rc
            if not failure_path(design.results_dir, key).is_file():  # died without a word (kill -9, OOM)
                write_json(failure_path(design.results_dir, key),
                           {"key": key, "stage": "run", "returncode": rc, "log": portable(log_path(design, key)),
                            "failed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            say(f"{key}: FAILED (exit {rc}); log {log_path(design, key)}")
        results = finished(design, shapes)
        ready, total = plan(design, results)
        ready = [r for r in ready if r.key(design) not in inflight and r.key(design) not in failed]
        if ready and (backend == "slurm" and not inflight or backend != "slurm"):
            for key in ex.launch(ready):
                inflight.add(key)
                say(f"{key}: launched ({len(results)} of {total} finished)")
        if not inflight:
            break
        time.sleep(poll_s)
    results = finished(design, shapes)
    ready, total = plan(design, results)
    say(f"done: {len(results)} of {total} runs finished, {len(failed)} failed this time"
        + (f" ({', '.join(sorted(failed))}; logs under {design.work / 'logs'})" if failed else ""))
    return {"finished": len(results), "planned": total, "failed": sorted(failed)}


def hours_left(design: Design, results: dict[str, dict]) -> tuple[float | None, float | None]:
    """(run-hours left, the median training FLOP/s of the finished runs): each cell's FLOPs not yet spent at
    the rate its own model and shape measured, else its shape's (any model), its model's, or the median of all
    (small shapes train at half the FLOP/s of larger ones, so one rate for all would be optimistic)."""
    import statistics

    def rate(r):
        return ((r.get("train") or {}).get("bytes_per_s_median") or 0) * (r.get("flops_per_byte") or 0)

    measured = [r for r in results.values() if rate(r) > 0]
    if not measured:
        return None, None
    by: dict[tuple, list[float]] = {}
    for r in measured:
        for key in ((r["model"], r.get("shape")), ("shape", r.get("shape")), ("model", r["model"])):
            by.setdefault(key, []).append(rate(r))
    overall = statistics.median(rate(r) for r in measured)
    seconds = 0.0
    for row in estimate(design)["cells"]:
        m, best = row["model"], row.get("best")
        s = None if best else row["shape"].split()[0]
        done = sum(r.get("flops") or 0.0 for r in results.values() if r["domain"] == row["domain"] and r["model"] == m
                   and ((r["budget"] == row["budget"]) if best else (r.get("shape") == s and not picks_best(design, r["budget"]))))
        rates = by.get((m, s)) or by.get(("shape", s)) or by.get(("model", m))
        seconds += max(0.0, row["flops"] - done) / (statistics.median(rates) if rates else overall)
    return seconds / 3600, overall


def estimate(design: Design) -> dict:
    """Every run the design will make (sweeps at their full grids), their FLOPs and the time they take."""
    from pico.model.flops import GPU_PEAK_FLOPS

    from pico.pipeline.experiment.plan import cells, sweep_budget
    from pico.pipeline.experiment.design import budgets, picks_best, seeds_at, shape_budgets, shapes_of

    shapes = check_models(design)
    c = design.cluster
    rate = c.flops_per_s or (c.gpus * GPU_PEAK_FLOPS["H100"] * c.assumed_mfu if c.gpus else 0.0)
    rows, n_runs, flops = [], 0, 0.0
    for d, m, s in cells(design):
        sh = shapes[m, s]
        sb = sweep_budget(design, m, s)
        per_budget, cell_flops = {}, 0.0
        spare = bool(design.models[m].start) and s not in design.models[m].start  # swept only past a winning end
        for b in shape_budgets(design, m, s):
            if picks_best(design, b) or spare:
                continue
            n = len(seeds_at(design, b))
            if not design.lr.fixed and b == sb:
                n += len(design.lr.grid) - (design.lr.seed in seeds_at(design, b))
            per_budget[b] = n
            n_runs += n
            cell_flops += n * steps_for(sh, b) * sh.flops_per_byte * sh.bytes_per_step
        flops += cell_flops
        rows.append({"domain": d, "model": m, "shape": s + (" (spare)" if spare else ""), "router": sh.router,
                     "params": sh.params,
                     "flops_per_byte": sh.flops_per_byte,
                     "steps": {label(b): steps_for(sh, b) for b in shape_budgets(design, m, s)},
                     "runs": {label(b): n for b, n in per_budget.items()}, "flops": cell_flops})
    for b in (b for b in budgets(design) if picks_best(design, b)):  # the best shape and a neighbour, then more seeds
        for d in design.domains:
            for m in design.models:
                names = list(shapes_of(design.models[m]))
                n = min(2, len(names)) + len(seeds_at(design, b)) - 1
                n_runs += n
                cell_flops = n * max(steps_for(shapes[m, s], b) * shapes[m, s].flops_per_byte
                                     * shapes[m, s].bytes_per_step for s in names)
                flops += cell_flops
                rows.append({"domain": d, "model": m, "shape": f"best of {'/'.join(names)}", "best": True,
                             "budget": b, "runs": {label(b): n}, "flops": cell_flops})
    hours = (flops / rate + n_runs * c.run_overhead_s) / 3600 if rate else None
    return {"runs": n_runs, "train_flops": flops, "rate_flops_per_s": rate or None, "run_hours": hours,
            "gpu_hours": hours * c.gpus if hours is not None and c.gpus else None, "cells": rows,
            "budgets": [label(b) for b in budgets(design)]}
