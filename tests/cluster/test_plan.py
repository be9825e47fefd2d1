"""Requests that cannot run are refused before submission, with a message that says what to change."""

from __future__ import annotations

import builtins
import json
import os

import pytest

from pico.cluster import plan, ray_jobs, slurm
from pico.cluster.cli import main
from pico.configs.tree import load_config
from pico.configs.errors import UserError


def cfg_with(*overrides: str):
    return load_config("quickstart", ["--train.out_dir=runs/x", *overrides])


def res(cfg, **flags):
    return plan.resources_from(cfg, **flags)


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("10:30", 630), ("24:00:00", 86400), ("1-12", 129600),
                                          ("2-00:30", 174600), ("1-00:00:05", 86405)])
def test_slurm_time_formats(text, seconds):
    assert plan.time_seconds(text) == seconds


@pytest.mark.parametrize("text,mb", [("0", 0), ("500", 500), ("500M", 500), ("64G", 65536), ("1T", 1048576)])
def test_slurm_mem_formats(text, mb):
    assert plan.mem_megabytes(text) == mb


def test_bad_time_and_mem_name_the_flag():
    with pytest.raises(UserError, match="--time"):
        plan.time_seconds("two hours")
    with pytest.raises(UserError, match="--mem"):
        plan.mem_megabytes("lots")


@pytest.mark.parametrize("flags,match", [
    ({"nodes": 0}, "at least one node"),
    ({"gpus_per_node": 8, "ranks_per_node": 4}, "one rank per GPU"),
    ({"gpus_per_node": 0, "ranks_per_node": 4, "cpus_per_task": 2}, "at least one core"),
    ({"time": "00:05:00", "signal_grace": 300}, "shorter than the time limit"),
])
def test_impossible_requests(flags, match):
    cfg = cfg_with()
    with pytest.raises(UserError, match=match):
        plan.check(cfg, res(cfg, **flags))


def test_cuda_device_without_gpus():
    cfg = cfg_with("--train.device=cuda")
    with pytest.raises(UserError, match="--gpus-per-node 0"):
        plan.check(cfg, res(cfg, gpus_per_node=0))


def test_request_larger_than_the_partition():
    cfg = cfg_with()
    nodes = [{"cpus": 64, "mem_mb": 512000, "gpus": 8}] * 2
    plan.check_fits(res(cfg, nodes=2, gpus_per_node=8, cpus_per_task=64, mem="400G"), nodes)
    with pytest.raises(UserError, match="impossible request: 4 node"):
        plan.check_fits(res(cfg, nodes=4, gpus_per_node=8, cpus_per_task=64), nodes)
    with pytest.raises(UserError, match="16 GPUs"):
        plan.check_fits(res(cfg, nodes=1, gpus_per_node=16, cpus_per_task=64), nodes)
    with pytest.raises(UserError, match="600G"):
        plan.check_fits(res(cfg, nodes=1, gpus_per_node=8, cpus_per_task=8, mem="600G"), nodes)


