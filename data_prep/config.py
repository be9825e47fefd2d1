"""Options of one `pico prep` job: one dataclass, one docstring per field (the CLI help reads them)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

from pico.configs.errors import UserError
from pico.data_prep.shards import MAX_SAMPLE_BYTES
from pico.data_prep.sources import MAX_EXPANSION, InputFile, files_digest, portable_input

MiB = 1 << 20

# The options that decide what the shards contain. A rerun (resume) must agree on all of them;
# the others (workers, where Ray runs, fail-fast) may change between a kill and the rerun.
OUTPUT_KEYS = ("inputs", "output", "format", "text_field", "id_field", "shard_bytes", "val_fraction",
               "dedup", "zstd_level", "chunk_bytes", "unit_bytes", "max_expansion")


@dataclass
class PrepConfig:
    """One data preparation job: raw corpora in, zstd WebDataset shards and a manifest out."""

    inputs: list[str] = field(default_factory=list)
    """Files, directories (walked recursively, dotfiles skipped), globs or fsspec URLs such as s3://bucket/prefix/."""
    output: str = ""
    """Directory or s3:// URL that receives {split}-{index:06d}.tar shards and manifest.json."""
    format: Literal["auto", "raw", "jsonl", "parquet"] = "auto"
    """auto: *.jsonl / *.ndjson (after a .gz/.zst/.xz/.bz2 suffix) are JSON Lines, *.parquet / *.pq are Parquet (one document per row), every other file is one document."""
    text_field: str = "text"
    """JSON Lines field or Parquet column that holds the document text (the default also accepts "content" where "text" is absent)."""
    id_field: str = "id"
    """JSON Lines field or Parquet column recorded as the document id when present (otherwise path#line or path#row)."""
    shard_bytes: int = 256 * MiB
    """A shard rolls over to the next one before its tar file would grow past this many bytes."""
    val_fraction: float = 0.01
    """Fraction of documents in the val split, chosen by a hash of the document's identity (its file's path from the
    folder holding its input, and its line or row: the same wherever the corpus sits)."""
    dedup: bool = False
    """Drop exact duplicates (same raw bytes) across the whole job; the first occurrence in input order is kept. Reads the input twice."""
    zstd_level: int = 3
    """zstd compression level of each sample (1-22)."""
    chunk_bytes: int = 16 * MiB
    """Documents larger than this are split into chunks of at most this many bytes, one sample each (at most 64M, the largest sample the readers decompress)."""
    unit_bytes: int = 256 * MiB
    """Input bytes (as stored) per Ray task; a task writes its own shards and a completion marker, so a rerun redoes only unfinished tasks."""
    workers: int | None = None
    """Ray tasks running at once (default: the CPUs of the local machine, or of the cluster with --ray-address)."""
    ray_address: str | None = None
    """Address of a running Ray cluster (e.g. ray://head:10001 or auto); default: reuse this process's Ray or start a local one."""
    max_expansion: float = MAX_EXPANSION
    """A compressed input (.gz .zst .xz .bz2) may decompress to at most this many times its stored size (and at least 64M); past that it is recorded as failed, not read on (a decompression bomb)."""
    fail_fast: bool = False
    """Stop at the first input that cannot be read, instead of recording it in the manifest and going on."""
    overwrite: bool = False
    """Delete what a previous pico prep job left in the output (shards, manifest, unfinished work) and start over."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, os.PathLike)):
            self.inputs = [self.inputs]
        self.inputs = [os.fspath(p) for p in self.inputs]
        self.output = os.fspath(self.output)
        if not self.inputs:
            raise UserError("no input given: pass --input with at least one file, directory, glob or s3:// URL")
        if not self.output:
            raise UserError("no output given: pass --output with a directory or s3:// URL")
        if self.format not in ("auto", "raw", "jsonl", "parquet"):
            raise UserError(f"--format={self.format!r} is not valid; choose auto, raw, jsonl or parquet")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise UserError(f"--val-fraction={self.val_fraction} must lie in [0, 1]")
        if not 1 <= self.zstd_level <= 22:
            raise UserError(f"--zstd-level={self.zstd_level} must lie in 1..22")
        for name in ("shard_bytes", "chunk_bytes", "unit_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.chunk_bytes > MAX_SAMPLE_BYTES:
            raise UserError(f"--chunk-bytes={self.chunk_bytes} exceeds {MAX_SAMPLE_BYTES >> 20}M, the largest sample "
                            "the shard readers decompress (a bound against decompression bombs); a larger document "
                            "is split into several samples anyway, so choose at most that")
        if not 1 <= self.max_expansion < float("inf"):  # also refuses nan
            raise UserError(f"--max-expansion={self.max_expansion} must be a finite number >= 1")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers={self.workers} must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def output_options(self) -> dict:
        """The options that decide the shards' contents (checked on resume)."""
        return {k: getattr(self, k) for k in OUTPUT_KEYS}

    @staticmethod
    def changed(now: dict, recorded: dict) -> list[str]:
        """The keys of `now` (options as `output_options` or `manifest_options` give them) that `recorded` holds
        otherwise; a key a record from an older pico prep lacks counts as its default then."""
        defaults = PrepConfig.__dataclass_fields__
        return sorted(k for k in now if recorded.get(k, getattr(defaults.get(k), "default", None)) != now[k])

    def manifest_options(self, files: list[InputFile]) -> dict:
        """`output_options` as the manifest records them, naming no local path: the inputs by portable name
        (the names their documents carry, so the same wherever the corpus sits, as the shards are) and a
        digest of their files' names and sizes (another corpus under the same name is other inputs), the
        output left out (the manifest lies in it)."""
        options = {k: v for k, v in self.output_options().items() if k != "output"}
        return {**options, "inputs": [portable_input(p) for p in self.inputs], "files_sha256": files_digest(files)}
