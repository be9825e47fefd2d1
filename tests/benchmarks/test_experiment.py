"""benchmarks/experiment.py, retired into `pico experiment`: its old command lines map onto the design files,
and the recorded experiment 3 reads back through it (pipeline/experiment's own tests cover the arithmetic)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("old_driver", REPO / "benchmarks" / "experiment.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)


def test_old_command_lines_map_onto_design_files():
    design = str(REPO / "configs" / "experiments" / "experiment3.yaml")
    assert old.translate(["--design", "experiment3"]) == ["run", design, "--jobs", "2"]
    assert old.translate(["--table", "--design", "experiment3", "--out", "x"]) == ["table", design, "--out", "x"]
    assert old.translate(["--status", "--design", "experiment3"]) == ["status", design]
    assert Path(design).is_file()


def test_the_recorded_experiment_3_tabulates_through_the_old_entry_point(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert old.main(["--table", "--design", "experiment3", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "spacelike-dechunk-ri0.25" in table and "chunk-ri0.25" in table
