"""Prep outputs nested inside inputs, and jobs that write nothing (bad outputs: tests/test_bad_input.py)."""

from __future__ import annotations

import pytest

from pico.data_prep import prepare
from pico.pipeline.cli import main

from .conftest import read_documents

QUIET = {"progress": False}


def inputs(root, files: dict[str, bytes]):
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.ray
def test_every_input_failing_exits_non_zero(ray_local, tmp_path, capsys):
    src = inputs(tmp_path / "in", {"bad.txt.gz": b"not gzip", "bad.jsonl": b"{oops\n"})
    assert main(["prep", "--input", str(src), "--output", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "no shard was written: of 2 documents read, 2 could not be read" in capsys.readouterr().err


@pytest.mark.ray
def test_an_earlier_output_inside_an_input_directory_is_left_out(ray_local, tmp_path, capsys):
    src = inputs(tmp_path / "in", {"a.txt": b"alpha", "b.txt": b"beta"})
    prepare([str(src)], str(src / "shards"), **QUIET)
    (src / "unfinished" / "_work").mkdir(parents=True)
    (src / "unfinished" / "_work" / "plan.json").write_text("{}")
    (src / "unfinished" / "train-000000.tar").write_bytes(b"x" * 10)
    capsys.readouterr()
    m = prepare([str(src)], str(tmp_path / "again"), **QUIET)
    assert sorted(read_documents(str(tmp_path / "again")).values()) == [b"alpha", b"beta"]
    err = capsys.readouterr().err
    assert f"{src / 'shards'}: left out: it holds the output of a pico prep job" in err
    assert f"{src / 'unfinished'}: left out" in err
    assert m["documents"]["failed"] == 0
