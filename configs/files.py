"""File helpers shared by checkpoints and releases: fsync, sha256, SHA256SUMS, small untrusted text files.

Without torch, like the rest of `pico.configs`. A SHA256SUMS file (`sha256sum -c` reads it) lists
`<sha256>  <relative path>` per line; one a user hands pico is read as untrusted: a regular file of
bounded size, every path inside the folder it describes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

from pico.configs.errors import UserError

SUMS = "SHA256SUMS"


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename into it), to disk; best effort: a filesystem
    without fsync is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def small_text(f: Path, limit: int, fix: str) -> str:
    """The text of a small file, refused unless it is a regular file (not a link to /dev/zero, not a FIFO) of
    at most `limit` bytes; `fix` says what to do about a refusal."""
    if f.is_symlink() or not f.is_file() or f.stat().st_size > limit:
        raise UserError(f"{f} is not a regular file of at most {limit:,} bytes; {fix}")
    try:
        return f.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{f} cannot be read ({str(e)[:200]}); {fix}") from None


def read_sums(f: Path, limit: int, fix: str, nested: bool = False) -> dict[str, str]:
    """{relative path: sha256} from a SHA256SUMS file: a line that is not `<64 hex>  <path>`, or whose path
    leaves the folder (absolute, `..`; any `/` unless `nested`) or starts with a dot, is a UserError."""
    sums: dict[str, str] = {}
    for i, line in enumerate(small_text(f, limit, fix).splitlines(), 1):
        digest, _, name = line.partition("  ")
        parts = PurePosixPath(name).parts
        bad = (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name
               or name.startswith(("/", ".")) or ".." in parts or (not nested and len(parts) != 1))
        if bad:
            raise UserError(f"{f}:{i}: malformed line {line[:200]!r} (expected '<sha256>  <file name>'); {fix}")
        sums[name] = digest
    return sums
