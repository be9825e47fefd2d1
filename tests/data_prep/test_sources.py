"""Reading inputs: every format byte-exact, every kind of bad input named by file and line."""

from __future__ import annotations

import gzip
import json
import lzma
import os

import pytest
import zstandard

from pico.data_prep.sources import Doc, InputFile, ZstdReader, expand_inputs, iter_documents

from .conftest import words


def read_all(path, chunk_bytes=1 << 20, fmt="auto", text_field="text"):
    files, problems = expand_inputs([str(path)])
    assert not problems
    out = []
    for f in files:
        for item in iter_documents(f, fmt, text_field, "id", chunk_bytes):
            out.append((item, b"".join(item.chunks())) if isinstance(item, Doc) else (item, None))
    return out


def test_every_format_reads_byte_exact(corpus_dir):
    root, expected = corpus_dir
    got = {item.id: data for item, data in read_all(root)}
    assert got == expected


def test_listing_is_sorted_skips_dotfiles_and_dedupes(tmp_path):
    for name in ("b.txt", "a.txt", ".hidden", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    files, problems = expand_inputs([str(tmp_path), str(tmp_path / "*.txt"), str(tmp_path / "nothing*")])
    assert [f.url.rsplit("/", 2)[-1] for f in files] == ["a.txt", "b.txt", "c.txt"]
    assert [p.reason for p in problems] == ["no file matched this input"]
    assert problems[0].source.endswith("nothing*")


def test_large_document_is_chunked_with_its_size_known_up_front(tmp_path):
    text = words(7, 3000)
    (tmp_path / "big.txt").write_bytes(text)
    (tmp_path / "big.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    for item, data in read_all(tmp_path, chunk_bytes=1000):
        assert data == text and item.size == len(text) and item.n_chunks == -(-len(text) // 1000)
        assert all(len(c) <= 1000 for c in item.chunks())


def test_zstd_reader_reads_concatenated_frames_and_rejects_a_cut_frame(tmp_path):
    import io

    c = zstandard.ZstdCompressor()
    two = c.compress(b"first ") + c.compress(b"second")
    assert io.BufferedReader(ZstdReader(io.BytesIO(two))).read() == b"first second"
    cut = c.compress(words(1, 5000))[:-20]
    with pytest.raises(EOFError, match="truncated"):
        io.BufferedReader(ZstdReader(io.BytesIO(cut))).read()


def _skips(path, **kw):
    return [item for item, _ in read_all(path, **kw) if not isinstance(item, Doc)]


@pytest.mark.parametrize("name,make,reason", [
    ("bad.txt.gz", lambda: b"this is not gzip at all", "corrupt or truncated gzip"),
    ("cut.txt.gz", lambda: gzip.compress(words(2, 4000))[:-300], "corrupt or truncated gzip"),
    ("cut.txt.zst", lambda: zstandard.ZstdCompressor().compress(words(2, 4000))[:-300], "corrupt or truncated zstd"),
    ("bad.txt.zst", lambda: b"\x28\xb5\x2f\xfd garbage garbage", "corrupt or truncated zstd"),
    ("cut.txt.xz", lambda: lzma.compress(words(2, 4000))[:-300], "corrupt or truncated xz"),
    ("bad.txt.xz", lambda: b"not xz", "corrupt or truncated xz"),
])
def test_corrupt_or_truncated_compressed_file(tmp_path, name, make, reason):
    (tmp_path / name).write_bytes(make())
    (skip,) = _skips(tmp_path / name)
    assert skip.kind == "failed" and reason in skip.reason and skip.source.endswith(name) and skip.line is None


def test_truncated_jsonl_names_the_line_where_it_broke(tmp_path):
    lines = b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(400))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines)[:-500])
    items = read_all(tmp_path / "c.jsonl.gz")
    docs = [i for i, _ in items if isinstance(i, Doc)]
    (skip,) = [i for i, _ in items if not isinstance(i, Doc)]
    assert len(docs) > 100 and skip.line == docs[-1].line + 1 and "truncated gzip" in skip.reason


def test_bad_json_lines_are_named_and_the_rest_is_read(tmp_path):
    rows = [b'{"text": "ok"}', b'{"text": broken', b'{"body": "x", "id": 3}', b'{"text": 5}', b'[1, 2]',
            b'{"text": ""}', b"", b'{"text": "\\ud800"}', b'{"text": "last"}']
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    items = read_all(tmp_path / "d.jsonl")
    assert [(i.line, d) for i, d in items if isinstance(i, Doc)] == [(1, b"ok"), (9, b"last")]
    skips = {i.line: (i.kind, i.reason) for i, _ in items if not isinstance(i, Doc)}
    assert skips[2][0] == "failed" and "invalid JSON" in skips[2][1]
    assert "missing text field 'text' (fields: body, id)" in skips[3][1] and "--text-field" in skips[3][1]
    assert "is a int, not a string" in skips[4][1]
    assert "expected a JSON object" in skips[5][1]
    assert skips[6] == ("empty", "empty document")
    assert 7 not in skips  # a blank line is no document
    assert "surrogate" in skips[8][1]


def test_text_field_option(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b'{"body": "hello", "id": "x"}\n')
    ((item, data),) = read_all(tmp_path / "e.jsonl", text_field="body")
    assert (item.id, data) == ("x", b"hello")


def test_empty_file_is_an_empty_document(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "empty.txt.gz").write_bytes(gzip.compress(b""))
    assert [(s.kind, s.reason) for s in _skips(tmp_path)] == [("empty", "empty document")] * 2


def test_iter_lines_matches_split_at_every_block_size():
    import io
    import random

    from pico.data_prep.sources import iter_lines

    rng = random.Random(0)
    for _ in range(300):
        data = bytes(rng.choice(b"ab\n") for _ in range(rng.randrange(0, 60)))
        ref = data.split(b"\n")
        if ref[-1] == b"":
            ref.pop()
        assert list(iter_lines(io.BytesIO(data), block=rng.randrange(1, 8))) == ref


def test_output_inside_an_input_tree_is_left_out(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-000000.tar").write_bytes(b"y")
    files, _ = expand_inputs([str(tmp_path)], exclude=str(tmp_path / "shards"))
    assert [f.url for f in files] == [str(tmp_path / "a.txt")]


def test_a_compressed_bomb_is_a_recorded_skip_read_in_bounded_memory(tmp_path):
    """Issue 28: a zstd input was decompressed a 64 KiB block at a time, 2 GiB per call for a bomb."""
    import tracemalloc

    from tests.data_prep.test_shards import zstd_zeros

    (tmp_path / "bomb.txt.zst").write_bytes(zstd_zeros(256 << 20, content_size=False))
    tracemalloc.start()
    ((skip, _),) = read_all(tmp_path / "bomb.txt.zst")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert skip.reason.startswith("decompresses to more than 67,108,864 bytes"), skip.reason
    assert "--max-expansion" in skip.reason
    assert peak < 160 << 20, peak  # at most 64 MiB decoded at once, and its join; the old reader: 512 MiB
    f = InputFile(str(tmp_path / "bomb.txt.zst"), (tmp_path / "bomb.txt.zst").stat().st_size)
    (doc,) = iter_documents(f, "auto", "text", "id", 64 << 20, max_expansion=1e6)  # allowed: it reads
    assert doc.size == 256 << 20


def test_an_overlong_json_line_is_skipped_and_the_next_is_read():
    import io

    from pico.data_prep.sources import iter_lines

    data = b"a\n" + b"x" * 100 + b"\nb\n" + b"y" * 60
    assert list(iter_lines(io.BytesIO(data), block=16, max_line=50)) == [b"a", None, b"b", None]
    assert list(iter_lines(io.BytesIO(data), block=16, max_line=100)) == [b"a", b"x" * 100, b"b", b"y" * 60]


def test_linked_folders_are_read_once_loops_end_and_broken_links_are_skips(tmp_path):
    """Issue 28: a linked subfolder's documents were dropped silently; a broken link aborted the job."""
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "a" / "one.txt").write_bytes(b"1")
    (elsewhere / "two.txt").write_bytes(b"2")
    (root / "linked").symlink_to(elsewhere)  # followed
    (root / "a" / "loop").symlink_to(root)  # back up: walked once
    (root / "again").symlink_to(root / "a")  # a second way to a/: walked once
    (root / "gone.txt").symlink_to(tmp_path / "missing.txt")  # broken
    files, problems = expand_inputs([str(root)])
    assert sorted(os.path.relpath(f.url, root) for f in files) == ["a/one.txt", "linked/two.txt"]
    reasons = {os.path.relpath(p.source, root): (p.kind, p.reason) for p in problems}
    assert reasons["gone.txt"] == ("failed", f"broken symbolic link (to {tmp_path / 'missing.txt'}); fix or remove it")
    assert reasons["a/loop"][0] == reasons["again"][0] == "excluded"
    assert f"a link to {root}, which is already read" in reasons["a/loop"][1]
    assert sorted(reasons) == ["a/loop", "again", "gone.txt"]


def test_the_output_as_input_is_named_as_such(tmp_path):
    files, problems = expand_inputs([str(tmp_path / "out"), str(tmp_path / "out" / "sub")], exclude=str(tmp_path / "out"))
    assert not files and [p.reason.split(" (")[0] for p in problems] == [f"this input is the output directory {tmp_path / 'out'}"] * 2


def test_a_hostile_json_line_is_a_recorded_skip_and_a_huge_id_its_hash(tmp_path):
    """400 KB of [ once raised RecursionError and failed the whole job on every rerun; an id of 100 MB would be
    repeated in each of its samples' metadata, past what the shard readers accept."""
    from pico.data_prep.sources import MAX_ID_CHARS

    lines = ["[" * 400_000, json.dumps({"text": "fine", "id": "x" * (MAX_ID_CHARS + 1)}),
             json.dumps({"text": "also fine", "id": "short"})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    items = [item for item, _ in read_all(tmp_path / "a.jsonl")]
    assert items[0].kind == "failed" and items[0].reason == "JSON nested too deeply to read" and items[0].line == 1
    assert items[1].id.startswith("sha256:") and len(items[1].id) == 7 + 64 and items[2].id == "short"
    assert items[1].held == 4  # in memory until written: counted by the reader's read-ahead


def test_a_document_of_many_chunks_has_keys_pico_reads_back():
    from pico.data_prep.shards import KEY, sample_key

    assert KEY.match(sample_key(bytes(16), 123_456, 200_000))
