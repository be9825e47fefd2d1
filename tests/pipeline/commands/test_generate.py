"""`pico generate`: output formats, prompts past the context (reported), and bad input (one-line
errors naming the flag, exit 2)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict

import pytest
import torch

from pico.model import build_model
from pico.pipeline.cli import main as cli_main
from tests.model.conftest import tiny_config

MAX_SEQ_LEN = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run directory laid out as `pico train` writes it (DeepSpeed model states + pico_state.json)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(router="learned", n_predict=3, max_seq_len=MAX_SEQ_LEN))
    with torch.no_grad():
        model.router.score.bias.fill_(0.2)
    step = tmp_path_factory.mktemp("run") / "checkpoints" / "step_000001"
    (step / "ds").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, step / "ds" / "mp_rank_00_model_states.pt")
    (step / "pico_state.json").write_text(json.dumps({"step": 1, "config": {"model": asdict(model.cfg)}}))
    return step.parent.parent


def gen(checkpoint, *argv: str) -> int:
    return cli_main(["generate", "--model", str(checkpoint), *argv])


def test_cli_generates_from_an_empty_prompt_as_json(checkpoint, capsys):
    assert gen(checkpoint, "--prompt", "", "--prompt", "ab", "--max-bytes", "12", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["outputs"]) == 2 and out["forward_passes"] >= 1 and out["bytes_per_s"] > 0
    assert out["bytes_per_pass"] > 0 and out["stopped"][0] in ("eos", "max_bytes")
    assert out["prompt_bytes_outside_context"] == [0, 0] and out["context"] == MAX_SEQ_LEN


def test_cli_raw_writes_bytes_and_text_mode_replaces_invalid_utf8(checkpoint, capfdbinary):
    assert gen(checkpoint, "--prompt", "hi", "--max-bytes", "20", "--raw", "--no-speculative") == 0
    raw = capfdbinary.readouterr().out
    assert gen(checkpoint, "--prompt", "hi", "--max-bytes", "20") == 0
    text = capfdbinary.readouterr().out.decode("utf-8")  # always valid UTF-8
    assert text.rstrip("\n") == (b"hi" + raw).decode("utf-8", "replace")


def test_a_prompt_longer_than_the_context_runs_and_says_what_was_outside(checkpoint, tmp_path, capsys):
    f = tmp_path / "long.txt"
    f.write_bytes(b"the cat sat on the mat. " * 20)  # 480 bytes, context 48
    assert gen(checkpoint, "--prompt-file", str(f), "--prompt", "ab", "--max-bytes", "150", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_bytes_outside_context"] == [0, 480 - MAX_SEQ_LEN] and out["prompt_bytes"] == [2, 480]  # --prompt first
    assert out["n_bytes"] > 0 and out["cache_bytes_per_sequence"] > 0
    assert gen(checkpoint, "--prompt-file", str(f), "--max-bytes", "4", "--context", "16") == 0
    assert f"first {480 - 16} of 480 bytes are outside the context of 16 bytes" in capsys.readouterr().err


def test_binary_prompt_files_are_fed_as_raw_bytes(checkpoint, tmp_path, capfdbinary):
    f = tmp_path / "bin"
    f.write_bytes(bytes([0xFF, 0x00, 0xC3, 0x28, 0x80]))  # not UTF-8
    assert gen(checkpoint, "--prompt-file", str(f), "--max-bytes", "8", "--raw") == 0
    raw = capfdbinary.readouterr().out
    from pico.model.generate import generate
    from pico.pipeline.release.load import load_model

    model, _ = load_model(str(checkpoint), "cpu")
    assert raw == generate(model, [f.read_bytes()], 8).outputs[0]  # exactly those bytes were the prompt
    assert gen(checkpoint, "--prompt-file", str(f), "--max-bytes", "4") == 0
    assert b"not valid UTF-8: fed as its raw bytes" in capfdbinary.readouterr().err


BAD = [
    (["--prompt", "a", "--max-bytes", "0"], "--max-bytes 0: must be >= 1"),
    (["--prompt", "a", "--max-bytes", "-3"], "--max-bytes -3: must be >= 1"),
    (["--prompt", "a", "--temperature", "-0.5"], "--temperature -0.5: must be a finite number >= 0"),
    (["--prompt", "a", "--temperature", "nan"], "--temperature nan"),
    (["--prompt", "a", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--prompt", "a", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--prompt", "a", "--top-p", "-1"], "--top-p -1.0: must be in (0, 1]"),
    (["--prompt", "a", "--context", "1"], "--context 1: must be >= 2"),
    (["--prompt-file", "EMPTY"], "is empty; use --prompt ''"),
    (["--prompt", "a", "--tree", "2,2,2"], "--tree 2,2,2: 3 levels need n_predict >= 4 heads; this model has n_predict=3"),
    (["--prompt", "a", "--tree", "2,x"], "--tree 2,x: give comma-separated counts >= 1"),
    (["--prompt", "a", "--tree", "0"], "--tree 0: give comma-separated counts >= 1"),
    (["--prompt", "a", "--tree", "9,8"], "--tree 9,8: draft tree of 82 nodes: at most 64"),
    (["--prompt", "a", "--tree", "auto:0"], "--tree auto:0: auto:N needs 1 <= N <= 63 nodes"),
    (["--prompt", "a", "--tree", "auto:99"], "--tree auto:99: auto:N needs 1 <= N <= 63 nodes"),
    (["--prompt", "a", "--tree", "autox"], "--tree autox: give comma-separated counts >= 1"),
    (["--prompt", "a", "--draft-confidence", "1"], "--draft-confidence 1.0: must be in [0, 1)"),
    (["--prompt-file", "MISSING"], "no such file"),
    (["--max-bytes", "4"], "--prompt"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_input_is_one_line_naming_the_flag(checkpoint, tmp_path, capsys, argv, message):
    (tmp_path / "EMPTY").write_bytes(b"")
    argv = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in argv]
    assert gen(checkpoint, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("pico generate: error:") and "\n" not in err


def test_empty_stdin_is_refused(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert gen(checkpoint, "--prompt-file", "-") == 2
    assert "--prompt-file -: stdin is empty" in capsys.readouterr().err


def test_a_draft_tree_gives_the_greedy_output_and_samples_reproducibly(checkpoint, capsys):
    assert gen(checkpoint, "--prompt", "ab", "--max-bytes", "30", "--json", "--no-speculative") == 0
    plain = json.loads(capsys.readouterr().out)
    assert gen(checkpoint, "--prompt", "ab", "--max-bytes", "30", "--json", "--tree", "3,2") == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["outputs"] == plain["outputs"] and tree["tree_nodes"] == 1 + 3 + 6
    assert gen(checkpoint, "--prompt", "ab", "--max-bytes", "30", "--json", "--draft-confidence", "0.5") == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == plain["outputs"]
    sampled = ["--prompt", "ab", "--max-bytes", "30", "--json", "--tree", "3,2", "--temperature", "0.8", "--seed", "3"]
    assert gen(checkpoint, *sampled) == 0
    first = json.loads(capsys.readouterr().out)
    assert gen(checkpoint, *sampled) == 0
    again = json.loads(capsys.readouterr().out)
    assert first["outputs"] == again["outputs"] and first["n_bytes"] > 0 and first["tree_nodes"] == 10


def test_tree_auto_measures_and_chooses_and_stays_exact(checkpoint, capsys):
    """--tree auto calibrates on the model's own continuation and says what it chose; greedy output is
    still plain greedy's."""
    assert gen(checkpoint, "--prompt", "ab", "--max-bytes", "40", "--json", "--no-speculative") == 0
    plain = json.loads(capsys.readouterr().out)
    assert gen(checkpoint, "--prompt", "ab", "--max-bytes", "40", "--json", "--tree", "auto:12") == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["outputs"] == plain["outputs"] and "--tree auto:12: " in cap.err and "chosen in" in cap.err
    auto = out["tree_auto"]
    assert len(auto["acceptance"]) == 2 and all(0.0 <= a <= 1.0 for row in auto["acceptance"] for a in row)
    assert [c["nodes"] for c in auto["candidates"]][0] == 2 and max(c["nodes"] for c in auto["candidates"]) <= 12
    assert out["tree_nodes"] in [0] + [c["nodes"] + 1 for c in auto["candidates"]]


