"""The shipped designs' sizes: the GPU design fits 8 minutes on one H100 with its corpus under 50 MB; the
cluster design's --dry-run prints its GPU-hours; the CPU ladder fits about 3 hours at its measured rate."""

from __future__ import annotations

import glob
import os
import subprocess
import sys


from pico.pipeline.experiment.design import load_design
from pico.pipeline.experiment.drive import estimate
from tests.conftest import REPO

DESIGNS = REPO / "configs" / "experiments"
PREP_S = 120  # `pico prep` of the GPU design's corpus on a 16-core GPU machine (estimated, generously)


def test_gpu_design_fits_8_minutes_with_a_corpus_under_50_mb(monkeypatch, corpus):
    monkeypatch.setenv("PICO_CORPUS", str(corpus))
    design = load_design(DESIGNS / "routing-gpu.yaml")
    est = estimate(design)
    wall_s = est["run_hours"] * 3600 / 2 + PREP_S  # --jobs 2 (the design's instructions)
    assert est["runs"] == 16 and wall_s < 8 * 60, wall_s
    inputs = [p for d in design.domains.values() for raw in d.prep.inputs
              for p in glob.glob(os.path.expandvars(raw))]
    size = sum(os.path.getsize(os.path.join(root, f)) for p in inputs
               for root, _, files in (os.walk(p) if os.path.isdir(p) else [(os.path.dirname(p), [], [os.path.basename(p)])])
               for f in files)
    assert 0 < size < 50e6, size


def test_cpu_ladder_fits_about_3_hours_at_its_measured_rate(monkeypatch):
    monkeypatch.setenv("PICO_CORPUS", "/nowhere")
    est = estimate(load_design(DESIGNS / "routing-ladder-cpu.yaml"))
    assert est["budgets"] == ["1e12", "3e12"] and 2.0 < est["run_hours"] / 2 < 3.5
    seeds_at_largest = {c["runs"]["3e12"] for c in est["cells"] if "3e12" in c["runs"]}
    assert seeds_at_largest == {5}  # 3 LR-sweep runs (seed 0) + seeds 1 and 2


def test_cluster_dry_run_prints_gpu_hours_without_the_data(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "PICO_DATA"}
    env["PICO_DATA"] = "/nonexistent-pico-data"
    out = subprocess.run([sys.executable, "-m", "pico.pipeline.cli", "experiment", "run",
                          str(DESIGNS / "routing-cluster.yaml"), "--dry-run"], capture_output=True, text=True,
                         env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "budgets 1e17, 1e18, 1e19" in out.stdout and "GPU-hours:" in out.stdout
    assert "warning: domains.prose.train[0]: /nonexistent-pico-data/prose/shards does not exist" in out.stderr


def test_isoflop_design_runs_every_family_at_its_best_shape_at_3e13(monkeypatch):
    """Stage 1 sweeps 3 shapes x 3 LRs per family and domain at 1e13; stage 2 runs the best shape and its
    neighbour at 3e13, then 2 more seeds at the winner: 4 runs per family and domain."""
    monkeypatch.setenv("PICO_CORPUS", "/nowhere")
    design = load_design(DESIGNS / "isoflop-cpu.yaml")
    est = estimate(design)
    best = [c for c in est["cells"] if c.get("best")]
    assert len(best) == len(design.models) * len(design.domains) and {c["runs"]["3e13"] for c in best} == {4}
    assert est["runs"] == len(best) * (3 * 3 + 4) and list(design.models)[:2] == ["plain", "rule"]


def test_the_cluster_isoflop_design_is_the_cpu_one_at_gpu_scale(monkeypatch):
    """Same models, protocol and targets as isoflop-cpu.yaml; 1e17/1e18 on GPUs in under 100 GPU-hours."""
    monkeypatch.setenv("PICO_DATA", "/nowhere")
    monkeypatch.setenv("PICO_CORPUS", "/nowhere")
    cpu, gpu = (load_design(DESIGNS / f"isoflop-{n}.yaml") for n in ("cpu", "cluster"))
    assert list(gpu.models) == list(cpu.models) and gpu.shape_rule == cpu.shape_rule == "isoflop"
    assert [(t.models, t.against, t.at_most) for t in gpu.targets] == [(t.models, t.against, t.at_most)
                                                                        for t in cpu.targets]
    assert [b.shapes for b in gpu.budgets] == [b.shapes for b in cpu.budgets] == ["all", "best"]
    est = estimate(gpu)
    assert est["budgets"] == ["1e17", "1e18"] and 40 < est["gpu_hours"] < 100, est["gpu_hours"]
