"""Finding input files and reading documents out of them, one at a time.

`expand_inputs` turns --input arguments (paths, directories, globs, fsspec URLs) into a sorted
list of files, each with a portable name: its path from the folder that holds its input
(`novels/emma.txt` for an input `/data/corpus/novels`, `code.jsonl` for `/data/corpus/code.jsonl`),
the same wherever the corpus sits, locally or in a bucket. A document is known by that name (and
its line): its identity, so its train/val split and sample key, and the source its shards record. `iter_documents` streams one file and yields a `Doc` for every document and a
`Skip` for every empty or unreadable one, so that the caller can count both. Nothing here holds
more than one document (or one chunk of a large one) in memory; Parquet files are read one
record batch of one row group at a time.

Hugging Face dataset layouts (`data/{split}-00000-of-00042.parquet`, `.jsonl.gz`, ...) declare
each file's split in its name: `declared_split` reads it, so that a dataset's own validation
split becomes pico's val split (see `data_prep/job.py`) and its test split is left out of a
directory or glob (name a test file explicitly to prepare it).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import zstandard

from pico.configs.files import CREDENTIALS

BLOCK = 1 << 20
COMPRESSED = (".gz", ".zst", ".zstd", ".xz", ".bz2")
JSONL = (".jsonl", ".ndjson")
PARQUET = (".parquet", ".pq")
# When --text-field is left at "text" and a record has no such field, "content" (The Stack,
# code datasets) is read instead.
FALLBACK_TEXT_FIELDS = {"text": ("text", "content")}
# Hugging Face shard names: {split}-{index:05d}-of-{count:05d}.{ext}, split names as `datasets` writes them.
_HF_SHARD = re.compile(r"^(?P<split>[A-Za-z_]+)-\d{5}-of-\d{5}\.")
_HF_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}
# What a broken compressed stream or a failing read raises, across gzip, xz, bz2 and zstd.
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
# Decompression bombs (issue 28): a compressed input may expand to at most max_expansion times
# its stored size, and never less than this floor (tiny files compress oddly well), and one JSON
# Lines record may be at most MAX_LINE_BYTES; over either, the file or line is a recorded skip.
MAX_EXPANSION = 1000.0  # prep.max_expansion's default: text compresses 3-10x, a highly repetitive log 100x+
EXPANSION_FLOOR = 64 << 20
MAX_LINE_BYTES = 256 << 20
_PREP_SHARD = re.compile(r"/(train|val)-\d{6}\.tar$")  # a shard of a pico prep output, by its key
MAX_ID_CHARS = 1024  # a document id (--id-field) longer than this is recorded as its sha256
# zstd's largest expansion per input byte (an RLE block: 4 bytes -> 128 KiB); ZstdReader feeds its
# decompressor slices small enough that one call cannot produce more than SLICE * ZSTD_MAX_RATIO.
ZSTD_MAX_RATIO, ZSTD_SLICE = 1 << 15, 1024
# What portable_text rewrites besides a URL's user:password@ (configs.files.CREDENTIALS): an absolute local
# path (one that starts a word, so not a URL's /bucket/key nor a name's sub/folder), up to a space, quote,
# bracket or separator.
_ABSOLUTE = re.compile(r"(?<![\w:/.~-])/[^\s'\"();,/][^\s'\"();,]*")


@dataclass(frozen=True)
class InputFile:
    """One input file: an absolute local path or an fsspec URL, its size as stored, and its portable name
    (`expand_inputs`; empty: the url stands for it)."""

    url: str
    size: int
    name: str = ""


@dataclass
class Doc:
    """A readable, non-empty document. `chunks()` yields its bytes in pieces of at most chunk_bytes; `source`
    is its file's portable name (`InputFile.name`)."""

    source: str
    id: str
    line: int | None
    size: int
    n_chunks: int
    chunks: Callable[[], Iterator[bytes]]
    held: int = 0
    """Bytes it holds in memory until written (a whole file read again chunk by chunk: 0)."""

    @property
    def identity(self) -> bytes:
        """16 bytes naming the document (its file's portable name and its line), independent of its content
        and of where the corpus sits."""
        locator = "" if self.line is None else str(self.line)
        return hashlib.blake2b(f"{self.source}\n{locator}".encode("utf-8", "surrogateescape"), digest_size=16).digest()


