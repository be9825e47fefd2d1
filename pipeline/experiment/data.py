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
import json
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
    """`pico prep` of the inputs into `out` (pico prep itself resumes a killed preparation, and finds a
    finished one again); a folder prepared from other inputs or another val_fraction is an error, not
    reused. pico prep records the inputs by name with a digest of their files, as the split hashes
    documents by name; one before that recorded paths and hashed each document's path, so a corpus
    moved elsewhere is other inputs there, and its finished folder is not handed back to pico prep."""
    inputs = [expand(raw, f"{key}.inputs[{i}]") for i, raw in enumerate(prep.inputs)]
    made = json.loads((out / "manifest.json").read_text()).get("config") or {} if (out / "manifest.json").is_file() else None
    if made is not None:
        if "output" in made:  # the older pico prep
            same = [p if "://" in p else os.path.abspath(p) for p in made.get("inputs") or []] == \
                [p if "://" in p else os.path.abspath(p) for p in inputs]
        else:  # imported here: the older pico prep, which a pinned experiment may run, has no portable_input
            from pico.data_prep.sources import portable_input
            same = made.get("inputs") == [portable_input(p) for p in inputs]
        if not same or made.get("val_fraction") != prep.val_fraction:
            raise UserError(f"{key}: {out} was prepared from {made.get('inputs')} with val_fraction "
                            f"{made.get('val_fraction')}, the design now asks for {inputs} with {prep.val_fraction}: "
                            f"point the design back, or delete {out.parent} to prepare it again (then rerun or "
                            "`pico experiment rescore` the finished runs)")
        if "output" in made:
            return out
    for i, p in enumerate(inputs):
        if "://" not in p and not glob.glob(p):
            raise UserError(f"{key}.inputs[{i}]: {p} does not exist; set the corpus path (see the design's notes)")
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


HELDOUT = "2"  # how the held-out sets are cut (below); a folder cut another way is cut again


def heldout_marker(prep) -> str:
    """What a held-out folder's `done` file says: the cut's version and sizes (another is cut again)."""
    return json.dumps({"cut": HELDOUT, "test_kb": prep.test_kb, "select_kb": prep.select_kb}, sort_keys=True)


def _span(doc: bytes, size: int, at: int, end: int | None = None) -> tuple[int, int]:
    """[start, stop) of `size` bytes of `doc` from `at` (moved to the next line start within 4 KB), not past `end`."""
    end = len(doc) if end is None else end
    start = max(0, at)
    nl = doc.find(b"\n", start, min(start + 4096, end))
    start = nl + 1 if nl >= 0 and nl + 1 < end else start
    return start, max(start, min(start + size, end))


def _fill(room: dict[int, int], total: int) -> dict[int, int]:
    """Split `total` bytes over the documents in equal shares, none past its `room`; what a short one cannot
    take goes to the others (water-filling)."""
    out, left = {}, total
    order = sorted(room, key=lambda i: room[i])
    for n, i in enumerate(order):
        out[i] = min(room[i], left // (len(order) - n))
        left -= out[i]
    return out


def _heldout(prep, shards: Path, folder: Path, key: str) -> None:
    """Test: a slice from the middle of each held-out document but every 4th; select: a slice of *every*
    held-out document (past its test slice where it has one, else before it), so that the set that
    picks LRs and shapes is drawn from the same documents as the one reported, never the same bytes.
    (Version 1 took select from every 4th document only: on prose, 7 held-out novels gave select one
    novel, whose preferences disagreed with the six others'.)"""
    done, marker = folder / "done", heldout_marker(prep)
    if done.is_file():
        text = done.read_text().strip()
        if text == marker:
            return
        if text == HELDOUT:  # cut by this version before the marker recorded its sizes: take them as the design's
            done.write_text(marker)
            return
    docs = [d for d in _val_documents(shards) if d.strip()]
    if len(docs) < 2:
        raise UserError(f"{key}: the val split holds {len(docs)} document(s); test and select need 2 or more: "
                        "raise val_fraction or add documents")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    held = {i for i in range(len(docs)) if i % 4 == 3} or {len(docs) - 1}  # in select only
    tests = [i for i in range(len(docs)) if i not in held]
    t_share = prep.test_kb * 1024 // len(tests)
    for split in ("test", "select"):
        (tmp / split).mkdir(parents=True)
    for n, i in enumerate(tests):
        doc = docs[i]
        a, b = _span(doc, t_share, len(doc) // 2 - t_share // 2)
        (tmp / "test" / f"{n:04d}.txt").write_bytes(doc[a:b])
    spans = {i: _span(docs[i], t_share, len(docs[i]) // 2 - t_share // 2) for i in tests}
    room = {i: len(d) if i in held else max(len(d) - spans[i][1], spans[i][0]) for i, d in enumerate(docs)}
    for i, size in _fill(room, prep.select_kb * 1024).items():  # equal shares, a short document's rest to the others
        doc = docs[i]
        if i in held:
            a, b = _span(doc, size, len(doc) // 2 - size // 2)
        else:
            ta, tb = spans[i]
            a, b = _span(doc, size, tb) if len(doc) - tb >= ta else _span(doc, size, ta - size - 4096, ta)
        if b > a:
            (tmp / "select" / f"{i:04d}.txt").write_bytes(doc[a:b])
    done_tmp = tmp / "done"
    done_tmp.write_text(marker)
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
