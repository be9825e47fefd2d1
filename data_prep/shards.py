"""The shard format, in one place: the writer, the reader, sample decoding and the truncation check.

A shard is a WebDataset-layout tar file. A sample is two tar members sharing a key:
`{key}.bin.zst` (one zstd frame, content size and checksum recorded, of the raw document bytes)
and `{key}.json` (source, id, chunk, n_chunks, bytes). The key is 24 hex digits of a hash of the
document identity, plus `_c{chunk:05d}` when a large document is split. Tar headers carry no
time, owner or mode that varies, so the same samples always make the same bytes (and sha256).

    TarShardWriter      writes one split's shards, rolling over by size (prep)
    read_shard(url)     (index, Sample) of every sample of a local or remote shard (loader, quickstart)
    iter_tar_samples    the same from an open stream (verify hashes the stream as it reads)
    decode_sample       a Sample -> (document bytes, metadata), every check in one place

Readers and writer are written here on `tarfile`'s header parser and by hand, not on the
`webdataset` package: its tar iterator ends a file cut off between two members as if it were
complete, and its writer stamps times and owners, so the bytes would differ between runs.
webdataset is therefore not a runtime dependency; the tests use it (a test extra) to check that
what prep writes is a WebDataset that webdataset reads, and to write foreign shards for the loader.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import fsspec
import zstandard

from pico.data_prep.sources import read_upto

SHARD_NAME = re.compile(r"^(train|val)-(\d{6})\.tar$")
# The largest document a sample may decompress to: a shard is untrusted input, and a 100 KB
# zstd frame can expand to gigabytes. prep's --chunk-bytes is capped at it, so no sample pico
# writes exceeds it; readers refuse a larger one before allocating its bytes (issue 28).
MAX_SAMPLE_BYTES = 64 << 20
MAX_MEMBER_BYTES = MAX_SAMPLE_BYTES + (MAX_SAMPLE_BYTES >> 6) + (1 << 16)  # a stored payload: zstd's worst case
KEY = re.compile(r"^[0-9a-f]{16,}(_c\d{5,})?$")
RECORD = 10240  # tar files are padded to a multiple of this (the tar default)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(identity: bytes, chunk: int, n_chunks: int) -> str:
    base = identity[:12].hex()
    return base if n_chunks == 1 else f"{base}_c{chunk:05d}"


def split_of(identity: bytes, val_fraction: float) -> str:
    """train or val: the identity hash's bytes 8..15 read as a fraction of 2**64, below val_fraction is val."""
    return "val" if int.from_bytes(identity[8:16], "big") < val_fraction * 2**64 else "train"


def compressor(level: int) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)


def _member(name: str, size: int) -> bytes:
    """A ustar header for a read-only regular file with owner 0 and time 0.

    Built by hand (tarfile's TarInfo.tobuf makes the same bytes, see the tests, at a tenth of
    the speed, which shows at thousands of small documents per second).
    """
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"member name {name!r} is longer than 100 bytes")
    head = raw.ljust(100, b"\0") + _MODE_IDS + b"%011o\0" % size + b"00000000000\0"
    return head + b"%06o\0 " % (sum(head) + _TAIL_SUM) + _TAIL


_MODE_IDS = b"0000444\0" + b"0000000\0" * 2  # mode r--r--r--, uid 0, gid 0
_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(64 + 16 + 167)  # regular file, no link, owner or device names
_TAIL_SUM = sum(_TAIL) + 8 * ord(" ")  # the checksum counts its own field as spaces


def _padding(n: int) -> bytes:
    return b"\0" * (-n % 512)


def sample_bytes(key: str, payload: bytes, meta: bytes) -> bytes:
    """The tar bytes of one sample (headers, data, padding), as `tar` writes them."""
    return b"".join((_member(f"{key}.bin.zst", len(payload)), payload, _padding(len(payload)),
                     _member(f"{key}.json", len(meta)), meta, _padding(len(meta))))