@dataclass
class Skip:
    """A document that is not written: kind is "empty", "failed" or "excluded" (an input left out on purpose)."""

    kind: str
    source: str
    line: int | None
    reason: str

    def record(self) -> dict:
        return {"source": self.source, "line": self.line, "reason": self.reason[:500]}

    def message(self) -> str:
        unit = "row" if self.source.lower().endswith(PARQUET) else "line"
        where = self.source if self.line is None else f"{self.source} {unit} {self.line}"
        return f"{where}: {self.reason}"


# ---------------------------------------------------------------------------------------------
# Listing


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def expand_inputs(patterns: list[str], exclude: str | None = None) -> tuple[list[InputFile], list[Skip]]:
    """Every file named by `patterns`, sorted within each pattern, first occurrence kept.

    A pattern that matches nothing (or a bucket that cannot be listed) becomes a Skip naming it.
    `exclude` is a local directory to leave out (the job's own output inside an input tree); the
    output of any other pico prep job (a directory with its manifest.json or _work/plan.json) is
    left out too, as a Skip of kind "excluded": its shards are not documents.
    """
    files: list[InputFile] = []
    problems: list[Skip] = []
    seen: set[str] = set()
    names: set[str] = set()
    for i, pattern in enumerate(patterns):
        outputs: list[str] = []
        skips: list[Skip] = []  # broken links, links to a directory already read, the output itself
        try:
            found = _expand_url(pattern, outputs) if is_url(pattern) else _expand_local(pattern, exclude, outputs, skips)
        except Exception as e:  # listing a remote store can fail in many ways; all of them are the input's
            problems.append(Skip("failed", pattern, None, f"cannot list input: {type(e).__name__}: {e}"))
            continue
        problems.extend(Skip("excluded", d, None, "left out: it holds the output of a pico prep job "
                             "(its shards are not documents)") for d in outputs)
        problems.extend(skips)
        if not found and not skips:
            problems.append(Skip("failed", pattern, None, "no file matched this input"))
        if len(found) > 1 or (found and found[0].url.rstrip("/") != _plain(pattern)):
            tests = [f for f in found if declared_split(f.url) == "test"]
            problems.extend(Skip("excluded", f.url, None, "left out: a Hugging Face test split (name the file "
                                 "itself as an --input to prepare it)") for f in tests)
            found = [f for f in found if declared_split(f.url) != "test"]
        base = _name_base(pattern)
        for f in found:
            if f.url not in seen:
                seen.add(f.url)
                name = _relative(f.url, base)
                if name in names:  # two inputs with a file of the same name: the later one says which input
                    name = f"{name}@{i}"
                names.add(name)
                files.append(InputFile(f.url, f.size, name))
    return files, problems


def _name_base(pattern: str) -> str:
    """The folder a pattern's files are named from: the one holding the input (a file, a folder, or a glob's
    deepest literal folder), so an input `/data/corpus/novels` names its files `novels/...`."""
    if is_url(pattern):
        scheme, path = pattern.split("://", 1)
        head = path.rstrip("/")
    else:
        scheme, head = "", os.path.abspath(os.path.expanduser(pattern.removeprefix("file://"))).rstrip("/")
    if glob.has_magic(head):
        parts = head.split("/")
        head = "/".join(parts[:next(j for j, p in enumerate(parts) if glob.has_magic(p))])
    base = head.rsplit("/", 1)[0] if "/" in head else ""
    return f"{scheme}://{base}" if scheme else base


def portable_input(pattern: str) -> str:
    """An --input as a shared artefact (the manifest) records it: a URL without credentials, a local path
    from the folder that holds it (`novels` for `/data/corpus/novels`, the prefix its files' names drop)."""
    if is_url(pattern):
        return CREDENTIALS.sub(r"\1", pattern)
    return _relative(_plain(pattern), _name_base(pattern))


def files_digest(files: list[InputFile]) -> str:
    """sha256 of the input files' portable names and sizes: the corpus a job read, wherever it sits."""
    return hashlib.sha256(json.dumps([[f.name or f.url, f.size] for f in files]).encode()).hexdigest()


