"""One writer per directory (configs/lock.py), with two real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pico.configs.errors import UserError
from pico.configs.lock import LOCK_FILE, hold

HOLDER = ("import sys, time\nfrom pico.configs.lock import hold\n"
          "with hold(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(600)\n")


class Holder:
    """Another process that holds the lock of `directory` until it is killed (kill -9, as a crash does)."""

    def __init__(self, directory: Path, command: str = "pico train"):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), command],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> "Holder":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    with Holder(tmp_path / "run") as other:
        with pytest.raises(UserError, match=rf"run is in use by pico train \(pid {other.proc.pid} on "
                                            rf"{socket.gethostname()}, since .*\); one pico train writes"):
            with hold(tmp_path / "run", "pico train"):
                pass
        other.kill()  # its lock dies with it; the file stays, naming it
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == other.proc.pid
        with hold(tmp_path / "run", "pico train") as f:
            assert json.loads(f.read_text())["pid"] == os.getpid()
    with hold(tmp_path / "run", "pico train"):  # released on exit; taken again in the same process
        pass


def test_a_clean_exit_leaves_no_lock_file(tmp_path):
    with hold(tmp_path / "out", "pico prep"):
        assert (tmp_path / "out" / LOCK_FILE).exists()
    assert list((tmp_path / "out").iterdir()) == []
