"""`pico submit slurm --dry-run` of a 4-node x 8-GPU config, checked line by line against a stored script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pico.cluster.cli import main

DATA = Path(__file__).parent / "data"


def dry_run(tmp_path, monkeypatch, capsys, *extra: str) -> tuple[str, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_CONF", raising=False)
    assert main(["slurm", "--config", str(DATA / "pico-4x8.yaml"), "--dry-run", *extra]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def normalise(script: str, workdir: Path) -> str:
    """The two machine-specific bits: where the job runs from and which Python it uses."""
    return script.replace(sys.executable, "<PYTHON>").replace(str(workdir), "<WORKDIR>")


def test_dry_run_matches_stored_script(tmp_path, monkeypatch, capsys):
    script, _ = dry_run(tmp_path, monkeypatch, capsys)
    expected = (DATA / "pico-4x8.sbatch").read_text()
    assert normalise(script, tmp_path).splitlines() == expected.splitlines()
    # the real script (unnormalised) is valid bash
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    assert not (tmp_path / "runs").exists(), "a dry run must not write anything"


def test_dry_run_plan_states_its_assumptions(tmp_path, monkeypatch, capsys):
    _, plan = dry_run(tmp_path, monkeypatch, capsys)
    assert "world size 32; ZeRO stage 2" in plan
    assert "estimate_zero2_model_states_mem_needs" in plan and "GiB" in plan
    assert "989 TFLOP/s per GPU (H100 bf16 dense peak)" in plan and "MFU 35%" in plan
    _, plan3 = dry_run(tmp_path, monkeypatch, capsys, "--train.zero_stage=3", "--cluster.assumed_mfu=0.5")
    assert "estimate_zero3_model_states_mem_needs" in plan3 and "MFU 50%" in plan3


def test_flags_override_the_config(tmp_path, monkeypatch, capsys):
    script, _ = dry_run(tmp_path, monkeypatch, capsys, "--nodes", "2", "--gpus-per-node", "4", "--time", "1:00:00",
                        "--partition", "h100", "--qos", "high", "--signal-grace", "120")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --time=1:00:00",
                 "#SBATCH --partition=h100", "#SBATCH --qos=high", "#SBATCH --signal=B:USR1@120",
                 "--nproc_per_node=4", "--shutdown-timeout=90"):
        assert line in script


def test_cpu_job_uses_gloo_settings(tmp_path, monkeypatch, capsys):
    script, plan = dry_run(tmp_path, monkeypatch, capsys, "--gpus-per-node", "0", "--ranks-per-node", "2",
                           "--cpus-per-task", "4", "--nodes", "1", "--train.precision=fp32")
    assert "export DS_ACCELERATOR=cpu" in script and "export OMP_NUM_THREADS=2" in script
    assert "--gpus-per-node" not in script and "NCCL" not in script
    assert "--nproc_per_node=2" in script
    assert "not estimated for CPU ranks" in plan


@pytest.mark.parametrize("extra, says", [
    (["--partition", "gpu\ntouch pwned #"], "--partition (cluster.partition)='gpu\\ntouch pwned #'"),
    (["--qos", "high;touch pwned"], "--qos (cluster.qos)"),
    (["--name", "team/run1"], "job name (--name, by default from train.out_dir)='team/run1'"),
    (["--", "--train.out_dir=runs/a\ntouch pwned"], "train.out_dir"),
    (["--", "--train.out_dir=runs/100%/a"], "holds a control character or a %"),
])
def test_values_that_would_change_the_script_are_refused(tmp_path, monkeypatch, capsys, extra, says):
    """A line break in an #SBATCH value ends the header there and runs the rest as a command."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLURM_CONF", raising=False)
    from pico.pipeline.cli import main as pico

    assert pico(["submit", "slurm", "--config", str(DATA / "pico-4x8.yaml"), "--dry-run", *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "runs").exists()
