"""The shard format: deterministic bytes, rollover by size, readable by tar, zstd and webdataset."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest
import zstandard

from pico.data_prep.shards import (Sample, SampleError, ShardError, TarShardWriter, compressor, decode_sample,
                                   iter_tar_samples, member_key, read_shard, sample_key)

from .conftest import words


def write_shards(tmp_path, docs, shard_bytes):
    def opener(split, j):
        f = open(tmp_path / f"{split}-{j:06d}.tar", "wb")
        return f, lambda: None
    w = TarShardWriter("train", shard_bytes, opener)
    cctx = compressor(3)
    for i, data in enumerate(docs):
        key = sample_key(bytes([i]) * 16, 0, 1)
        meta = json.dumps({"source": "s", "id": str(i), "chunk": 0, "n_chunks": 1, "bytes": len(data)}).encode()
        w.write(key, len(data), cctx.compress(data), meta)
    w.close()
    return w.done


def test_rollover_by_bytes_and_identical_bytes_every_time(tmp_path):
    docs = [words(i, 2000) for i in range(20)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_shards(tmp_path / "a", docs, shard_bytes=20_000)
    b = write_shards(tmp_path / "b", docs, shard_bytes=20_000)
    assert len(a) > 2 and [s.sha256 for s in a] == [s.sha256 for s in b]
    assert sum(s.samples for s in a) == 20
    for s in a:
        size = (tmp_path / "a" / f"train-{s.index:06d}.tar").stat().st_size
        assert size == s.file_bytes and size % 10240 == 0
        assert s.samples == 1 or size <= 20_000 + 10240  # only the end-of-archive padding may spill over


def test_samples_read_back_in_order(tmp_path):
    docs = [words(i, 50) for i in range(5)]
    (shard,) = write_shards(tmp_path, docs, shard_bytes=1 << 30)
    with open(tmp_path / "train-000000.tar", "rb") as f:
        got = [decode_sample(s) for s in iter_tar_samples(f)]
    assert [raw for raw, _ in got] == docs and [m["id"] for _, m in got] == ["0", "1", "2", "3", "4"]


def test_read_shard_refuses_a_copy_cut_between_samples(tmp_path):
    docs = [words(i, 50) for i in range(5)]
    write_shards(tmp_path, docs, shard_bytes=1 << 30)
    path = tmp_path / "train-000000.tar"
    assert [decode_sample(s)[0] for _, s in read_shard(str(path))] == docs
    assert [j for j, _ in read_shard(str(path), start=3)] == [3, 4]
    with open(path, "rb") as f:
        first = next(iter_tar_samples(f))
    one_sample = 2 * 512 + -(-len(first.payload) // 512) * 512 + -(-len(first.meta) // 512) * 512
    path.write_bytes(path.read_bytes()[:2 * one_sample])  # a valid-looking tar of two samples, no end blocks
    with pytest.raises(ShardError, match=r"train-000000\.tar, after sample .*end-of-archive"):
        list(read_shard(str(path)))
    with pytest.raises(ShardError, match="cannot open"):
        list(read_shard(str(tmp_path / "missing.tar")))


def test_decode_sample_names_the_member_at_fault():
    cctx = compressor(3)
    meta = json.dumps({"bytes": 5}).encode()
    assert decode_sample(Sample("k", cctx.compress(b"hello"), meta)) == (b"hello", {"bytes": 5})
    cases = [(Sample("k", None, meta), "k.bin.zst: missing"), (Sample("k", b"not zstd", meta), "k.bin.zst: not a zstd"),
             (Sample("k", cctx.compress(b"hello")[:-4], meta), "k.bin.zst: truncated"),
             (Sample("k", cctx.compress(b"hell"), meta), "k.bin.zst: 4 bytes, but k.json says 5"),
             (Sample("k", cctx.compress(b"hello"), b"[1]"), "k.json: not a JSON object")]
    for sample, message in cases:
        with pytest.raises(SampleError, match=message):
            decode_sample(sample)


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds
    import zstandard

    docs = [words(i, 50) for i in range(5)]
    write_shards(tmp_path, docs, shard_bytes=1 << 30)
    samples = list(wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [sample_key(bytes([i]) * 16, 0, 1) for i in range(5)]
    assert [zstandard.ZstdDecompressor().decompress(s["bin.zst"]) for s in samples] == docs
    assert json.loads(samples[0]["json"])["bytes"] == len(docs[0])


@pytest.mark.skipif(shutil.which("tar") is None or shutil.which("zstd") is None,
                    reason="needs the tar and zstd command-line tools (apt-get install zstd)")
def test_tar_lists_and_zstd_cli_decompresses(tmp_path):
    docs = [words(i, 500) for i in range(3)]
    write_shards(tmp_path, docs, shard_bytes=1 << 30)
    shard = str(tmp_path / "train-000000.tar")
    names = subprocess.run(["tar", "-tf", shard], capture_output=True, text=True, check=True).stdout.split()
    key = sample_key(bytes([1]) * 16, 0, 1)
    assert names[2:4] == [f"{key}.bin.zst", f"{key}.json"]
    payload = subprocess.run(["tar", "-xOf", shard, f"{key}.bin.zst"], capture_output=True, check=True).stdout
    out = subprocess.run(["zstd", "-dc"], input=payload, capture_output=True, check=True).stdout
    assert out == docs[1]
    (tmp_path / "p.zst").write_bytes(payload)
    listing = subprocess.run(["zstd", "-lv", str(tmp_path / "p.zst")], capture_output=True, text=True, check=True)
    assert f"({len(docs[1])} B)" in listing.stdout and "Check: XXH64" in listing.stdout  # size and checksum recorded


def test_keys_have_no_dots_and_chunk_suffix():
    assert sample_key(b"\x01" * 16, 0, 1) == "01" * 12
    assert sample_key(b"\x01" * 16, 3, 7) == "01" * 12 + "_c00003"


def test_split_is_a_function_of_identity_only():
    from pico.data_prep.shards import split_of

    ids = [bytes([i, 255 - i]) * 8 for i in range(256)]
    val = [split_of(i, 0.25) for i in ids]
    assert val == [split_of(i, 0.25) for i in ids]
    assert 30 < val.count("val") < 100
    assert all(split_of(i, 0.0) == "train" for i in ids) and all(split_of(i, 1.0) == "val" for i in ids)


def test_end_of_archive_makes_a_valid_empty_tail(tmp_path):
    import tarfile

    write_shards(tmp_path, [b"x"], shard_bytes=1 << 30)
    data = (tmp_path / "train-000000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert [m.name for m in t.getmembers()][1].endswith(".json")


@pytest.mark.parametrize("name,size", [("ab" * 12 + ".bin.zst", 123), ("x.json", 0), ("ab" * 12 + "_c00003.json", 8**11 - 1)])
def test_hand_made_tar_header_equals_tarfiles(name, size):
    import tarfile

    from pico.data_prep.shards import _member

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = size, 0o444, 0, 0, 0, "", ""
    assert _member(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def zstd_zeros(n: int, content_size: bool = True) -> bytes:
    """A zstd frame of n zero bytes (a few KB for hundreds of MB: a decompression bomb), made in 1 MiB pieces."""
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    with cctx.stream_writer(out, size=n if content_size else -1, closefd=False) as w:
        for _ in range(n >> 20):
            w.write(bytes(1 << 20))
    return out.getvalue()


def test_a_bomb_is_refused_before_its_bytes_are_allocated():
    """Issue 28: a 100 KB sample that expanded to 3 GB was decompressed in full by every reader."""
    import tracemalloc

    bomb = zstd_zeros(256 << 20)
    assert len(bomb) < 64 << 10
    tracemalloc.start()
    with pytest.raises(SampleError, match=r"k\.bin\.zst: decompresses to 268,435,456 bytes by its zstd frame, over"):
        decode_sample(Sample("k", bomb, b"{}"))
    with pytest.raises(SampleError, match=r"k\.bin\.zst: decompresses to 268,435,456 bytes by k\.json"):
        decode_sample(Sample("k", zstd_zeros(2 << 20, content_size=False), b'{"bytes": 268435456}'))
    unsized = Sample("k", zstd_zeros(4 << 20, content_size=False), b"{}")  # no size anywhere: capped while decoding
    with pytest.raises(SampleError, match="truncated zstd frame, or one longer than 1,048,576 bytes"):
        decode_sample(unsized, limit=1 << 20)
    assert tracemalloc.get_traced_memory()[1] < 8 << 20
    tracemalloc.stop()
    assert decode_sample(unsized)[0] == bytes(4 << 20)  # under the default limit it reads


def test_member_names_with_a_directory_keep_their_key():
    """`tar -cf x.tar ./abc.*` stores ./abc.bin.zst: its key is ./abc, not '' (which named member `.bin.zst`)."""
    assert member_key("./abc.bin.zst") == ("./abc", "bin.zst")
    assert member_key("d.v1/abc.json") == ("d.v1/abc", "json")
    with pytest.raises(SampleError, match=r"member abc\.json: missing from the shard \(its members: abc\.bin\.zst, abc\.txt\)"):
        decode_sample(Sample("abc", b"x", None, ["abc.bin.zst", "abc.txt"]))


@pytest.mark.parametrize("manifest", [b'{"shards": [1, 2]}', b'{"shards": [], "totals": {"train": 5}}',
                                      b"[" * 5000 + b"]" * 5000])
def test_verify_reports_a_malformed_manifest_as_a_problem_not_a_traceback(tmp_path, manifest):
    from pico.data_prep.verify import verify

    (tmp_path / "manifest.json").write_bytes(manifest)
    (problem,) = verify(str(tmp_path))
    assert "manifest.json: not a valid manifest" in problem


def test_the_packages_verify_stays_the_function_after_its_module_is_imported():
    import importlib

    importlib.import_module("pico.data_prep.verify")
    from pico.data_prep import verify

    assert callable(verify) and verify.__module__ == "pico.data_prep"
