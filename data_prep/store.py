"""The output location, local or any fsspec URL, with the few operations a job needs.

Every write becomes visible all at once: a local file is written under a unique temporary name
and renamed; a remote object is written to a local temporary file and uploaded in one PUT, so a
reader never sees half an object.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import BinaryIO, Callable

from pico.data_prep.sources import is_url


class Store:
    """A directory (local path or URL) that holds shards, the manifest and `_work/`."""

    def __init__(self, url: str):
        self.url = url
        self.remote = is_url(url)
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(url)
            self.root = self.root.rstrip("/")
        else:
            self.fs, self.root = None, os.path.abspath(os.path.expanduser(url.removeprefix("file://")))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel: str = "") -> str:
        """The user-facing name of `rel` (a URL for remote stores)."""
        return self.fs.unstrip_protocol(self.path(rel)) if self.remote else self.path(rel)

    # -- writing ---------------------------------------------------------------------------

    def open_write(self, rel: str) -> tuple[BinaryIO, Callable[[], None]]:
        """A file to write `rel` into, and the function that publishes it once it is closed."""
        if self.remote:
            fd, tmp = tempfile.mkstemp(prefix="pico-prep-", suffix=".tmp")
            f = os.fdopen(fd, "wb", buffering=1 << 20)

            def upload() -> None:
                try:
                    self.fs.put_file(tmp, self.path(rel))
                finally:
                    os.unlink(tmp)
            return f, upload
        final = self.path(rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.{uuid.uuid4().hex[:12]}.tmp"  # unique: a stale task may still be writing
        return open(tmp, "wb", buffering=1 << 20), lambda: os.replace(tmp, final)

    def write_bytes(self, rel: str, data: bytes) -> None:
        f, commit = self.open_write(rel)
        with f:
            f.write(data)
        commit()

    # -- reading ---------------------------------------------------------------------------

    def refresh(self) -> None:
        if self.remote:
            self.fs.invalidate_cache()

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel)) if self.remote else os.path.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            if self.remote:
                return self.fs.cat_file(self.path(rel))
            with open(self.path(rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def open_read(self, rel: str) -> BinaryIO:
        if self.remote:
            return self.fs.open(self.path(rel), "rb", block_size=8 << 20)
        return open(self.path(rel), "rb", buffering=1 << 20)

    def list(self, rel: str = "") -> list[str]:
        """Names of the files directly inside `rel` (empty when it does not exist)."""
        try:
            if self.remote:
                return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1]
                              for e in self.fs.ls(self.path(rel), detail=True) if e["type"] == "file")
            d = self.path(rel)
            return sorted(n for n in os.listdir(d) if os.path.isfile(os.path.join(d, n)))
        except FileNotFoundError:
            return []

    # -- moving and deleting ---------------------------------------------------------------

    def move(self, src: str, dst: str) -> None:
        if self.remote:
            self.fs.mv(self.path(src), self.path(dst))
        else:
            os.replace(self.path(src), self.path(dst))

    def remove(self, rel: str) -> None:
        try:
            if self.remote:
                self.fs.rm(self.path(rel), recursive=True)
            elif os.path.isdir(self.path(rel)):
                shutil.rmtree(self.path(rel))
            else:
                os.remove(self.path(rel))
        except FileNotFoundError:
            pass

    def check_writable(self) -> None:
        """Fail early, with the location named, when the output cannot be written."""
        probe = f"_work/.probe-{uuid.uuid4().hex[:8]}"
        self.write_bytes(probe, b"")
        self.remove(probe)
