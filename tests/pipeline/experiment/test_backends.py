"""A 2-run tiny design through the suite's real single-node Slurm (one array task per run) and a local Ray head
(one Ray Job per run); each run is the same `pico experiment run-one` as on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.pipeline.experiment.test_drive import KEYS


def run_design(design, *args: str, env: dict | None = None, timeout: float = 480) -> dict:
    out = subprocess.run([sys.executable, "-m", "pico.pipeline.cli", "experiment", "run", str(design), "--json", *args],
                         capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_tiny_design_as_a_slurm_array(slurm_cluster, tmp_path):
    from tests.pipeline.experiment.conftest import write_design

    design = write_design(tmp_path, cluster={"cpus": 1, "mem": "1G", "time": "00:10:00"})
    assert run_design(design, "--submit", "slurm", env={"SLURM_CONF": slurm_cluster["SLURM_CONF"]}) == {
        "finished": 2, "planned": 2, "failed": []}
    results = tmp_path / "results"
    for key in KEYS:
        assert json.loads((results / "runs" / f"{key}.json").read_text())["test"]["bpb"] > 0
    (script,) = (results / "work" / "slurm").glob("*.sbatch")
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and "#SBATCH --requeue" in text and "scontrol requeue" in text
    logs = list((results / "work" / "slurm").glob("*.out"))
    assert len(logs) == 2 and all("array task" in p.read_text() and "run exited with 0" in p.read_text() for p in logs)


@pytest.mark.ray
@pytest.mark.slow
def test_a_tiny_design_as_ray_jobs(ray_head, tmp_path, monkeypatch):
    from tests.pipeline.experiment.conftest import write_design

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # pico finds the token by itself
    design = write_design(tmp_path)
    summary = run_design(design, "--submit", "ray", "--address", ray_head["address"], "--jobs", "2",
                         env={"RAY_AUTH_TOKEN_PATH": ray_head["token_path"]})
    assert summary == {"finished": 2, "planned": 2, "failed": []}
    for key in KEYS:
        assert json.loads((tmp_path / "results" / "runs" / f"{key}.json").read_text())["test"]["bpb"] > 0
