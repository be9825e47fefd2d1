"""Training on a weighted mixture (data.mix) with 2 real gloo ranks: per-source metrics, shares, eval."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.pipeline.data.test_loader import make_docs, split_docs, write_dataset
from tests.pipeline.train.test_trainer import TINY, _cmd, _env, metrics


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_train_on_a_mixture_and_report_each_source(tmp_path):
    web = write_dataset(tmp_path / "web", {"train": split_docs(make_docs(160, 1), 8), "val": [make_docs(12, 2)]})
    code = write_dataset(tmp_path / "code", {"train": split_docs(make_docs(40, 3), 4), "val": [make_docs(12, 4)]})
    out = tmp_path / "run"
    mix = f"[{{name: web, paths: [{web}], weight: 3}}, {{name: code, paths: [{code}], weight: 1}}]"
    args = _cmd(2) + ["--config", "quickstart", "--data.train=[]", f"--data.mix={mix}", f"--train.out_dir={out}",
                      "--no-progress", *TINY, "--optim.name=adamw", "--train.steps=6", "--train.eval_every=6",
                      "--checkpoint.every=6", "--json"]
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    rows = 6 * 4 * 2  # steps x batch x ranks
    seen = summary["data_sources"]  # rank 0's: 24 rows, 3:1
    assert seen["web"]["rows"] == 18 and seen["code"]["rows"] == 6
    last = metrics(out)[6]
    assert last["data/bytes_seen/web"] == rows * 3 / 4 * 64 and last["data/bytes_seen/code"] == rows / 4 * 64
    assert 0 < last["bpb_train/web"] < 12 and 0 < last["bpb_train/code"] < 12
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val/bpb" in x][-1]
    assert 0 < val["val/bpb/web"] < 12 and 0 < val["val/bpb/code"] < 12 and val["val/bpb"] > 0
    # the mixture's loader position is in the checkpoint: a resume goes on from it
    again = [a if not a.startswith("--train.steps=") else "--train.steps=8" for a in args] + ["--resume"]
    proc = subprocess.run(again, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout)["data_sources"]
    assert seen["web"]["rows"] == 24 and seen["code"]["rows"] == 8 and max(metrics(out)) == 8


def test_a_mixture_source_that_does_not_exist_is_named(tmp_path):
    web = write_dataset(tmp_path / "web", {"train": [make_docs(8, 1)], "val": [make_docs(4, 2)]})
    mix = f"[{{name: web, paths: [{web}]}}, {{name: books, paths: [{tmp_path / 'nope'}]}}]"
    args = _cmd(1) + ["--config", "quickstart", "--data.train=[]", f"--data.mix={mix}",
                      f"--train.out_dir={tmp_path / 'run'}", "--no-progress", *TINY, "--train.steps=1"]
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if "data.mix[1] (books)" in ln]
    assert line and "nope" in line[0], proc.stderr[-2000:]
