"""`train.compile`: the trainer runs a torch.compile'd model and gets the eager model's numbers.

The suite sets TORCHDYNAMO_DISABLE=1 (tests/conftest.py); this test takes it out of its own
training subprocess only. Compiling even the tiny model's forward + backward on CPU took 285 s
with a cold inductor cache on the shared 2-CPU development machine (the whole test: 41-96 s once
the cache is warm), more than the ~2 minutes a default test may take, so it runs only with
PICO_TEST_COMPILE=1:

    PICO_TEST_COMPILE=1 python -m pytest tests/pipeline/train/test_compile.py -m slow
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.pipeline.train.test_trainer import TINY, _cmd, _env, metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PICO_TEST_COMPILE") != "1",
                       reason="torch.compile on CPU takes minutes (285 s measured); set PICO_TEST_COMPILE=1 to run"),
]


def run(out, shards, compile_: bool) -> tuple[dict[int, dict], str]:
    env = _env()
    env.pop("TORCHDYNAMO_DISABLE", None)
    env["TORCH_LOGS"] = "dynamo"  # says when dynamo traces, so the test knows compile really ran
    args = _cmd(1) + ["--config", "quickstart", f"--data.train=[{shards}]", f"--train.out_dir={out}", "--no-progress",
                      *TINY, "--train.steps=2", "--train.eval_every=100", "--checkpoint.every=100",
                      f"--train.compile={'true' if compile_ else 'false'}"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return metrics(out), proc.stderr


def test_compiled_training_matches_eager(tmp_path, tiny_shards):
    eager, eager_log = run(tmp_path / "eager", tiny_shards, False)
    compiled, compiled_log = run(tmp_path / "compiled", tiny_shards, True)
    assert "torchdynamo start tracing forward" in compiled_log
    assert "torchdynamo start tracing forward" not in eager_log
    assert sorted(compiled) == [1, 2]
    for step in (1, 2):  # same seed, same batches: the compiled graph computes the same loss
        assert abs(compiled[step]["loss"] - eager[step]["loss"]) < 1e-3, (step, compiled[step], eager[step])
