"""Filesystems that fail the way real ones do: read-only, and full (for the bad-input tests).

As root (CI containers, most dev boxes here) a real tmpfs is mounted, read-only or a few MiB
small; without root a read-only directory is a chmod, and a full disk is skipped.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from pathlib import Path

import pytest


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


@contextlib.contextmanager
def mounted(where: Path, options: str):
    if not _mount_tmpfs(where, options):
        pytest.skip(f"cannot mount a tmpfs ({options}) here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """An existing, empty directory that this process cannot write into."""
    d = tmp_path / "ro"
    if os.geteuid() != 0:
        d.mkdir()
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield d
        d.chmod(stat.S_IRWXU)
        return
    with mounted(d, "ro,size=1m") as m:
        yield m


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a tmpfs of `size` bytes (the default 4 MiB); yields a function that mounts it."""
    stack = contextlib.ExitStack()

    def make(size: int = 4 << 20) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a small filesystem needs root to mount")
        return stack.enter_context(mounted(tmp_path / f"small{size}", f"size={size}"))

    with stack:
        yield make