@dataclass
class ShardStats:
    """What the manifest records about one shard."""

    split: str
    index: int  # within the unit that wrote it; the final name is assigned when all units are done
    samples: int = 0
    raw_bytes: int = 0
    compressed_bytes: int = 0
    file_bytes: int = 0
    sha256: str = ""
    _hash: object = field(default_factory=hashlib.sha256, repr=False)

    def record(self) -> dict:
        return {"split": self.split, "index": self.index, "samples": self.samples, "raw_bytes": self.raw_bytes,
                "compressed_bytes": self.compressed_bytes, "file_bytes": self.file_bytes, "sha256": self.sha256}


class TarShardWriter:
    """Writes samples of one split into consecutive shards, rolling over by tar file size.

    `opener(split, index)` returns (file, commit): the file to write, and a function that makes
    the finished file visible under its real name (a rename, or an upload).
    """

    def __init__(self, split: str, shard_bytes: int, opener):
        self.split, self.shard_bytes, self.opener = split, shard_bytes, opener
        self.done: list[ShardStats] = []
        self._file: BinaryIO | None = None
        self._commit = None
        self._stats: ShardStats | None = None

    def write(self, key: str, raw_len: int, payload: bytes, meta: bytes) -> None:
        data = sample_bytes(key, payload, meta)
        s = self._stats
        if s is not None and s.samples and s.file_bytes + len(data) + 1024 > self.shard_bytes:
            self.close()
        if self._stats is None:
            self._stats = ShardStats(self.split, len(self.done))
            self._file, self._commit = self.opener(self.split, self._stats.index)
        self._put(data)
        self._stats.samples += 1
        self._stats.raw_bytes += raw_len
        self._stats.compressed_bytes += len(payload)

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._stats._hash.update(data)
        self._stats.file_bytes += len(data)

    def close(self) -> None:
        """Finish the open shard (end-of-archive blocks, padding), commit it under its name."""
        if self._stats is None:
            return
        end = 1024 + (-(self._stats.file_bytes + 1024) % RECORD)
        self._put(b"\0" * end)
        self._file.close()
        self._commit()
        self._stats.sha256 = self._stats._hash.hexdigest()
        self.done.append(self._stats)
        self._stats = self._file = self._commit = None


@dataclass
class Sample:
    """One sample read back from a shard."""

    key: str
    payload: bytes | None
    meta: bytes | None
    members: list[str] = field(default_factory=list)  # its tar member names, as stored (for error messages)


class TruncatedTar(EOFError):
    """The tar file ends inside a member or without its end-of-archive blocks."""


