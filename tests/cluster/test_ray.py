"""`pico submit ray` against a real Ray head (started by the fixture): a prep job writes shards."""

from __future__ import annotations

import json
import random

import pytest

from pico.cluster.cli import main as submit_main
from pico.cluster.jobs import main as jobs_main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_prep_runs_as_a_ray_job(ray_head, tmp_path, capsys, monkeypatch):
    address = ray_head["address"]
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # pico finds the token by itself
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head["token_path"])
    rng = random.Random(0)
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(6):
        words = [rng.choice(["ray", "job", "shard", "byte", "pico", "prep"]) for _ in range(300)]
        (src / f"doc{i}.txt").write_text(" ".join(words))
    out = tmp_path / "shards"

    capsys.readouterr()
    rc = submit_main(["ray", "--address", address, "--wait", "--timeout", "120", "--json",
                      "--env", "RAY_USAGE_STATS_ENABLED=0", "--",
                      "prep", "--input", str(src), "--output", str(out), "--workers", "1", "--no-progress",
                      "--val-fraction", "0.2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["state"] == "SUCCEEDED"
    job = result["job_id"]

    from pico.data_prep import verify

    assert sorted(p.name for p in out.glob("train-*.tar"))
    assert verify(str(out)) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"]["written"] == 6

    assert jobs_main(["status", job, "--address", address, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "SUCCEEDED" and status["entrypoint"].startswith("pico prep --ray-address=auto")
    assert jobs_main(["logs", job, "--address", address]) == 0
    assert "train" in capsys.readouterr().out
