"""Tiny designs for the experiment tests: a few training steps of a very small model on tiny shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import write_shards

TINY = {"rule": {"config": "quickstart", "overrides": [
            "model.d_local=32", "model.n_heads=2", "model.n_kv_heads=1", "model.window=32", "model.d_latent=64",
            "model.n_latent_heads=2", "model.n_latent_kv_heads=1", "model.max_seq_len=64"]},
        "plain": {"config": "vanilla", "overrides": [
            "model.d_local=32", "model.n_heads=2", "model.n_kv_heads=1", "model.window=64", "model.max_seq_len=64"]}}


def write_design(tmp: Path, **extra) -> Path:
    """A 2-run design (rule and plain, one toy domain, one budget of about 30 steps) under tmp."""
    if not (tmp / "shards").exists():
        write_shards(tmp / "shards")
        for split in ("test", "select"):
            (tmp / split).mkdir()
            (tmp / split / "a.txt").write_text("a byte model routes some bytes into wider latent blocks. " * 20 + split)
    design = {"name": "tiny", "models": TINY,
              "domains": {"toy": {"train": [str(tmp / "shards")], "test": [str(tmp / "test")],
                                  "select": [str(tmp / "select")]}},
              "budgets": [3e9], "seeds": [0], "lr": {"fixed": {"toy": 3e-3}},
              "overrides": ["data.seq_len=64", "data.batch_size=2", "data.shuffle_buffer=8"],
              "results": str(tmp / "results"), **extra}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(design, sort_keys=False))
    return path


@pytest.fixture
def tiny_design(tmp_path) -> Path:
    return write_design(tmp_path)


def edit_design(path: Path, change):
    """Change the design file in place and load it."""
    from pico.pipeline.experiment.design import load_design

    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_design(path)


# the suite's own single-node Slurm and local Ray head (started and stopped by tests/cluster/conftest.py's code)
from tests.cluster.conftest import ray_head, slurm_cluster  # noqa: E402,F401
