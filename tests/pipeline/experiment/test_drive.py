"""The local driver with real `pico train` / `pico eval` subprocesses: a 2-run tiny design, resumed after
kill -9 of the driver and of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

KEYS = ("toy-rule-3e09-lr0.003-s0", "toy-plain-3e09-lr0.003-s0")


def pico(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pico.pipeline.cli", "experiment", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(cond, timeout: float = 180, what: str = ""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_run_status_table_and_rerun_reuses(tiny_design):
    results = tiny_design.parent / "results"
    run = pico("run", str(tiny_design), "--jobs", "2", "--json")
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert json.loads(out) == {"finished": 2, "planned": 2, "failed": []}
    for key in KEYS:
        r = json.loads((results / "runs" / f"{key}.json").read_text())
        assert r["steps"] > 1 and 0 < r["test"]["bpb"] < 9 and r["git_revision"] and r["data"]["test"]
        assert len(r["code_sha"]) == 16  # the content hash of the training code that ran
        assert abs(r["flops"] / 3e9 - 1) < 0.05 and r["config"]["optim"]["lr"] == 0.003
    for key in KEYS:  # keep: release (the default): a loadable release instead of ~MBs of optimizer state
        rd = results / "work" / "runs" / key
        assert (rd / "release" / "model.safetensors").is_file() and not (rd / "checkpoints").exists()
    rule = json.loads((results / "runs" / f"{KEYS[0]}.json").read_text())
    assert rule["router_stats"]["routed_frac_mean"] > 0  # the model's own statistics, from pico eval
    stamps = {k: (results / "runs" / f"{k}.json").stat().st_mtime_ns for k in KEYS}
    again = pico("run", str(tiny_design), "--json")
    out, err = again.communicate(timeout=120)
    assert json.loads(out)["finished"] == 2
    assert stamps == {k: (results / "runs" / f"{k}.json").stat().st_mtime_ns for k in KEYS}  # nothing recomputed
    status = json.loads(pico("status", str(tiny_design), "--json").communicate(timeout=120)[0])
    assert status["measured_flops_per_s"] > 0 and status["run_hours_left"] < 0.01  # all done: nothing left
    table = pico("table", str(tiny_design))
    out, err = table.communicate(timeout=120)
    assert table.returncode == 0, err
    assert "| toy | 3e09 | plain | rule |" in out and (results / "scaling.png").stat().st_size > 1000
    # the select set changes: rescore scores the kept releases on it instead of training again
    before = {k: json.loads((results / "runs" / f"{k}.json").read_text()) for k in KEYS}
    (tiny_design.parent / "select" / "a.txt").write_text("a different held-out text, scored again. " * 30)
    rescore = pico("rescore", str(tiny_design), "--json")
    out, err = rescore.communicate(timeout=300)
    assert rescore.returncode == 0, err[-3000:]
    assert sorted(json.loads(out)["rescored"]) == sorted(KEYS)
    for k in KEYS:
        r = json.loads((results / "runs" / f"{k}.json").read_text())
        assert r["test"] == before[k]["test"] and r["select"]["bpb"] != before[k]["select"]["bpb"]
        assert r["rescored"][0]["split"] == "select" and r["rescored"][0]["old_bpb"] == before[k]["select"]["bpb"]
        assert r["data"]["select"] != before[k]["data"]["select"]
    again = pico("rescore", str(tiny_design), "--json")
    assert json.loads(again.communicate(timeout=120)[0])["current"] == sorted(KEYS)
    other = results / "runs" / f"{KEYS[0]}.json"  # a run trained on other data cannot be rescored: it is redone
    r = json.loads(other.read_text())
    r["data"]["train"] = "another corpus"
    other.write_text(json.dumps(r))
    (tiny_design.parent / "select" / "a.txt").write_text("yet another held-out text. " * 30)
    third = pico("rescore", str(tiny_design), "--json")
    out, _ = third.communicate(timeout=300)
    assert third.returncode == 1 and json.loads(out)["rerun"] == [KEYS[0]]


def test_kill_9_of_the_driver_then_of_a_run(tiny_design):
    results = tiny_design.parent / "results"
    first, second = (results / "runs" / f"{k}.json" for k in KEYS)
    driver = pico("run", str(tiny_design), "--jobs", "1")
    wait_for(first.exists, what="the first run's result")
    stamp = first.stat().st_mtime_ns
    os.kill(driver.pid, signal.SIGKILL)  # the driver only; its run in flight goes on alone
    driver.communicate()
    # the rerun finds the first run finished and the second one's lock held by the orphaned run: it waits for it
    rerun = pico("run", str(tiny_design), "--jobs", "1", "--json")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert json.loads(out)["finished"] == 2 and first.stat().st_mtime_ns == stamp and second.exists()

    # now kill -9 a run: its training dies with it, the driver records the failure with the log path
    second.unlink()
    driver = pico("run", str(tiny_design), "--jobs", "1", "--json")
    metrics = tiny_design.parent / "results" / "work" / "runs" / KEYS[1] / "metrics.jsonl"

    def run_one():
        kids = psutil.Process(driver.pid).children()
        return kids[0] if kids and metrics.exists() else None

    victim = wait_for(run_one, what="the second run's training")
    victim.send_signal(signal.SIGKILL)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 1 and json.loads(out)["failed"] == [KEYS[1]]
    failure = json.loads((results / "failed" / f"{KEYS[1]}.json").read_text())
    # the record names the log portably (a results folder may be shared); it is the run's log under work/logs
    logs = tiny_design.parent / "results" / "work" / "logs"
    assert failure["returncode"] == -9 and (logs / Path(failure["log"]).name).is_file()
    status = pico("status", str(tiny_design), "--json")
    assert json.loads(status.communicate(timeout=60)[0])["failed"] == {KEYS[1]: str(logs / f"{KEYS[1]}.log")}
    rerun = pico("run", str(tiny_design), "--json")
    out, err = rerun.communicate(timeout=300)
    assert json.loads(out) == {"finished": 2, "planned": 2, "failed": []}, err[-3000:]
    assert second.exists() and not (results / "failed" / f"{KEYS[1]}.json").exists()
    assert first.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("keep, left", [("checkpoints", True), ("none", False)])
def test_a_scored_run_keeps_what_the_design_says(tiny_design, tmp_path, keep, left):
    from pico.pipeline.experiment.design import load_design
    from pico.pipeline.experiment.job import _prune

    design = load_design(tiny_design)
    design.keep = keep
    (tmp_path / "run" / "checkpoints" / "step_000001").mkdir(parents=True)
    with open(tmp_path / "log", "w") as log:
        _prune(design, tmp_path / "run", log)
    assert (tmp_path / "run" / "checkpoints").exists() == left and not (tmp_path / "run" / "release").exists()


def test_a_run_that_diverges_is_a_losing_result_not_a_failure(tiny_design):
    from tests.pipeline.experiment.conftest import edit_design

    edit_design(tiny_design, lambda r: (r["models"].pop("plain"), r.update(lr={"fixed": {"toy": 1.0e30}})))
    key = "toy-rule-3e09-lr1e+30-s0"
    run = pico("run", str(tiny_design), "--json")
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    r = json.loads((tiny_design.parent / "results" / "runs" / f"{key}.json").read_text())
    assert r["diverged"] is True and r["select"]["bpb"] is None and len(r["code_sha"]) == 16
    assert not (tiny_design.parent / "results" / "failed" / f"{key}.json").exists()
    log = (tiny_design.parent / "results" / "work" / "logs" / f"{key}.log").read_text()
    assert "NaN or infinite" in log and "recorded as a loser" in log
    table = pico("table", str(tiny_design))
    assert table.communicate(timeout=120) and table.returncode == 0
    assert f"- `{key}`" in (tiny_design.parent / "results" / "table.md").read_text()


def test_a_run_stopped_while_it_waits_on_its_lock_exits_as_preempted(tiny_design):
    """The driver's stop signals every run and waits for it: one waiting on a lock (or preparing data) has no
    pico train to pass the signal to, and exits 75 itself instead of waiting on."""
    from pico.pipeline.experiment.data import locked
    from pico.pipeline.experiment.design import load_design

    design = load_design(tiny_design)
    lock = (design.work / "locks" / f"{KEYS[0]}.lock").resolve()
    spec = json.dumps({"domain": "toy", "model": "rule", "shape": "base", "budget": 3e9, "lr": 3e-3, "seed": 0})
    with locked(lock):
        run = pico("run-one", str(tiny_design), "--run", spec)
        wait_for(lambda: any(f.path == str(lock) for f in psutil.Process(run.pid).open_files()), what="the lock wait")
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=30)
    assert run.returncode == 75, err[-2000:]
    assert "stopped before it trained" in err and not (design.results_dir / "failed").exists()
