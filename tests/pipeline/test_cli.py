"""The `pico` command line: every option of every subcommand is documented in its --help, and the
installed console script runs."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pico.pipeline import cli
from pico.pipeline.cli import COMMANDS, main
from tests.conftest import REPO


def parsers(name: str):
    """([argv to its --help], parser) for a subcommand and each of its sub-verbs."""
    module = importlib.import_module(COMMANDS[name][0])
    root = module.build_parser() if hasattr(module, "build_parser") else cli.build_parser(name)[0]
    found = [([name], root)]
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [([name, verb], sub) for verb, sub in action.choices.items()]
    if hasattr(module, "verify_parser"):  # `pico prep verify`
        found.append(([name, "verify"], module.verify_parser()))
    return found


def help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def flat(text: str) -> str:
    return " ".join(text.split())


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, desc) in COMMANDS.items():
        assert f"{name}  " in out and flat(desc) in flat(out)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_is_in_help_with_its_text(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping: help texts compare as written
    checked = 0
    for argv, parser in parsers(name):
        out = help_of(argv, capsys)
        assert f"pico {' '.join(argv)}" in out
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"pico {' '.join(argv)} {action.option_strings or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{where} has no help text"
            assert flat(formatter._expand_help(action)) in flat(out), f"{where}: its help text is not in --help"
            for flag in action.option_strings:
                assert flag in out, f"{where}: {flag} is not in --help"
            checked += 1
    assert checked >= 2, f"pico {name}: no options found"


def test_unknown_command_exit_code(capsys):
    assert main(["trian"]) == 2
    assert "train" in capsys.readouterr().err


def console_script() -> str:
    path = shutil.which("pico", path=str(Path(sys.executable).parent)) or shutil.which("pico")
    assert path, "the `pico` console script is not installed (pip install -e .)"
    return path


def test_console_script_runs(tmp_path):
    """The entry point of pyproject.toml, run as the installed script, from outside the repository."""
    pico = console_script()
    out = subprocess.run([pico, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "quickstart" in out.stdout and out.stderr == ""
    out = subprocess.run([pico, "info", "--config", str(REPO / "configs" / "quickstart.yaml"), "--json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["params"] > 0 and info["train_flops_per_byte"] == 3 * info["inference_flops_per_byte"]
    out = subprocess.run([pico, "info", "--config", "no-such-config"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "no-such-config" in out.stderr
