"""The trainer when things go wrong (issue 19): skipped data is reported, a damaged newest
checkpoint is stepped over on --resume, a full disk is one clear error, SOAP's state is saved once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pico.pipeline.train.checkpoint import safe_load
from tests.fsfaults import full_disk  # noqa: F401 (fixture)
from tests.pipeline.train.test_trainer import metrics, train_run

pytestmark = pytest.mark.slow


def test_skipped_corrupt_shards_are_counted_on_stderr_metrics_and_summary(tmp_path, tiny_shards):
    shards = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    (shards / "train-000099.tar").write_bytes(b"\x00not a tar" * 500)
    proc = train_run(tmp_path / "run", f"{shards}/*.tar", "--optim.name=adamw", "--data.skip_corrupt=true",
                     "--train.steps=2", "--train.eval_every=2", "--checkpoint.every=2", "--json")
    assert "data: skipped 1 corrupt sample(s) or shard(s) so far (data.skip_corrupt=true) in train-000099.tar" \
        in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["corrupt_skipped"] == 1 and summary["corrupt_shards"] == ["train-000099.tar"]
    assert metrics(tmp_path / "run")[2]["data/corrupt_skipped"] == 1


def test_resume_steps_over_a_damaged_newest_checkpoint_and_soap_state_is_saved_once(tmp_path, tiny_shards):
    run = tmp_path / "run"
    common = ["--optim.name=soap", "--train.eval_every=100", "--checkpoint.every=2", "--checkpoint.keep_last=3"]
    train_run(run, tiny_shards, *common, "--train.steps=4")
    step2, step4 = run / "checkpoints" / "step_000002", run / "checkpoints" / "step_000004"
    ds = torch.load(step2 / "ds" / "mp_rank_00_model_states.pt", weights_only=True)
    assert ds["optimizer"] is None  # SOAP's state lives in the rank file only
    assert safe_load(step2 / "rank00000.pt")["optimizer"]["state"]
    rank_file = step4 / "rank00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:1000])
    proc = train_run(run, tiny_shards, *common, "--train.steps=6", "--resume")
    assert "--resume: skipping damaged checkpoint step_000004:" in proc.stderr and "rank00000.pt" in proc.stderr
    assert f"resumed from {step2} at step 2" in proc.stderr
    assert max(metrics(run)) == 6


def test_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial(tmp_path, tiny_shards, full_disk):  # noqa: F811
    small = full_disk(512 << 10)
    proc = train_run(tmp_path / "run", tiny_shards, "--optim.name=adamw", "--train.steps=2", "--train.eval_every=2",
                     f"--checkpoint.dir={small}", check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("pico train: error")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and "writing checkpoint step_000002" in lines[0] and "was removed" in lines[0], lines
    assert list(small.iterdir()) == []


def test_a_save_prunes_only_older_steps_and_clears_killed_saves(tmp_path, tiny_shards):
    """keep_last=1 after resuming past a damaged newer step: the save keeps the step it wrote (pruning the
    damaged newer one's elders, never the new one) and removes a killed save's debris."""
    run = tmp_path / "run"
    common = ["--optim.name=adamw", "--train.eval_every=100", "--checkpoint.every=2", "--checkpoint.keep_last=1"]
    train_run(run, tiny_shards, *common, "--train.steps=2")
    ckpts = run / "checkpoints"
    damaged = Path(shutil.copytree(ckpts / "step_000002", ckpts / "step_000010"))
    (damaged / "rank00000.pt").write_bytes(b"\0" * 100)
    (ckpts / ".tmp-step_000007" / "ds").mkdir(parents=True)  # a save killed at a step the run will not revisit
    proc = train_run(run, tiny_shards, *common, "--train.steps=4", "--resume")
    assert "skipping damaged checkpoint step_000010" in proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000004", "step_000010"]


def test_resume_applies_the_configs_optimizer_settings_not_the_checkpoints(tmp_path, tiny_shards):
    """torch's load_state_dict brings back each param group's settings as saved: a weight decay changed for the
    resumed run would be silently ignored. The config's apply, and the run says what changed."""
    run = tmp_path / "run"
    common = ["--optim.name=soap", "--train.eval_every=100", "--checkpoint.every=2"]
    train_run(run, tiny_shards, *common, "--train.steps=2", "--optim.weight_decay=0.0")
    proc = train_run(run, tiny_shards, *common, "--train.steps=4", "--optim.weight_decay=0.25", "--resume")
    assert "--resume: optim.weight_decay, train.steps changed since the checkpoint" in proc.stderr
    groups = safe_load(run / "checkpoints" / "step_000004" / "rank00000.pt")["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups if g["weight_decay"]} == {0.25}
    # what shapes SOAP's saved preconditioners cannot change on resume: refused, not half-applied
    proc = train_run(run, tiny_shards, *common, "--train.steps=6", "--optim.merge_dims=true", "--resume", check=False)
    assert proc.returncode == 2 and "optim.merge_dims=False; its optimizer state is shaped by them" in proc.stderr


def test_metrics_of_steps_a_job_logs_again_are_moved_aside_not_repeated(tmp_path):
    """A job resumed at step 3 logs steps 4.. again; a job starting over logs everything again."""
    from pico.pipeline.train.metrics import _supersede

    path = tmp_path / "metrics.jsonl"
    old = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
    path.write_text("".join(old) + '{"step": 6, "lo')  # the killed job's last line, cut short
    _supersede(path, 3)
    assert path.read_text() == "".join(old[:3])
    assert (tmp_path / "metrics.superseded.jsonl").read_text() == "".join(old[3:]) + '{"step": 6, "lo\n'
    _supersede(path, 3)  # nothing later: untouched
    assert path.read_text() == "".join(old[:3])
    _supersede(path, None)
    assert path.read_text() == "" and (tmp_path / "metrics.superseded.jsonl").read_text().count("\n") == 6
