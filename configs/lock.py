"""One writer per directory: an exclusive lock for `pico train`'s run directory and `pico prep`'s output.

Two trainers on one run directory both wrote `.tmp-step_N`, interleaved `metrics.jsonl` and
opened one W&B run id twice, with exit 0 (issue 28). `hold(directory)` takes `fcntl.flock` on
`directory/.pico.lock` and records the holder (command, pid, host, start time) in it, so a second
process gets a one-line error naming the holder.

Decisions:
- flock, not a pid file: the kernel releases it when the holder dies (kill -9 included), so a
  stale lock is taken over by the next process with no guessing about whether a pid still
  lives. A clean exit removes the file while still holding the lock; a process that locked a
  file since removed (it opened it just before) sees that the path no longer names its inode
  and locks afresh, so two processes never hold two inodes.
- Under torchrun only global rank 0 takes it (the caller decides): the ranks of one job are one
  writer, and checkpoints already require every rank to see the same run directory, so rank 0
  of a second job, on any node, meets the same lock file.
- Across nodes the lock is as good as the shared filesystem's flock: NFSv4 and GPFS carry it;
  Lustre mounted without `-o flock` refuses it (ENOSYS). There pico warns once on stderr and
  runs unlocked rather than refusing to train at all.
- An s3:// output has no lock primitive and is not locked (two prep jobs with the same options
  write the same bytes; with other options the second is refused by the plan check).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from pico.configs.errors import UserError

LOCK_FILE = ".pico.lock"
_UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)


@contextlib.contextmanager
def hold(directory: str | os.PathLike, command: str) -> Iterator[Path | None]:
    """Hold the lock of `directory` (created if missing) for the block; UserError naming the holder
    if another process has it. Yields the lock file, or None where the filesystem cannot lock."""
    path = Path(directory) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, command)
    if fd is None:
        yield None
        return
    try:
        holder = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: see the module doc
        os.close(fd)  # releases the lock


def _open_locked(path: Path, command: str) -> int | None:
    """A descriptor of `path`, locked, whose inode `path` still names; None where flock is unsupported."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _lock(fd, path, command):
                os.close(fd)
                return None
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:  # removed by the holder as it finished: lock the next one
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _lock(fd: int, path: Path, command: str) -> bool:
    """True once locked; False where the filesystem has no flock; UserError while another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        raise UserError(f"{path.parent} is in use by {_holder(fd)}; one {command} writes a directory at a "
                        "time (two would interleave checkpoints, shards and logs). Wait for it to finish or "
                        "stop it, or choose another directory") from None
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        print(f"pico: warning: cannot lock {path} ({os.strerror(e.errno)}: this filesystem has no flock); "
              f"nothing stops a second {command} from writing {path.parent} at the same time", file=sys.stderr)
        return False


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the file."""
    try:
        h = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"{h['command']} (pid {h['pid']} on {h['host']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded who it is)"
