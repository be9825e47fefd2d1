"""Data preparation: raw corpora in, zstd-compressed WebDataset shards and manifest.json out.

    from pico.data_prep import prepare, verify
    manifest = prepare(["corpus/"], "shards/", val_fraction=0.01)
    assert verify("shards/") == []

See `job.py` for how a job is cut into Ray tasks and resumed, `shards.py` for the format.
"""

from __future__ import annotations

from pico.data_prep import verify as _verify_module  # noqa: F401  bound first: importing the submodule later
from pico.data_prep.config import PrepConfig         # would otherwise rebind `verify` below to the module


def prepare(inputs, output, *, progress: bool = True, **options) -> dict:
    """Prepare `inputs` (paths, globs, s3:// URLs) into shards at `output`; return the manifest.

    `options` are the fields of PrepConfig (shard_bytes, val_fraction, dedup, workers, ...).
    Reuses this process's Ray when it has one, else connects to `ray_address` or starts a local
    Ray (and stops only a Ray it started). Rerunning the same call resumes an interrupted job.
    """
    import dataclasses

    from pico.data_prep.job import run_job

    valid = {f.name for f in dataclasses.fields(PrepConfig)} - {"inputs", "output"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"prepare() got unknown options {unknown}; valid: {', '.join(sorted(valid))}")
    return run_job(PrepConfig(inputs=inputs, output=output, **options), progress=progress)[0]


def verify(output: str) -> list[str]:
    """Every problem in the shards at `output` against their manifest; empty when all is well."""
    return _verify_module.verify(output)


__all__ = ["PrepConfig", "prepare", "verify"]
