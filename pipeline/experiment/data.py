"""A domain's data: training shards and the held-out test and select sets, prepared once.

A domain given as shards and files is checked and fingerprinted. A domain with `prep` is
prepared under WORK/data/DOMAIN: `pico prep` writes the shards (its val split held out by
document hash), then the held-out sets are cut from the val documents in key order: every 4th
document goes to select, the others to test, and each set takes an equal slice of each of its
documents from the document's middle (starting on a line), `test_kb` and `select_kb` in all.
Every step writes under a temporary name and renames, so a killed preparation is redone.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from pico.configs.errors import UserError
from pico.pipeline.experiment.design import Design, expand


@contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (fcntl: released by the OS when the holder dies, kill -9 included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def shards_fingerprint(dirs: list[str]) -> str:
    """sha256 of each shard directory's manifest.json (pico prep's), else of its shard names and sizes."""
    h = hashlib.sha256()
    for d in dirs:
        manifest = Path(d) / "manifest.json"
        if manifest.is_file():
            h.update(manifest.read_bytes())
        else:
            for t in sorted(Path(d).glob("*.tar")):
                h.update(f"{t.name}:{t.stat().st_size}".encode())
    return h.hexdigest()[:16]


def text_files(paths: list[str], key: str) -> list[Path]:
    """The files named by `paths` (a directory stands for the files in it, sorted); an error names a missing one."""
    files: list[Path] = []
    for i, raw in enumerate(paths):
        p = Path(expand(raw, f"{key}[{i}]"))
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{key}[{i}]: {p} does not exist; point it at held-out text files or a folder of them")
    if not files:
        raise UserError(f"{key}: no files found in {', '.join(paths)}")
    return files


def prepare(design: Design, domain: str) -> dict:
    """{train: [shard dirs], test: [files], select: [files], fingerprints: {...}} of a domain, preparing it once."""
    spec = design.domains[domain]
    key = f"domains.{domain}"
    if spec.prep is None:
        train = []
        for i, raw in enumerate(spec.train):
            p = expand(raw, f"{key}.train[{i}]")
            if "://" not in p and not (Path(p).is_dir() and any(Path(p).glob("*.tar")) or glob.glob(p)):
                raise UserError(f"{key}.train[{i}]: {p} holds no shards; point it at `pico prep` output")
            train.append(p)
        test, select = text_files(spec.test, f"{key}.test"), text_files(spec.select, f"{key}.select")
    else:
        root = design.work / "data" / domain
        with locked(design.work / "locks" / f"data-{domain}.lock"):
            shards = _prep(spec.prep, root / "shards", f"{key}.prep")
            _heldout(spec.prep, shards, root / "heldout", f"{key}.prep")
        train = [str(shards)]
        test = sorted((root / "heldout" / "test").iterdir())
        select = sorted((root / "heldout" / "select").iterdir())
    return {"train": train, "test": [str(p) for p in test], "select": [str(p) for p in select],
            "fingerprints": {"train": shards_fingerprint(train), "test": sha_files(test), "select": sha_files(select)},
            "kb": {"test": sum(p.stat().st_size for p in test) / 1024,
                   "select": sum(p.stat().st_size for p in select) / 1024}}


def _prep(prep, out: Path, key: str) -> Path:
    """`pico prep` of the inputs into `out`, once (pico prep itself resumes a killed preparation)."""
    if (out / "manifest.json").is_file():
        return out
    inputs = []
    for i, raw in enumerate(prep.inputs):
        p = expand(raw, f"{key}.inputs[{i}]")
        if "://" not in p and not glob.glob(p):
            raise UserError(f"{key}.inputs[{i}]: {p} does not exist; set the corpus path (see the design's notes)")
        inputs.append(p)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pico.pipeline.cli", "prep", "--input", *inputs, "--output", str(out),
           "--val-fraction", str(prep.val_fraction), "--workers", "1", "--no-progress"]
    print(f"[experiment] preparing {out}: {' '.join(inputs)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"{key}: pico prep failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return out


def _val_documents(shards: Path) -> list[bytes]:
    from pico.data_prep.shards import decode_sample, read_shard

    docs = []
    for tar in sorted(shards.glob("val-*.tar")):
        docs += [(s.key, decode_sample(s)[0]) for _, s in read_shard(str(tar))]
    return [d for _, d in sorted(docs)]


def _slice(doc: bytes, size: int) -> bytes:
    """`size` bytes from the middle of `doc`, starting on a line when there is one."""
    start = max(0, len(doc) // 2 - size // 2)
    nl = doc.find(b"\n", start, start + 4096)
    start = nl + 1 if nl >= 0 and nl + 1 < len(doc) else start
    return doc[start:start + size]


def _heldout(prep, shards: Path, folder: Path, key: str) -> None:
    if (folder / "done").is_file():
        return
    docs = [d for d in _val_documents(shards) if d.strip()]
    if len(docs) < 2:
        raise UserError(f"{key}: the val split holds {len(docs)} document(s); test and select need 2 or more: "
                        "raise val_fraction or add documents")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    chosen = {i for i in range(len(docs)) if i % 4 == 3} or {len(docs) - 1}  # select: every 4th document
    for split, kb, part in (("test", prep.test_kb, [d for i, d in enumerate(docs) if i not in chosen]),
                            ("select", prep.select_kb, [d for i, d in enumerate(docs) if i in chosen])):
        (tmp / split).mkdir(parents=True)
        share = kb * 1024 // len(part)
        for i, doc in enumerate(part):
            (tmp / split / f"{i:04d}.txt").write_bytes(_slice(doc, share))
    (tmp / "done").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def check_inputs(design: Design, domain: str) -> None:
    """The domain's sources exist (a dry run's check; nothing is prepared)."""
    spec = design.domains[domain]
    key = f"domains.{domain}"
    if spec.prep is not None:
        for i, raw in enumerate(spec.prep.inputs):
            p = expand(raw, f"{key}.prep.inputs[{i}]")
            if "://" not in p and not glob.glob(p):
                raise UserError(f"{key}.prep.inputs[{i}]: {p} does not exist; set the corpus path (see the design's notes)")
        return
    for split in ("train", "test", "select"):
        for i, raw in enumerate(getattr(spec, split)):
            p = expand(raw, f"{key}.{split}[{i}]")
            if "://" not in p and not glob.glob(p):
                raise UserError(f"{key}.{split}[{i}]: {p} does not exist")
