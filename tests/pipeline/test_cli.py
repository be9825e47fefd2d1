"""Every `pico` subcommand answers --help and explains its options."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pico.pipeline.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"pico {name}" in out
    # every option has a help string
    assert "show this help message" in out or "-h, --help" in out


def test_unknown_command_exit_code(capsys):
    assert main(["trian"]) == 2
    assert "train" in capsys.readouterr().err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "pico.pipeline.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "quickstart" in out.stdout
