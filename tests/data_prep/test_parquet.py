"""Parquet inputs and Hugging Face dataset layouts: byte-exact rows, bad files named, splits mapped."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pico.data_prep import prepare
from pico.data_prep.sources import Doc, Skip, declared_split, expand_inputs, iter_documents

from .conftest import read_documents, words

QUIET = {"progress": False}


def write_parquet(path, texts, ids=None, rows_per_group=4, column="text", extra=True, **kw):
    cols = {column: pa.array(texts, type=kw.pop("type", pa.string()))}
    if ids is not None:
        cols["id"] = pa.array(ids)
    if extra:
        cols["url"] = pa.array([f"https://example.org/{i}" for i in range(len(texts))])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=rows_per_group, write_page_checksum=True, **kw)
    return path


def items(path, text_field="text", chunk_bytes=1 << 20):
    files, problems = expand_inputs([str(path)])
    out = []
    for f in files:
        for it in iter_documents(f, "auto", text_field, "id", chunk_bytes):
            out.append((it, b"".join(it.chunks())) if isinstance(it, Doc) else (it, None))
    return out, problems


def test_rows_are_documents_byte_exact_across_row_groups(tmp_path):
    texts = [words(i, 30 + i).decode() + " é中😀" for i in range(11)]
    path = write_parquet(tmp_path / "a.parquet", texts, ids=[f"doc-{i}" for i in range(11)], rows_per_group=3)
    got, problems = items(path, chunk_bytes=64)
    assert not problems
    assert [d.id for d, _ in got] == [f"doc-{i}" for i in range(11)]
    assert [data for _, data in got] == [t.encode() for t in texts]
    assert [d.line for d, _ in got] == list(range(1, 12))  # rows, 1-based, across row groups
    assert all(d.n_chunks == -(-len(t.encode()) // 64) for (d, _), t in zip(got, texts))


def test_content_column_is_the_fallback_and_ids_default_to_the_row(tmp_path):
    path = write_parquet(tmp_path / "code.parquet", ["def f():\n    return 1\n", "x = 2\n"], column="content")
    got, _ = items(path)
    assert [data for _, data in got] == [b"def f():\n    return 1\n", b"x = 2\n"]
    assert got[1][0].id == f"{path.name}#2"  # a file named as the input: its name


def test_missing_text_column_names_the_columns_it_has(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", ["x"], column="body")
    (skip, _), = items(path)[0]
    assert isinstance(skip, Skip) and skip.kind == "failed"
    assert "no text column 'text' (columns: body, url)" in skip.reason and "--text-field" in skip.reason


def test_non_string_column_and_nulls(tmp_path):
    bad = write_parquet(tmp_path / "n.parquet", [1, 2], type=pa.int64())
    (skip, _), = items(bad)[0]
    assert "text column 'text' holds int64, not strings" in skip.reason
    nulls = write_parquet(tmp_path / "m.parquet", ["a", None, ""])
    got, _ = items(nulls)
    assert [(type(i).__name__, getattr(i, "kind", None), i.line) for i, _ in got] == \
        [("Doc", None, 1), ("Skip", "empty", 2), ("Skip", "empty", 3)]
    assert got[1][0].message() == f"{nulls} row 2: column 'text' is null"


def test_truncated_file_is_one_failure(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", ["abc"] * 20)
    path.write_bytes(path.read_bytes()[:-40])
    (skip, _), = items(path)[0]
    assert skip.kind == "failed" and "not a readable Parquet file" in skip.reason


def test_a_damaged_row_group_is_named_and_the_others_are_read(tmp_path):
    texts = [words(100 + i, 200).decode() for i in range(9)]
    path = write_parquet(tmp_path / "d.parquet", texts, rows_per_group=3, compression="none", extra=False)
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data[start + col.total_compressed_size // 2] ^= 0xFF  # a flipped byte inside row group 1: a page checksum fails
    path.write_bytes(bytes(data))
    got, _ = items(path)
    docs = [d.line for d, _ in got if isinstance(d, Doc)]
    skips = [s for s, _ in got if isinstance(s, Skip)]
    assert docs == [1, 2, 3, 7, 8, 9]
    assert [s.line for s in skips] == [4]
    assert "row group 1 (rows 4-6) cannot be decoded" in skips[0].reason
    assert [data for d, data in got if isinstance(d, Doc)] == [t.encode() for t in texts[:3] + texts[6:]]


def test_hugging_face_split_names():
    assert declared_split("/d/data/train-00000-of-00042.parquet") == "train"
    assert declared_split("s3://b/data/validation-00001-of-00002.jsonl.gz") == "val"
    assert declared_split("/d/data/test-00000-of-00001.parquet") == "test"
    assert declared_split("/d/data/train.parquet") is None
    assert declared_split("/d/notes-00000-of-00001.txt") is None


def hf_dataset(root, with_validation=True):
    """The layout `datasets` writes: data/{split}-NNNNN-of-NNNNN.parquet, plus a README."""
    (root / "README.md").parent.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("---\nlicense: cc0\n---\n")
    splits = {"train": [words(i, 40).decode() for i in range(30)], "test": ["held out"] * 3}
    if with_validation:
        splits["validation"] = [words(500 + i, 40).decode() for i in range(5)]
    for split, texts in splits.items():
        half = len(texts) // 2
        for i, part in enumerate((texts[:half], texts[half:])):
            write_parquet(root / "data" / f"{split}-{i:05d}-of-00002.parquet", part,
                          ids=[f"{split}/{i}/{j}" for j in range(len(part))])
    return splits


@pytest.mark.ray
def test_hugging_face_directory_maps_its_splits(ray_local, tmp_path):
    splits = hf_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    m = prepare([str(tmp_path / "ds")], str(out), val_fraction=0.5, **QUIET)
    docs = read_documents(str(out))
    by_split: dict[str, set[str]] = {"train": set(), "val": set()}
    for shard in m["shards"]:
        by_split[shard["split"]].add(shard["name"])
    assert m["documents"]["written"] == 35 + 1  # 30 train + 5 validation rows + the README
    # the dataset's validation split is pico's val, its train split all train (no val carved out)
    assert {k for k in docs if k.startswith("validation/")} == {f"validation/{i}/{j}" for i in range(2) for j in
                                                                (range(2) if i == 0 else range(3))}
    assert not any(k.startswith("test/") for k in docs)
    excluded = [s for s in m["skipped"] if "test split" in s["reason"]]
    assert len(excluded) == 2
    val_ids = _ids_in_split(out, m, "val")
    assert {k for k in val_ids if not k.endswith("README.md")} == {k for k in docs if k.startswith("validation/")}
    assert not any(k.startswith("train/") for k in val_ids)
    assert docs["train/0/0"] == splits["train"][0].encode()


def _ids_in_split(out, m, split):
    from pico.data_prep.shards import decode_sample, iter_tar_samples

    ids = set()
    for shard in m["shards"]:
        if shard["split"] == split:
            with open(out / shard["name"], "rb") as f:
                ids |= {decode_sample(s)[1]["id"] for s in iter_tar_samples(f)}
    return ids


@pytest.mark.ray
def test_parquet_prep_job_counts_bad_rows_and_goes_on(ray_local, tmp_path):
    good = write_parquet(tmp_path / "in" / "good.parquet", ["one", "two", None])
    write_parquet(tmp_path / "in" / "nocol.parquet", ["x"], column="body")
    m = prepare([str(tmp_path / "in")], str(tmp_path / "out"), val_fraction=0.0, **QUIET)
    assert m["documents"] == {"read": 4, "written": 2, "deduplicated": 0, "empty": 1, "failed": 1}
    reasons = {(s["source"].rsplit("/", 1)[-1], s["line"]): s["reason"] for s in m["skipped"]}
    assert reasons[("good.parquet", 3)] == "column 'text' is null"
    assert "no text column 'text'" in reasons[("nocol.parquet", None)]
    assert sorted(read_documents(str(tmp_path / "out")).values()) == [b"one", b"two"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["format"] == "auto"
    assert good.exists()


@pytest.mark.s3
@pytest.mark.ray
def test_parquet_from_s3(s3_server, ray_local, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    if not fs.exists("pico-pq"):
        fs.mkdir("pico-pq")
    texts = [words(i, 50).decode() for i in range(7)]
    local = write_parquet(tmp_path / "x.parquet", texts, ids=[f"r{i}" for i in range(7)], rows_per_group=2)
    fs.put(str(local), "pico-pq/data/train-00000-of-00001.parquet")
    fs.invalidate_cache()
    prepare(["s3://pico-pq/data/"], str(tmp_path / "out"), val_fraction=0.0, **QUIET)
    assert read_documents(str(tmp_path / "out")) == {f"r{i}": t.encode() for i, t in enumerate(texts)}


def test_a_row_group_past_the_expansion_limit_is_a_recorded_skip(tmp_path):
    """Issue 28: pyarrow decompresses a row group's columns whole; their declared size is checked first."""
    from pico.data_prep.sources import _iter_parquet

    path = tmp_path / "bomb.parquet"
    table = pa.table({"text": ["a" * 200_000] * 4 + ["small"]})
    pq.write_table(table, path, row_group_size=4, compression="zstd")  # rows 1-4: ~800 KB that zstd shrinks
    assert path.stat().st_size < 20_000
    out = list(_iter_parquet(str(path), "text", "id", 1 << 20, limit=100_000))
    skips = [o for o in out if isinstance(o, Skip)]
    docs = [o for o in out if isinstance(o, Doc)]
    assert len(skips) == 1 and "rows 1-4" in skips[0].reason and "--max-expansion" in skips[0].reason
    assert [b"".join(d.chunks()) for d in docs] == [b"small"]  # the next row group is read
    assert len(list(_iter_parquet(str(path), "text", "id", 1 << 20, limit=None))) == 5  # no limit: every row
