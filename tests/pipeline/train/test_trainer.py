"""The trainer end to end, with real DeepSpeed on gloo ranks started by torchrun.

Each run is a subprocess (`python -m pico.pipeline.cli train ...` or torchrun with 2 ranks), so
process groups and signal handlers never leak between tests.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port

TINY = [
    "--model.d_local=32", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.window=32",
    "--model.n_in=1", "--model.n_out=1", "--model.d_latent=64", "--model.n_latent=1",
    "--model.n_latent_heads=2", "--model.n_latent_kv_heads=1", "--model.max_seq_len=64", "--model.n_predict=2",
    "--data.seq_len=64", "--data.batch_size=4", "--data.shuffle_buffer=8",
    "--train.eval_batches=2", "--train.log_every=1", "--logging.wandb_mode=disabled",
    "--optim.warmup_steps=2",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _cmd(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "pico.pipeline.cli", "train"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "pico.pipeline.cli", "train"]


def train_run(out: Path, shards: Path, *extra: str, ranks: int = 1, check: bool = True, timeout: int = 400):
    args = _cmd(ranks) + ["--config", "quickstart", f"--data.train=[{shards}]", f"--train.out_dir={out}",
                          "--no-progress", *TINY, *extra]
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def metrics(out: Path) -> dict[int, dict]:
    """Last record of each step in metrics.jsonl (a resumed run may repeat steps)."""
    rows: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            rows[r["step"]] = r
    return rows


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_each_zero_stage(tmp_path, tiny_shards, stage):
    out = tmp_path / f"z{stage}"
    train_run(out, tiny_shards, "--optim.name=adamw", "--optim.lr=3e-3", f"--train.zero_stage={stage}",
              "--train.steps=16", "--train.eval_every=16", "--checkpoint.every=8", ranks=2)
    m = metrics(out)
    first = sum(m[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(m[s]["loss"] for s in (14, 15, 16)) / 3
    assert last < first - 0.2, (first, last)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_000008", "step_000016"]
    from pico.pipeline.release.load import load_model

    model, info = load_model(out)
    assert info["step"] == 16 and info["zero_stage"] == stage and info["world_size"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the checkpoint resumes under the same stage and rank count
    train_run(out, tiny_shards, "--optim.name=adamw", "--optim.lr=3e-3", f"--train.zero_stage={stage}",
              "--train.steps=18", "--train.eval_every=100", "--checkpoint.every=100", "--resume", ranks=2)
    assert max(metrics(out)) == 18


def orphans_of(out: Path, grace_s: float = 5.0) -> list[int]:
    """Processes still running with `out` on their command line (forked loader workers inherit it)."""
    import psutil

    deadline = time.time() + grace_s
    while True:
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])
                and p.pid != os.getpid()]
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


@pytest.mark.slow
def test_resume_after_kill9_is_bit_exact(tmp_path, tiny_shards):
    common = ["--optim.name=soap", "--optim.lr=3e-3", "--optim.precondition_frequency=3", "--train.steps=14",
              "--train.eval_every=100", "--checkpoint.every=4", "--data.num_workers=2"]
    ref = tmp_path / "ref"
    train_run(ref, tiny_shards, *common)
    killed = tmp_path / "killed"
    args = _cmd(1) + ["--config", "quickstart", f"--data.train=[{tiny_shards}]", f"--train.out_dir={killed}",
                      "--no-progress", *TINY, *common]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_000008").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert orphans_of(killed) == [], "loader workers outlived their trainer"
    train_run(killed, tiny_shards, *common, "--resume")
    a, b = metrics(ref), metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 15))
    # one history: what the killed job logged past its step-8 checkpoint was moved aside, not repeated
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 15))
    for step in range(9, 15):
        assert a[step]["loss"] == b[step]["loss"], (step, a[step]["loss"], b[step]["loss"])


@pytest.mark.slow
def test_sigusr1_saves_and_exits_75(tmp_path, tiny_shards):
    out = tmp_path / "pre"
    args = _cmd(1) + ["--config", "quickstart", f"--data.train=[{tiny_shards}]", f"--train.out_dir={out}",
                      "--no-progress", *TINY, "--train.steps=100000", "--checkpoint.every=100000",
                      "--train.eval_every=100000"]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == 75, err[-2000:]
    assert "--resume" in err
    from pico.pipeline.train.checkpoint import latest_checkpoint, read_run_state

    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None and read_run_state(latest)["step"] >= 3


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, tiny_shards):
    out = tmp_path / "nan"
    proc = train_run(out, tiny_shards, "--optim.name=adamw", "--optim.lr=1e30", "--optim.warmup_steps=0",
                     "--optim.grad_clip=0", "--train.steps=50", "--checkpoint.every=1", "--train.eval_every=1000",
                     check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "NaN or infinite at step" in proc.stderr
    from pico.pipeline.train.checkpoint import latest_checkpoint, read_run_state

    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None
    bad_step = int(proc.stderr.split("NaN or infinite at step ")[1].split()[0])
    assert read_run_state(latest)["step"] < bad_step


def test_refuses_to_overwrite_a_run_and_bad_config(tmp_path, tiny_shards):
    proc = train_run(tmp_path / "x", tiny_shards, "--model.routr=learned", check=False)
    assert proc.returncode == 2 and "model.routr" in proc.stderr and "router" in proc.stderr
    proc = train_run(tmp_path / "x", tmp_path / "no-such-shards", check=False)
    assert proc.returncode == 2 and "no-such-shards" in proc.stderr


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_and_routing_picture(tmp_path, tiny_shards):
    out = tmp_path / "wb"
    train_run(out, tiny_shards, "--logging.wandb_mode=offline", "--train.steps=4", "--train.eval_every=4",
              "--checkpoint.every=4")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and list(runs[0].glob("*.wandb"))[0].stat().st_size > 0
    # what W&B uploads (the run's records and files) names no local path: the config's data and run paths by
    # name, no host metadata (its command line)
    record = list(runs[0].glob("*.wandb"))[0].read_bytes()
    assert b'"out_dir"' in record and b'"wb"' in record and str(tmp_path).encode() not in record
    for f in (runs[0] / "files").glob("*.*"):
        assert str(tmp_path) not in f.read_text(errors="replace"), f.name
    images = list(runs[0].glob("files/media/images/**/*.png"))
    assert images, "routing picture was not logged to W&B"
    assert (out / "routing" / "latest.png").stat().st_size > 1000
    assert "<span" in (out / "routing" / "latest.html").read_text()
    m = metrics(out)
    assert "router/routed_frac_mean" in m[4] and "bytes_per_s" in m[4] and "grad_norm" in m[4]
    assert math.isfinite(m[4]["grad_norm"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val/bpb" in r for r in rows)