def portable_text(text: str, patterns: list[str]) -> str:
    """`text` (a skip's reason, an input's problem) naming no local path: each absolute path in it from the
    folder holding its input (as `InputFile.name`), any other one as `.../name`, a URL without credentials."""
    bases = sorted({_name_base(p) for p in patterns if not is_url(p)} - {""}, key=len, reverse=True)

    def name(m: re.Match) -> str:
        path = m.group(0)
        base = next((b for b in bases if path.startswith(b + "/")), None)
        return path[len(base) + 1:] if base else ".../" + os.path.basename(path.rstrip("/"))
    return _ABSOLUTE.sub(name, CREDENTIALS.sub(r"\1", text))


def _relative(url: str, base: str) -> str:
    """`url` from `base` (both spelled alike: local paths, or URLs of one scheme); the url itself if not under it."""
    if is_url(url) and is_url(base):
        url, base = url.split("://", 1)[1], base.split("://", 1)[1]
    base = base.rstrip("/")
    return url[len(base) + 1:] if base and url.startswith(base + "/") else url.lstrip("/")


def _plain(pattern: str) -> str:
    """A pattern as its files' urls spell it (local paths absolute), to tell a named file from a listing."""
    if is_url(pattern):
        return pattern.rstrip("/")
    return os.path.abspath(os.path.expanduser(pattern.removeprefix("file://")))


def declared_split(url: str) -> str | None:
    """"train", "val" or "test" for a file named as a Hugging Face dataset shard, else None."""
    m = _HF_SHARD.match(url.rstrip("/").rsplit("/", 1)[-1])
    return _HF_SPLITS.get(m.group("split").lower()) if m else None


def is_prep_output(d: str) -> bool:
    """Whether local directory d holds a finished or unfinished pico prep output."""
    if os.path.isfile(os.path.join(d, "_work", "plan.json")):
        return True
    try:
        with open(os.path.join(d, "manifest.json"), "rb") as f:
            m = json.loads(f.read(1 << 26))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "shards" in m and "config" in m


def _expand_local(pattern: str, exclude: str | None, outputs: list[str], skips: list[Skip]) -> list[InputFile]:
    """Files under `pattern`; directories that hold a prep output are appended to `outputs` instead,
    and what cannot be read (a broken link, a link loop, the job's own output) to `skips`."""
    pattern = os.path.abspath(os.path.expanduser(pattern.removeprefix("file://")))
    if exclude and _within(pattern, exclude):
        skips.append(Skip("failed", pattern, None, f"this input is the output directory {exclude} (or inside it), "
                                                   "whose shards are not documents; choose an --output elsewhere"))
        return []
    roots = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    out: list[str] = []
    for root in roots:
        if exclude and _within(root, exclude):
            continue  # a glob that matches the output (walks below prune it too)
        if os.path.isdir(root):
            out.extend(_walk(root, exclude, outputs, skips))
        elif os.path.isfile(root):
            out.append(root)
        elif os.path.islink(root):
            skips.append(_broken_link(root))
    files = []
    for p in sorted(out):  # in path order, as an object store lists the same tree (x/a/c.txt before x/b.txt)
        try:
            files.append(InputFile(p, os.path.getsize(p)))
        except OSError as e:  # gone or unreadable since it was listed: that file's problem, not the job's
            skips.append(Skip("failed", p, None, f"cannot read: {e.strerror}"))
    return files


def _walk(root: str, exclude: str | None, outputs: list[str], skips: list[Skip]) -> Iterator[str]:
    """Files under `root` in sorted order, dotfiles left out, following links to directories.

    A directory reached a second time (a link loop, or a second link to it) is walked once: the
    later path is a Skip naming the first, so no document is read twice and a loop ends."""
    walked: dict[tuple[int, int], str] = {}  # (device, inode) of each directory walked -> its path
    for d, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(d)
        first = walked.setdefault((st.st_dev, st.st_ino), d)
        if first != d:
            skips.append(Skip("excluded", d, None, f"left out: a link to {first}, which is already read "
                                                   "(a symbolic link loop, or a second link to it)"))
            dirs[:] = []
            continue
        if d != exclude and is_prep_output(d):
            outputs.append(d)
            dirs[:] = []
            continue
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and not (exclude and _within(os.path.join(d, x), exclude)))
        for n in sorted(names):
            p = os.path.join(d, n)
            if n.startswith("."):
                continue
            if os.path.exists(p):
                yield p
            else:
                skips.append(_broken_link(p))