def iter_tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in a tar stream; raises TruncatedTar or tarfile.HeaderError.

    Read block by block rather than with tarfile's stream mode, which takes a cut-off file for
    a finished one.
    """
    while True:
        header = read_upto(stream, 512)
        if len(header) < 512:
            raise TruncatedTar("the file ends without the end-of-archive blocks")
        if header == bytes(512):
            if read_upto(stream, 512) != bytes(512):
                raise TruncatedTar("the end-of-archive marker is incomplete")
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "strict")
        except UnicodeDecodeError as e:
            raise tarfile.HeaderError(f"a member name is not UTF-8 ({e.reason})") from None
        if not 0 <= info.size <= MAX_MEMBER_BYTES:  # read before allocating: a header can claim petabytes
            raise tarfile.HeaderError(f"member {info.name[:100]} declares {info.size:,} bytes, not within the "
                                      f"0..{MAX_MEMBER_BYTES:,} any pico sample can take")
        data = read_upto(stream, info.size)
        pad = read_upto(stream, -info.size % 512)
        if len(data) < info.size or len(pad) < -info.size % 512:
            raise TruncatedTar(f"the file ends inside member {info.name}")
        if info.isreg():
            yield info.name, data


def iter_tar_samples(stream: BinaryIO) -> Iterator[Sample]:
    """Samples of a shard in stored order; members are grouped by key (the part before the first dot)."""
    current: Sample | None = None
    for name, data in iter_tar_members(stream):
        key, ext = member_key(name)
        if current is not None and current.key != key:
            yield current
            current = None
        if current is None:
            current = Sample(key, None, None)
        current.members.append(name)
        if ext == "bin.zst":
            current.payload = data
        elif ext == "json":
            current.meta = data
    if current is not None:
        yield current


def member_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the split is at the first dot of the base name, as WebDataset
    does, so `./abc.bin.zst` (what `tar -cf x.tar ./abc.*` stores) is key `./abc`, extension `bin.zst`."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


class ShardError(ValueError):
    """A shard cannot be opened or its tar cannot be read; the message names the shard and where."""


class SampleError(ValueError):
    """One sample of a shard cannot be decoded; `member` names the tar member, `reason` what is wrong."""

    def __init__(self, member: str, reason: str):
        super().__init__(f"member {member}: {reason}")
        self.member, self.reason = member, reason


def read_shard(url: str, start: int = 0) -> Iterator[tuple[int, Sample]]:
    """(index, sample) of each sample of a shard (a path or any fsspec URL), from sample `start` on.

    Streams; raises ShardError when the file cannot be opened, a header is damaged, or the file
    ends inside a member or without its end-of-archive blocks (a copy cut off between two
    members looks complete to a tar reader that stops at end of file)."""
    try:
        f = fsspec.open(url, "rb").open()
    except Exception as e:  # missing file, no permission, bad URL: all "cannot open"
        raise ShardError(f"shard {url}: cannot open ({type(e).__name__}: {e})") from None
    last = "(start of archive)"
    with f:
        try:
            for index, sample in enumerate(iter_tar_samples(f)):
                last = f"sample {sample.key}"
                if index >= start:
                    yield index, sample
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise ShardError(f"shard {url}, after {last}: unreadable tar ({e})") from None


def decode_sample(sample: Sample, dctx: zstandard.ZstdDecompressor | None = None,
                  limit: int = MAX_SAMPLE_BYTES) -> tuple[bytes, dict]:
    """The document bytes and metadata of a sample; raises SampleError naming the member at fault.

    Checks: both members present, the JSON is an object, the payload is one complete zstd frame
    (a frame that does not record its content size is accepted), the document has the length its
    JSON records, and it is at most `limit` bytes: checked on the sizes the frame and the JSON
    declare before any byte is decompressed, then enforced while decompressing."""
    for ext, data in (("bin.zst", sample.payload), ("json", sample.meta)):
        if data is None:
            found = f" (its members: {', '.join(sample.members)})" if sample.members else ""
            raise SampleError(f"{sample.key}.{ext}", f"missing from the shard{found}")
    member = f"{sample.key}.bin.zst"
    meta = _meta(sample)
    expected = meta.get("bytes")
    try:
        declared = zstandard.frame_content_size(sample.payload)  # -1: not recorded
    except zstandard.ZstdError as e:
        raise SampleError(member, f"not a zstd frame ({e})") from None
    for what, n in (("its zstd frame", declared), (f"{sample.key}.json", expected)):
        if isinstance(n, int) and n > limit:
            raise SampleError(member, f"decompresses to {n:,} bytes by {what}, over the {limit:,}-byte limit "
                                      "on one sample (a decompression bomb, or not a pico shard)")
    cap = expected if isinstance(expected, int) and 0 <= expected and declared < 0 else limit
    try:  # one-shot: a recorded size is allocated exactly; an unrecorded one grows to at most `cap`
        raw = (dctx or zstandard.ZstdDecompressor()).decompress(sample.payload, max_output_size=cap)
    except zstandard.ZstdError as e:
        why = "truncated zstd frame" if "full frame" in str(e) else f"not a zstd frame ({e})"
        if declared < 0 and "full frame" in str(e):
            why = f"truncated zstd frame, or one longer than {cap:,} bytes"
        raise SampleError(member, why) from None
    if expected is not None and expected != len(raw):
        raise SampleError(member, f"{len(raw)} bytes, but {sample.key}.json says {expected}")
    return raw, meta


def _meta(sample: Sample) -> dict:
    try:
        meta = json.loads(sample.meta)
    except ValueError as e:
        raise SampleError(f"{sample.key}.json", f"not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SampleError(f"{sample.key}.json", f"not a JSON object ({type(meta).__name__})")
    return meta


class HashingReader(io.RawIOBase):
    """Reads through to `raw`, hashing and counting every byte."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        b[: len(data)] = data
        self.sha.update(data)
        self.n += len(data)
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass
