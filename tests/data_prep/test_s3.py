"""S3 in and out through a real S3 API (moto's server on loopback) and a real local Ray."""

from __future__ import annotations

import pytest

from pico.data_prep import prepare, verify
from pico.data_prep.cli import main as prep_main

from .conftest import read_documents

pytestmark = [pytest.mark.s3, pytest.mark.ray]


@pytest.fixture
def s3(s3_server):
    import logging

    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    for bucket in ("pico-in", "pico-out"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    fs.invalidate_cache()
    return fs


def test_s3_input_and_output_round_trip(s3, ray_local, corpus_dir, tmp_path):
    root, expected = corpus_dir
    s3.put(str(root) + "/", "pico-in/corpus/", recursive=True)
    s3.invalidate_cache()
    m = prepare(["s3://pico-in/corpus/", "s3://no-such-bucket-pico/raw/*.txt", "s3://pico-in/none/"],
                "s3://pico-out/shards", val_fraction=0.3, shard_bytes=8192, chunk_bytes=700, **{"progress": False})
    s3.invalidate_cache()
    # documents are named by their S3 URL; the bytes are those of the local originals
    local = {f"corpus/{k[len(root.name) + 1:]}" if k.startswith(f"{root.name}/") else k: v for k, v in expected.items()}
    assert read_documents("s3://pico-out/shards") == local
    assert m["documents"]["written"] == len(expected) and m["documents"]["failed"] == 0
    unmatched = {s["source"]: s["reason"] for s in m["skipped"]}
    assert "bucket 'no-such-bucket-pico' does not exist or cannot be reached" in unmatched["s3://no-such-bucket-pico/raw/*.txt"]
    assert unmatched["s3://pico-in/none/"] == "no file matched this input"
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.ls("pico-out/shards"))
    assert names == sorted([s["name"] for s in m["shards"]] + ["manifest.json"])  # no _work, no temp objects
    assert verify("s3://pico-out/shards") == []
    # altering one object is caught through S3 as well
    first = f"pico-out/shards/{m['shards'][0]['name']}"
    s3.pipe(first, s3.cat(first)[:-5000])
    s3.invalidate_cache()
    assert prep_main(["verify", "s3://pico-out/shards"]) == 1


def test_unreachable_bucket_alone_is_no_input(s3, ray_local, tmp_path):
    from pico.configs.errors import UserError

    with pytest.raises(UserError, match="no input matched: s3://no-such-bucket-pico/x"):
        prepare(["s3://no-such-bucket-pico/x"], str(tmp_path / "out"), progress=False)


def test_a_bucket_lists_as_the_same_tree_on_disk_does(s3, tmp_path):
    """Same order (path order: x/a/c.txt before x/b.txt), hidden folders and pico prep outputs left out, so a
    corpus copied to a bucket gives the same units, shards and files_sha256 as on disk."""
    from pico.data_prep.sources import expand_inputs, files_digest

    tree = {"x/b.txt": b"b", "x/a/c.txt": b"c", "x/.cache/hf/meta.txt": b"m", "x/a-b/d.txt": b"d",
            "x/old/manifest.json": b"{}", "x/old/train-000000.tar": b"t", "x/half/_work/plan.json": b"{}",
            "x/half/note.txt": b"n"}
    for rel, data in tree.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
        s3.pipe(f"pico-in/tree/{rel}", data)
    s3.invalidate_cache()
    (tmp_path / "x" / "old" / "manifest.json").write_text('{"shards": [], "config": {}}')  # what marks it locally
    local, local_skips = expand_inputs([str(tmp_path / "x")])
    remote, remote_skips = expand_inputs(["s3://pico-in/tree/x"])
    assert [f.name for f in local] == [f.name for f in remote] == ["x/a-b/d.txt", "x/a/c.txt", "x/b.txt"]
    assert files_digest(local) == files_digest(remote)
    assert sorted(s.source.rsplit("/", 1)[-1] for s in remote_skips) == ["half", "old"]