def _within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or inside it, links resolved (a link into the output is the output)."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _broken_link(p: str) -> Skip:
    try:
        target = os.readlink(p)
    except OSError:
        target = "?"
    return Skip("failed", p, None, f"broken symbolic link (to {target}); fix or remove it")


def _expand_url(pattern: str, outputs: list[str]) -> list[InputFile]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(pattern)
    fs.invalidate_cache()
    try:
        if glob.has_magic(path):
            found = fs.glob(path, detail=True)
        else:
            info = fs.info(path)  # raises FileNotFoundError / PermissionError for a missing key or bucket
            found = fs.find(path, detail=True) if info["type"] == "directory" else {path: info}
    except FileNotFoundError:
        found = {}
    if not found:  # say whether the bucket itself is missing or unreachable, the likelier mistake
        top = path.split("/", 1)[0]
        try:
            fs.info(top)
        except Exception as e:
            raise OSError(f"bucket {top!r} does not exist or cannot be reached ({type(e).__name__}: {e})") from None
    keys: dict[str, int] = {}  # every file below the input, but under a hidden name (.cache/...)
    parts = path.rstrip("/").split("/")
    base = "/".join(parts[:next((j for j, x in enumerate(parts) if glob.has_magic(x)), len(parts))])
    for p, info in found.items():
        listed = fs.find(p, detail=True).items() if info.get("type") == "directory" else [(p, info)]
        for q, sub in listed:
            below = q[len(base) + 1:] if q.startswith(base + "/") else q.rsplit("/", 1)[-1]
            if not any(part.startswith(".") for part in below.split("/")):
                keys[q] = int(sub.get("size") or 0)
    # a pico prep output inside the input (its shards are not documents), as a local walk leaves it out
    done = {k.rsplit("/", 1)[0] for k in keys if _PREP_SHARD.search(k)} & {k.rsplit("/", 1)[0] for k in keys if
                                                                           k.endswith("/manifest.json")}
    unfinished = {k[:-len("/_work/plan.json")] for k in keys if k.endswith("/_work/plan.json")}
    for d in sorted(done | unfinished):
        outputs.append(fs.unstrip_protocol(d))
    return [InputFile(fs.unstrip_protocol(k), size) for k, size in sorted(keys.items())  # key order, as S3 lists
            if not any(k.startswith(d + "/") for d in done | unfinished)]


# ---------------------------------------------------------------------------------------------
# Opening, with decompression chosen by suffix


def split_suffix(url: str) -> tuple[str, str]:
    """("name.jsonl", ".gz") for name.jsonl.gz; the compression suffix is "" for plain files."""
    lower = url.lower()
    for suf in COMPRESSED:
        if lower.endswith(suf):
            return url[: -len(suf)], suf
    return url, ""


def open_raw(url: str) -> io.BufferedIOBase:
    if is_url(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return fs.open(path, "rb", block_size=8 * BLOCK)
    return open(url.removeprefix("file://"), "rb", buffering=BLOCK)


def open_input(url: str, limit: int | None = None) -> io.BufferedIOBase:
    """A binary stream of the file's decompressed bytes; past `limit` of them, reads raise ExpansionLimit."""
    suffix = split_suffix(url)[1].lower()
    if suffix in (".gz", ".xz", ".bz2"):
        # given a file name (not a file object) these close the file when they are closed
        src = open_raw(url) if is_url(url) else url.removeprefix("file://")
        stream = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}[suffix](src, "rb")
    elif suffix in (".zst", ".zstd"):
        stream = ZstdReader(open_raw(url))  # JSON Lines wrap it in a BufferedReader for readline
    else:
        return open_raw(url)
    return stream if limit is None else CappedReader(stream, limit)


def expansion_limit(f: InputFile, max_expansion: float) -> int | None:
    """How many decompressed bytes a compressed input may yield (None for a plain file)."""
    if not split_suffix(f.url)[1]:
        return None
    return max(int(max_expansion * f.size), EXPANSION_FLOOR)