def test_cli_errors_teach(checkpoint, tmp_path, capsys):
    assert cli_main(["generate", "--model", str(tmp_path), "--prompt", "x", "--max-bytes", "4"]) == 2
    assert "neither a release" in capsys.readouterr().err


def test_generate_streams_and_ctrl_c_keeps_what_was_printed(checkpoint):
    """A real `pico generate` process: bytes reach stdout while it runs; SIGINT ends it with exit 130, one
    stderr line, and the printed bytes are exactly the start of the same greedy generation."""
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    argv = [sys.executable, "-m", "pico.pipeline.cli", "generate", "--model", str(checkpoint), "--prompt", "a",
            "--raw", "--no-speculative", "--max-bytes"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*argv, "1000000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    got, deadline = b"", time.monotonic() + 120
    while len(got) < 64 and time.monotonic() < deadline:  # stop_at_eos may end it early: then stdout closes
        if select.select([proc.stdout], [], [], 1.0)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            got += chunk
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    printed = got + rest
    assert len(got) > 0, "nothing was streamed while generating"
    if still_running:
        assert proc.returncode == 130 and err.decode().strip().splitlines() == ["pico: interrupted"]
    full = subprocess.run([*argv, str(len(printed))], capture_output=True, env=env, timeout=120)
    assert full.returncode == 0 and full.stdout == printed