def test_submission_refuses_what_the_partition_cannot_hold(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(slurm, "tool", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(slurm, "partition_nodes", lambda p: [{"cpus": 2, "mem_mb": 4000, "gpus": 0}])
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    with pytest.raises(UserError, match="impossible request"):
        main(["slurm", "--config", "quickstart", "--nodes", "3"])
    assert not (tmp_path / "runs").exists()


def write_checkpoint(ckpt_dir, step: int, world: int):
    d = ckpt_dir / f"step_{step:06d}"
    d.mkdir(parents=True)
    (d / "pico_state.json").write_text(json.dumps({"step": step, "world_size": world}))
    for r in range(world):
        (d / f"rank{r:05d}.pt").write_bytes(b"")


def test_world_size_mismatch_with_the_checkpoint_to_resume(tmp_path):
    cfg = cfg_with(f"--train.out_dir={tmp_path}/run")
    write_checkpoint(cfg.checkpoint_dir, 100, 4)
    write_checkpoint(cfg.checkpoint_dir, 200, 2)
    assert plan.checkpoint_world_size(cfg.checkpoint_dir)[1] == 2
    plan.check_resume(cfg, res(cfg, gpus_per_node=0, ranks_per_node=2))
    with pytest.raises(UserError, match="world size mismatch: .*step_000200 was written by 2 ranks.* runs 8"):
        plan.check_resume(cfg, res(cfg, nodes=2, gpus_per_node=4, cpus_per_task=8))


def test_sbatch_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="`sbatch` is not on PATH.*slurm-client"):
        main(["slurm", "--config", "quickstart"])


def test_ray_missing_names_the_package(monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name.startswith("ray"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UserError, match=r"ray\[default\]"):
        ray_jobs.client("http://127.0.0.1:8265")


def test_ray_needs_an_address_and_a_pico_command(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(UserError, match="--address"):
        ray_jobs.client(None)
    with pytest.raises(UserError, match="pico command after `--`"):
        ray_jobs.entrypoint(["rm", "-rf", "/"])
    assert ray_jobs.entrypoint(["prep", "--input", "a b", "--output", "/o"]) == \
        "pico prep --ray-address=auto --input 'a b' --output /o"
    assert ray_jobs.entrypoint(["train", "--config", "x.yaml"]) == "pico train --config x.yaml"


def test_ray_refuses_relative_paths_without_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    with pytest.raises(UserError, match="relative path.*corpus.*--working-dir"):
        ray_jobs.submit("http://127.0.0.1:9", ["prep", "--input", "corpus", "--output", "/tmp/out"])


def test_ray_unreachable_dashboard():
    with pytest.raises(UserError, match="cannot reach the Ray dashboard"):
        ray_jobs.client("http://127.0.0.1:9")


def test_estimate_uses_deepspeeds_accounting():
    cfg = cfg_with("--train.zero_stage=2", "--optim.name=adamw")
    r = res(cfg, nodes=2, gpus_per_node=8, cpus_per_task=16)
    est = plan.estimate(cfg, r)
    p = est["params"]
    assert p and est["world_size"] == 16
    assert est["model_state_gib_per_gpu"] * 2**30 == pytest.approx(2 * p + 18 * p / 16, rel=1e-6)
    assert est["train_bytes"] == cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len * 16
    assert est["hours"] == pytest.approx(est["flops_per_byte"] * est["train_bytes"] / (16 * 989e12 * 0.35) / 3600)
    assert os.environ.get("DS_ACCELERATOR") == "cpu"  # conftest's value, untouched by the estimate


def test_ray_runtime_env(tmp_path):
    renv = ray_jobs.runtime_env(str(tmp_path), {"WANDB_MODE": "offline"}, ["data"])
    assert renv["working_dir"] == str(tmp_path.resolve())
    assert renv["env_vars"] == {"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    assert {".venv", "runs", "*.tar", "data"} <= set(renv["excludes"])
    assert "working_dir" not in ray_jobs.runtime_env(None, {})
    with pytest.raises(UserError, match="no such directory"):
        ray_jobs.runtime_env(str(tmp_path / "nope"), {})


def test_ray_token_header(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    (tmp_path / "tok").write_text("abc123\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert ray_jobs._auth_headers() == {"authorization": "Bearer abc123"}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # Ray's own client sends it then
    assert ray_jobs._auth_headers() == {}


@pytest.mark.parametrize("stage,precision,per_param", [(0, "bf16", 20), (0, "fp32", 16), (1, "bf16", 4 + 16 / 8),
                                                       (1, "fp32", 8 + 8 / 8)])
def test_stage_0_and_1_accounting(stage, precision, per_param):
    gpu, how = plan.model_state_bytes_per_gpu(1000, stage, 8, 1, 10, precision)
    assert gpu == pytest.approx(per_param * 1000) and precision in how


def test_scontrol_fields_keep_the_spaces_of_a_path():
    """`pico jobs logs` reads StdOut= from `scontrol show job -o`; a run directory with a space broke it."""
    from pico.cluster.slurm import parse_show_job

    line = ("JobId=12 JobName=pico-a JobState=RUNNING Reason=None StdOut=/data/my runs/a/slurm/x-12.out "
            "Power= TRES=cpu=2,mem=1G JobState=PENDING")
    fields = parse_show_job(line)
    assert fields["StdOut"] == "/data/my runs/a/slurm/x-12.out" and fields["Power"] == ""
    assert fields["TRES"] == "cpu=2,mem=1G" and fields["JobState"] == "RUNNING"  # the first of a repeated key
