"""`pico quickstart` runs the whole chain (tiny sizes) and a rerun reuses finished stages."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

TINY = ["--model.d_local=32", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.window=32",
        "--model.n_in=1", "--model.n_out=1", "--model.d_latent=64", "--model.n_latent=1",
        "--model.n_latent_heads=2", "--model.n_latent_kv_heads=1", "--model.max_seq_len=64",
        "--data.seq_len=64", "--data.batch_size=4", "--train.eval_batches=2", "--logging.wandb_mode=offline"]


def _run(out, corpus_dir, steps):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "pico.pipeline.cli", "quickstart", "--corpus", str(corpus_dir), "--out", str(out),
           "--steps", str(steps), "--max-bytes", "24", "--val-fraction", "0.3", "--json", "--no-progress", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
def test_quickstart_full_chain_and_rerun(tmp_path):
    # A small slice of the default corpus (this interpreter's stdlib), so the test stays short.
    from pico.pipeline.commands.quickstart import default_corpus

    src = tmp_path / "corpus"
    src.mkdir()
    for path in default_corpus()[:60]:
        (src / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "qs"
    s, _ = _run(out, src, 6)
    e = s["eval"]
    assert math.isfinite(e["model_bpb"]) and 0 < e["model_bpb"] < 9
    assert 0 < e["xz9e_bpb"] < e["unigram_bpb"] < 8
    g = s["generate"]
    assert g["identical_greedy_output"] is True
    assert g["plain"]["bytes_per_s"] > 0 and g["speculative"]["bytes_per_s"] > 0
    assert g["sampled"]["sample"].startswith("def __init__(self") and g["sampled"]["temperature"] > 0
    assert (out / "release" / "model.safetensors").exists() and (out / "release" / "SHA256SUMS").exists()
    assert (out / "shards" / "manifest.json").exists()
    assert (out / "run" / "routing" / "latest.png").exists()
    assert list((out / "run" / "wandb").glob("offline-run-*"))
    # Rerun: shards reused, training not repeated, same release.
    s2, err = _run(out, src, 6)
    assert "training already finished" in err
    assert s2["eval"]["model_bpb"] == e["model_bpb"]


def test_summary_shows_a_sampled_continuation_beside_the_greedy_one(capsys):
    from pico.pipeline.commands.quickstart import print_summary

    gen = {"plain": {"bytes_per_s": 100.0}, "speculative": {"bytes_per_s": 200.0, "bytes_per_pass": 2.0,
                                                            "sample": "def __init__(self, self, self"},
           "sampled": {"temperature": 0.8, "top_p": 0.95, "seed": 0, "sample": "def __init__(self, name):"},
           "speedup": 2.0, "identical_greedy_output": True}
    print_summary({"total_s": 1.0, "steps": 3, "train": {"n_params": 1e6, "bytes_seen": 1e6}, "generate": gen,
                   "eval": {"held_out_bytes": 10, "model_bpb": 2.0, "unigram_bpb": 5.0, "xz9e_bpb": 3.0},
                   "shards": "s", "run_dir": "r", "release": "rel", "wandb": "w", "routing_picture": "p"})
    out = capsys.readouterr().out
    assert "greedy       'def __init__(self, self, self'" in out and "repeat itself" in out
    assert "sampled      'def __init__(self, name):'" in out and "temperature 0.8, top-p 0.95" in out
