"""`pico submit slurm` against a real Slurm: a 2-rank CPU training job, and one that is preempted.

The jobs are real `pico train` runs (torchrun, 2 gloo ranks, DeepSpeed on CPU) of a tiny model,
submitted through the CLI exactly as a user would, on the single-node Slurm the session fixture
starts (2 CPUs: one job at a time).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from pico.cluster.cli import main as submit_main
from pico.cluster.jobs import main as jobs_main
from pico.configs.errors import UserError
from tests.cluster.conftest import daemon_logs, wait_job, write_shards

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TINY = ["--model.d_local=32", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.window=32",
        "--model.d_latent=64", "--model.n_latent_heads=2", "--model.n_latent_kv_heads=1", "--model.max_seq_len=64",
        "--data.seq_len=64", "--data.batch_size=2", "--data.shuffle_buffer=8", "--train.eval_batches=1",
        "--logging.wandb_mode=disabled"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def submit(tmp_path: Path, capsys, *overrides: str) -> tuple[str, Path]:
    """Submit the tiny run as 1 node x 2 CPU ranks; returns (job id, run directory)."""
    shards = write_shards(tmp_path / "shards")
    out = tmp_path / "run"
    capsys.readouterr()
    rc = submit_main(["slurm", "--config", "quickstart", "--nodes", "1", "--gpus-per-node", "0",
                      "--ranks-per-node", "2", "--cpus-per-task", "2", "--mem", "2G", "--time", "00:10:00",
                      "--signal-grace", "60", "--json", "--",
                      *TINY, f"--data.train=[{shards}]", f"--train.out_dir={out}", *overrides])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    return info["job_id"], out


def node_idle(timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True).stdout.strip()
        if state == "idle":
            return
        time.sleep(0.5)
    pytest.fail(f"the node did not become idle in {timeout}s: {state}\n{daemon_logs()}")


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*")
                  if (p / "pico_state.json").exists())


def test_cpu_training_job_completes(slurm_cluster, tmp_path, capsys):
    job, run = submit(tmp_path, capsys, "--train.steps=4", "--checkpoint.every=2", "--train.eval_every=4")
    fields = wait_job(job, lambda f: f["JobState"] in TERMINAL, timeout=240)
    log = Path(fields["StdOut"]).read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-3000:]
    assert checkpoints(run)[-1] == 4
    state = json.loads((run / "checkpoints" / "step_000004" / "pico_state.json").read_text())
    assert state["world_size"] == 2
    assert "training exited with 0" in log and "rendezvous" in log

    capsys.readouterr()
    assert jobs_main(["status", job, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "COMPLETED" and status["log"] == fields["StdOut"]
    assert jobs_main(["logs", job, "--tail", "3"]) == 0
    assert "training exited with 0" in capsys.readouterr().out


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, capsys):
    steps = 100
    job, run = submit(tmp_path, capsys, f"--train.steps={steps}", "--checkpoint.every=1000",
                      f"--train.eval_every={steps}", "--train.log_every=1")
    metrics = run / "metrics.jsonl"
    # training is under way once rank 0 has logged a step
    wait_job(job, lambda f: f["JobState"] in TERMINAL or (metrics.exists() and metrics.stat().st_size > 0),
             timeout=240, poll=0.25)
    # what Slurm does at time limit minus --signal-grace, sent now
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    fields = wait_job(job, lambda f: (f.get("Restarts", "0") != "0" and f["JobState"] == "PENDING")
                      or f["JobState"] in TERMINAL, timeout=240)
    log_path = Path(fields["StdOut"])
    first = log_path.read_text(errors="replace")
    assert fields["Restarts"] == "1", first[-3000:]
    saved = checkpoints(run)
    assert len(saved) == 1 and 0 < saved[0] < steps, (saved, first[-3000:])
    assert "warning signal" in first and f"requeueing job {job}" in first
    assert "received SIGUSR1" in first

    # Slurm holds a requeued job back for a while (BeginTime). Releasing it early is what an
    # operator may do, but only once slurmd has finished killing the previous run: a launch right
    # after the kill is refused ("Job N already killed, do not launch batch job").
    node_idle(timeout=60)
    time.sleep(3)

    def released(f: dict[str, str]) -> bool:
        if f["JobState"] == "PENDING" and f.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        return f["JobState"] in TERMINAL

    fields = wait_job(job, released, timeout=240, poll=1.0)
    log = log_path.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, log[-3000:], daemon_logs())
    assert checkpoints(run)[-1] == steps
    assert f"resumed from {run / 'checkpoints' / f'step_{saved[0]:06d}'}" in log
    assert "restart 1" in log
    # the resumed run continued the step count rather than starting over
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    assert logged[-1] == steps and logged.count(1) == 1


def test_second_submission_to_a_busy_run_and_cancel(slurm_cluster, tmp_path, capsys):
    job, _ = submit(tmp_path, capsys, "--train.steps=1000")
    with pytest.raises(UserError, match=f"job {job} \\(pico-run\\) is already queued or running"):
        submit(tmp_path, capsys, "--train.steps=1000")
    # the same job name for another run directory is no conflict
    other, _ = submit(tmp_path / "elsewhere", capsys, "--train.steps=1000")
    assert jobs_main(["cancel", other]) == 0
    assert jobs_main(["cancel", job]) == 0
    fields = wait_job(job, lambda f: f["JobState"] in TERMINAL, timeout=60)
    assert fields["JobState"] == "CANCELLED"