class ExpansionLimit(OSError):
    """A compressed input decompressed past its limit: a decompression bomb, or an outlier."""


class CappedReader(io.RawIOBase):
    """Reads through a decompressing stream, counting; raises ExpansionLimit past `limit` bytes.

    Every read is bounded (a read of everything goes block by block), so memory stays bounded
    too: gzip, xz and bz2 never return more than asked, and ZstdReader decompresses in slices."""

    def __init__(self, stream: io.IOBase, limit: int):
        self.stream, self.limit, self.n = stream, limit, 0

    def readable(self) -> bool:
        return True

    def _count(self, data: bytes) -> bytes:
        self.n += len(data)
        if self.n > self.limit:
            raise ExpansionLimit(f"decompresses to more than {self.limit:,} bytes, the limit for this file "
                                 "(--max-expansion times its stored size, at least 64M): a decompression bomb? "
                                 "If the file is genuine, raise --max-expansion")
        return data

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(BLOCK), b""))
        return self._count(self.stream.read(n))

    def read1(self, n: int = -1) -> bytes:
        return self._count(getattr(self.stream, "read1", self.stream.read)(BLOCK if n < 0 else n))

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()
        super().close()


class ZstdReader(io.RawIOBase):
    """Streams the frames of a zstd file one after another and raises on a truncated frame.

    zstandard's own stream_reader returns a short read at a cut-off frame without an error; a
    pretraining corpus must not lose the tail of a document silently.
    """

    def __init__(self, raw: io.BufferedIOBase, block: int = 1 << 16):
        self._raw, self._block = raw, block
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # the decompressor of the frame in progress, None between frames
        self._buf, self._pos, self._done = b"", 0, False
        self._pending = b""  # input read but not yet decompressed (a block whose output filled the buffer)

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Decompress the next input block into the buffer; False at the clean end of the stream."""
        while self._pos >= len(self._buf):
            data, self._pending = self._pending, b""
            if not data:
                if self._done:
                    return False
                data = self._raw.read(self._block)
            if not data:
                self._done = True
                if self._frame is not None:
                    raise EOFError("zstd stream ended inside a frame (the file is truncated)")
                return False
            self._buf, self._pos = self._feed(data), 0
        return True

    def readinto(self, b) -> int:
        if not self._fill():
            return 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = memoryview(self._buf)[self._pos:self._pos + n]
        self._pos += n
        return n

    def read1(self, n: int = -1) -> bytes:
        """Up to n bytes from what one input block decoded to."""
        if not self._fill():
            return b""
        end = len(self._buf) if n < 0 else min(len(self._buf), self._pos + n)
        out = self._buf[self._pos:end] if (self._pos, end) != (0, len(self._buf)) else self._buf
        self._pos = end
        return out

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all with n < 0), joined once; faster than readinto for whole documents."""
        parts, got = [], 0
        while (n < 0 or got < n) and self._fill():
            take = len(self._buf) - self._pos if n < 0 else min(n - got, len(self._buf) - self._pos)
            whole = self._pos == 0 and take == len(self._buf)
            parts.append(self._buf if whole else self._buf[self._pos:self._pos + take])
            self._pos += take
            got += take
        return b"".join(parts)

    def _feed(self, data: bytes) -> bytes:
        """What one input block decompresses to, at most 64 MiB: a 64 KiB block of a zstd bomb would
        decompress to 2 GiB in one call, so it is fed in slices of which one makes at most 32 MiB,
        and the rest waits once 32 MiB are out (on text this costs ~5% of decompression speed)."""
        out, n = [], 0
        for i in range(0, len(data), ZSTD_SLICE):
            out.append(self._feed_slice(data[i:i + ZSTD_SLICE]))
            n += len(out[-1])
            if n >= ZSTD_SLICE * ZSTD_MAX_RATIO and i + ZSTD_SLICE < len(data):
                self._pending = data[i + ZSTD_SLICE:]  # decoded once the reader has taken what is out
                break
        return b"".join(out)

    def _feed_slice(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            if self._frame.eof:
                data, self._frame = self._frame.unused_data, None
            else:
                data = b""
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def read_upto(stream: io.BufferedIOBase, n: int) -> bytes:
    """Exactly n bytes, or fewer at the end of the stream."""
    parts, got = [], 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Documents


def file_format(url: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    stem = split_suffix(url)[0].lower()
    if url.lower().endswith(PARQUET):
        return "parquet"
    return "jsonl" if stem.endswith(JSONL) else "raw"


def iter_documents(f: InputFile, fmt: str, text_field: str, id_field: str, chunk_bytes: int,
                   max_expansion: float = MAX_EXPANSION) -> Iterator[Doc | Skip]:
    """Every document of one input file, in file order (a whole file is one document unless JSON Lines or Parquet).

    A compressed file stops yielding once it has decompressed past `expansion_limit`: the rest is a recorded skip."""
    kind = file_format(f.url, fmt)
    limit = expansion_limit(f, max_expansion)
    if kind == "jsonl":
        return _iter_jsonl(f.url, text_field, id_field, chunk_bytes, limit, f.name)
    if kind == "parquet":  # compressed inside: its row groups declare their decompressed sizes
        return _iter_parquet(f.url, text_field, id_field, chunk_bytes,
                             max(int(max_expansion * f.size), EXPANSION_FLOOR), f.name)
    return _iter_whole_file(f, chunk_bytes, limit)


def _describe(e: BaseException, url: str) -> str:
    if isinstance(e, ExpansionLimit):
        return str(e)
    kind = {".gz": "gzip", ".xz": "xz", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}.get(split_suffix(url)[1].lower())
    what = f"corrupt or truncated {kind} data" if kind and not isinstance(e, FileNotFoundError) else "cannot read"
    return f"{what}: {type(e).__name__}: {e}"


def _in_memory(data: bytes, chunk_bytes: int) -> tuple[int, Callable[[], Iterator[bytes]]]:
    n = max(1, -(-len(data) // chunk_bytes))
    return n, lambda: (data[i * chunk_bytes:(i + 1) * chunk_bytes] for i in range(n))


def _small_zstd(url: str, size: int, chunk_bytes: int) -> bytes | None:
    """The document of a one-frame .zst file that records a content size <= chunk_bytes, in one call.

    About twice as fast as streaming for the common small file; None sends every other case
    (several frames, no recorded size, bad data) down the streaming path, which names errors.
    """
    if size > chunk_bytes or not split_suffix(url)[1].lower().startswith(".zst"):
        return None
    with open_raw(url) as f:
        data = f.read()
    try:
        n = zstandard.frame_content_size(data)
        if 0 <= n <= chunk_bytes:
            return zstandard.ZstdDecompressor().decompress(data, allow_extra_data=False)
    except zstandard.ZstdError:
        pass
    return None


def _read_head(f: InputFile, chunk_bytes: int, limit: int | None) -> bytes:
    """The document if it fits in chunk_bytes, else its first chunk_bytes + 1 bytes."""
    head = _small_zstd(f.url, f.size, chunk_bytes)
    if head is None:
        with open_input(f.url, limit) as stream:
            head = read_upto(stream, chunk_bytes + 1)
    return head


def _iter_whole_file(f: InputFile, chunk_bytes: int, limit: int | None) -> Iterator[Doc | Skip]:
    try:
        head = _read_head(f, chunk_bytes, limit)
        # A large document: learn its size first (a compressed one by decompressing it once
        # without keeping it, which also finds corruption before any chunk is written).
        size = len(head) if len(head) <= chunk_bytes else f.size if not split_suffix(f.url)[1] else _count_bytes(f.url, limit)
    except READ_ERRORS as e:
        yield Skip("failed", f.url, None, _describe(e, f.url))
        return
    if not head:
        yield Skip("empty", f.url, None, "empty document")
    elif len(head) <= chunk_bytes:
        n, chunks = _in_memory(head, chunk_bytes)
        yield Doc(f.name or f.url, f.name or f.url, None, size, n, chunks, held=len(head))
    else:
        del head

        def chunks() -> Iterator[bytes]:
            with open_input(f.url, limit) as s:
                while chunk := read_upto(s, chunk_bytes):
                    yield chunk

        yield Doc(f.name or f.url, f.name or f.url, None, size, -(-size // chunk_bytes), chunks)


def _count_bytes(url: str, limit: int | None) -> int:
    with open_input(url, limit) as s:
        n = 0
        while part := s.read(BLOCK):
            n += len(part)
        return n


def _iter_jsonl(url: str, text_field: str, id_field: str, chunk_bytes: int, limit: int | None,
                name: str = "") -> Iterator[Doc | Skip]:
    line_no, stream = 0, None
    try:
        stream = open_input(url, limit)
        for line in iter_lines(stream):
            line_no += 1
            if line is None:
                yield Skip("failed", url, line_no, f"line longer than {MAX_LINE_BYTES >> 20} MiB, pico's limit on "
                                                   "one JSON record; split the document into several records")
            elif line.strip():
                yield _parse_line(url, line_no, line, text_field, id_field, chunk_bytes, name)
    except READ_ERRORS as e:
        yield Skip("failed", url, line_no + 1, _describe(e, url))
    finally:
        if stream is not None:
            stream.close()


def iter_lines(stream: io.IOBase, block: int = BLOCK, max_line: int = MAX_LINE_BYTES) -> Iterator[bytes | None]:
    """The lines of a binary stream, without their newline, split a block at a time.

    Three to four times faster than readline on a decompressing stream; memory is one block
    plus the longest line, at most `max_line`: a longer line is not kept, and None stands in its place.
    """
    read = getattr(stream, "read1", stream.read)
    pending: list[bytes] = []  # pieces of a line that spans blocks
    held = 0  # length of the line in progress, whether its pieces are kept or not
    while data := read(block):
        lines = data.split(b"\n")
        held += len(lines[0])
        if len(lines) == 1:
            pending = pending + [data] if held <= max_line else []
            continue
        if held > max_line:
            lines[0] = None
        elif pending:
            pending.append(lines[0])
            lines[0] = b"".join(pending)
        tail = lines.pop()
        pending, held = ([tail] if tail else []), len(tail)
        yield from lines
    if held > max_line:
        yield None
    elif pending:
        yield b"".join(pending)


def _parse_line(url: str, line_no: int, line: bytes, text_field: str, id_field: str, chunk_bytes: int,
                name: str = "") -> Doc | Skip:
    try:
        obj = json.loads(line)
    except ValueError as e:
        return Skip("failed", url, line_no, f"invalid JSON: {str(e)[:200]}")
    except RecursionError:
        return Skip("failed", url, line_no, "JSON nested too deeply to read")
    if not isinstance(obj, dict):
        return Skip("failed", url, line_no, f"expected a JSON object, got {type(obj).__name__}")
    text_field = next((k for k in FALLBACK_TEXT_FIELDS.get(text_field, ()) if k in obj), text_field)
    if text_field not in obj:
        fields = ", ".join(sorted(map(str, obj))[:10]) or "none"
        return Skip("failed", url, line_no, f"missing text field {text_field!r} (fields: {fields}); "
                                            "choose the field with --text-field")
    text = obj[text_field]
    if not isinstance(text, str):
        return Skip("failed", url, line_no, f"field {text_field!r} is a {type(text).__name__}, not a string")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        return Skip("failed", url, line_no, f"field {text_field!r} holds an unpaired surrogate: {e}")
    if not data:
        return Skip("empty", url, line_no, "empty document")
    name = name or url
    doc_id = _bounded_id(obj[id_field]) if obj.get(id_field) is not None else f"{name}#{line_no}"
    n, chunks = _in_memory(data, chunk_bytes)
    return Doc(name, doc_id, line_no, len(data), n, chunks, held=len(data))


# ---------------------------------------------------------------------------------------------
# Parquet (FineWeb, DCLM, The Stack, most Hugging Face datasets), through pyarrow

PARQUET_BATCH_ROWS = 256  # rows decoded at once: memory is one batch, not one row group


def _parquet_column(schema, wanted: str, role: str, url: str, required: bool) -> tuple[str | None, str | None]:
    """(column name, None) or (None, why it cannot be used) for the text or id column."""
    import pyarrow as pa

    names = list(schema.names)
    name = next((k for k in FALLBACK_TEXT_FIELDS.get(wanted, (wanted,)) if k in names), None) if role == "text" \
        else (wanted if wanted in names else None)
    if name is None:
        if not required:
            return None, None
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return None, f"no text column {wanted!r} (columns: {shown or 'none'}); choose one with --text-field"
    t = schema.field(name).type
    ok = pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t)
    if role == "text" and not ok:
        return None, f"text column {name!r} holds {t}, not strings; choose a string column with --text-field"
    return name, None


def _iter_parquet(url: str, text_field: str, id_field: str, chunk_bytes: int,
                  limit: int | None = None, name: str = "") -> Iterator[Doc | Skip]:
    """One Doc per row, row numbers (1-based, across row groups) as lines; a row group that fails
    to decode is one Skip naming its rows, and the next row group is read. pyarrow decompresses a
    row group's column chunks whole, so a row group whose read columns declare more than `limit`
    decompressed bytes (the file's metadata, read before any page) is a recorded skip too; pages
    that decompress past what they declare fail in pyarrow, and are a decode skip."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        raw = open_raw(url)
    except OSError as e:
        yield Skip("failed", url, None, f"cannot read: {type(e).__name__}: {e}")
        return
    with raw:
        try:
            pf = pq.ParquetFile(raw, page_checksum_verification=True)
        except (pa.ArrowException, OSError, ValueError) as e:
            yield Skip("failed", url, None, f"not a readable Parquet file (truncated or damaged?): {type(e).__name__}: {e}; "
                                     "download or export it again")
            return
        schema = pf.schema_arrow
        text_col, why = _parquet_column(schema, text_field, "text", url, required=True)
        if why:
            yield Skip("failed", url, None, why)
            return
        id_col, _ = _parquet_column(schema, id_field, "id", url, required=False)
        columns = [text_col] + ([id_col] if id_col and id_col != text_col else [])
        row = 0
        for g in range(pf.num_row_groups):
            meta = pf.metadata.row_group(g)
            n_rows = meta.num_rows
            first = row
            declared = sum(meta.column(i).total_uncompressed_size for i in range(meta.num_columns)
                           if meta.column(i).path_in_schema in columns)
            if limit is not None and declared > limit:
                row = first + n_rows
                yield Skip("failed", url, first + 1, f"row group {g} (rows {first + 1}-{first + n_rows}) declares "
                                                     f"{declared:,} decompressed bytes, past the limit of {limit:,} "
                                                     "(prep --max-expansion x the file's size); its rows are left out")
                continue
            try:
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[g], columns=columns,
                                             use_threads=False):
                    texts = _utf8_bytes(batch.column(0))
                    ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
                    for text, doc_id in zip(texts, ids):
                        row += 1
                        yield _parquet_doc(url, row, text, doc_id, text_col, chunk_bytes, name)
            except (pa.ArrowException, OSError, ValueError) as e:
                row = first + n_rows
                yield Skip("failed", url, first + 1, f"row group {g} (rows {first + 1}-{first + n_rows}) cannot be "
                                                     f"decoded, its rows are left out: {type(e).__name__}: {e}; "
                                                     "export the file again to keep them")


def _bounded_id(value) -> str:
    """A document id as recorded in every one of its samples: at most MAX_ID_CHARS, a longer one by its sha256
    (a sample's metadata must stay within what the shard readers accept)."""
    text = str(value)
    return text if len(text) <= MAX_ID_CHARS else "sha256:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


def _utf8_bytes(arr) -> list[bytes | None]:
    """The UTF-8 bytes of a string column, without decoding to str and encoding back (Arrow strings
    are UTF-8 already: viewing them as binary is free)."""
    import pyarrow as pa

    if pa.types.is_large_string(arr.type):
        return arr.view(pa.large_binary()).to_pylist()
    if pa.types.is_string(arr.type):
        return arr.view(pa.binary()).to_pylist()
    return [None if t is None else t.encode("utf-8") for t in arr.to_pylist()]  # string_view


def _parquet_doc(url: str, row: int, data: bytes | None, doc_id, column: str, chunk_bytes: int,
                 name: str = "") -> Doc | Skip:
    if data is None:
        return Skip("empty", url, row, f"column {column!r} is null")
    if not data:
        return Skip("empty", url, row, "empty document")
    n, chunks = _in_memory(data, chunk_bytes)
    name = name or url
    return Doc(name, _bounded_id(doc_id) if doc_id is not None else f"{name}#{row}", row, len(data), n, chunks,
               held=len(data))
