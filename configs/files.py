"""File helpers shared by checkpoints and releases: fsync, sha256, SHA256SUMS, small untrusted text files,
and strict JSON (what `--json` prints: NaN and infinities are not JSON).

Without torch, like the rest of `pico.configs`. A SHA256SUMS file (`sha256sum -c` reads it) lists
`<sha256>  <relative path>` per line; one a user hands pico is read as untrusted: a regular file of
bounded size, every path inside the folder it describes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from pico.configs.errors import UserError

SUMS = "SHA256SUMS"
CREDENTIALS = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/@\s]*@", re.I)  # a URL's user:password@ (sub r"\1")


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


def strict_json(obj, **kwargs) -> str:
    """json.dumps with every non-finite float as null (`--json` output must parse anywhere) and anything
    else JSON lacks as its str()."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), default=str, allow_nan=False, **kwargs)


def public_paths(paths: Any) -> Any:
    """Data paths as a shared artefact (a release, a W&B run) may show them: a URL without its user:password@,
    query or fragment (a signed URL's key), a relative path as it is, an absolute or home-relative local
    path as its last component (the machine's layout is nobody's business). Lists, and dicts' values, too."""
    if paths is None:
        return None
    if isinstance(paths, (list, tuple)):
        return [public_paths(p) for p in paths]
    if isinstance(paths, dict):
        return {k: public_paths(v) for k, v in paths.items()}
    if not isinstance(paths, str):
        return paths
    p = paths.removeprefix("file://")
    if "://" in p:
        return CREDENTIALS.sub(r"\1", p).split("?", 1)[0].split("#", 1)[0]
    if not (p.startswith(("/", "~")) or (len(p) > 1 and p[1] == ":")):
        return p
    return Path(p.rstrip("/\\")).name or p
