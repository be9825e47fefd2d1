"""Whole prep jobs on a real local Ray: round trip, bad inputs, dedup, split, resume, verify, CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zstandard

from pico.data_prep import prepare, verify
from pico.data_prep.cli import main as prep_main
from pico.data_prep.config import PrepConfig
from pico.data_prep.job import run_job
from pico.configs.errors import UserError

from .conftest import read_documents, words

pytestmark = pytest.mark.ray
QUIET = {"progress": False}


def adds_up(m: dict) -> bool:
    d = m["documents"]
    return d["read"] == d["written"] + d["deduplicated"] + d["empty"] + d["failed"]


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def without_output(m: dict) -> dict:
    return {**m, "config": {k: v for k, v in m["config"].items() if k != "output"}}


def test_round_trip_every_format_byte_exact(ray_local, corpus_dir, tmp_path):
    root, expected = corpus_dir
    out = tmp_path / "out"
    m = prepare([str(root)], str(out), val_fraction=0.3, shard_bytes=8192, chunk_bytes=700, unit_bytes=3000, **QUIET)
    assert read_documents(str(out)) == expected
    assert m["documents"] == {"read": len(expected), "written": len(expected), "deduplicated": 0, "empty": 0, "failed": 0}
    names = [s["name"] for s in m["shards"]]
    for split in ("train", "val"):
        mine = [n for n in names if n.startswith(split)]
        assert mine == [f"{split}-{i:06d}.tar" for i in range(len(mine))] and mine
        assert m["totals"][split]["shards"] == len(mine)
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["manifest.json"])  # _work is gone
    assert sum(t["raw_bytes"] for t in m["totals"].values()) == sum(map(len, expected.values()))
    assert verify(str(out)) == []


def test_bad_inputs_are_named_recorded_and_the_job_goes_on(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.txt").write_bytes(b"good document")
    (src / "bad.txt.gz").write_bytes(b"not gzip")
    (src / "cut.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(words(3, 3000))[:-100])
    (src / "cut.txt.xz").write_bytes(b"\xfd7zXZ\x00 broken")
    (src / "empty.txt").write_bytes(b"")
    (src / "rows.jsonl").write_bytes(b'{"text": "one"}\n{oops\n{"body": "two"}\n{"text": ""}\n{"text": "three"}\n')
    out = tmp_path / "out"
    m = prepare([str(src), str(tmp_path / "missing" / "*.txt")], str(out), **QUIET)
    assert m["documents"] == {"read": 10, "written": 3, "deduplicated": 0, "empty": 2, "failed": 5}
    assert adds_up(m)
    reasons = {(os.path.basename(s["source"]), s["line"]): s["reason"] for s in m["skipped"]}
    assert reasons[("*.txt", None)] == "no file matched this input"
    assert "corrupt or truncated gzip" in reasons[("bad.txt.gz", None)]
    assert "corrupt or truncated zstd" in reasons[("cut.txt.zst", None)]
    assert "corrupt or truncated xz" in reasons[("cut.txt.xz", None)]
    assert reasons[("empty.txt", None)] == "empty document"
    assert "invalid JSON" in reasons[("rows.jsonl", 2)] and "missing text field" in reasons[("rows.jsonl", 3)]
    assert reasons[("rows.jsonl", 4)] == "empty document"
    assert sorted(read_documents(str(out)).values()) == [b"good document", b"one", b"three"]

    with pytest.raises(UserError, match=r"rows.jsonl line 2: invalid JSON.*--fail-fast"):
        prepare([str(src / "rows.jsonl")], str(tmp_path / "ff"), fail_fast=True, **QUIET)
    assert not (tmp_path / "ff" / "manifest.json").exists()


def test_no_input_matched_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"no input matched: .*nothing-here.*no file matched"):
        prepare([str(tmp_path / "nothing-here")], str(tmp_path / "out"), **QUIET)


def test_dedup_keeps_the_first_occurrence_and_is_deterministic(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    same = words(5, 100)
    (src / "a.txt").write_bytes(same)
    (src / "b.txt.gz").write_bytes(gzip.compress(same))
    (src / "c.jsonl").write_text("\n".join(json.dumps({"id": f"r{i}", "text": t}) for i, t in
                                           enumerate([same.decode(), "unique", "unique", "other"])) + "\n")
    runs = []
    for name in ("x", "y"):
        m = prepare([str(src)], str(tmp_path / name), dedup=True, unit_bytes=1, **QUIET)
        runs.append((without_output(m), shard_digests(tmp_path / name)))
    m = runs[0][0]
    assert m["documents"] == {"read": 6, "written": 3, "deduplicated": 3, "empty": 0, "failed": 0}
    docs = read_documents(str(tmp_path / "x"))
    assert set(docs) == {"in/a.txt", "r1", "r3"}
    assert runs[0] == runs[1]
    plain = prepare([str(src)], str(tmp_path / "z"), **QUIET)
    assert plain["documents"]["written"] == 6


def test_split_depends_only_on_document_identity(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        (src / f"d{i:02d}.txt").write_bytes(words(i, 30))
    val_ids = []
    for name, unit_bytes, workers in (("a", 1, 2), ("b", 1, 1), ("c", 10**6, 2)):
        m = prepare([str(src)], str(tmp_path / name), val_fraction=0.3, unit_bytes=unit_bytes, workers=workers, **QUIET)
        ids = set()
        for s in m["shards"]:
            if s["split"] == "val":
                out = subprocess.run(["tar", "-xOf", str(tmp_path / name / s["name"]), "--wildcards", "*.json"],
                                     capture_output=True, check=True).stdout
                ids |= {json.loads(x)["id"] for x in out.replace(b"}{", b"}\n{").splitlines()}
        val_ids.append(ids)
    assert val_ids[0] == val_ids[1] == val_ids[2] and 4 <= len(val_ids[0]) <= 20
    assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b")  # same units, other worker count


def test_the_same_corpus_anywhere_gives_the_same_split_and_shards_that_name_no_local_path(ray_local, tmp_path):
    """A document is known by its path from the folder holding its input, not by where the corpus sits: a
    corpus moved (or copied to a bucket) prepares to the same train/val split, sample keys and shard bytes."""
    homes = [tmp_path / "here" / "corpus", tmp_path / "elsewhere" / "deeper" / "corpus"]
    for home in homes:
        (home / "novels").mkdir(parents=True)
        for i in range(30):
            (home / "novels" / f"d{i:02d}.txt").write_bytes(words(i, 30))
        (home / "code.jsonl").write_text("".join(json.dumps({"text": words(100 + i, 20).decode()}) + "\n"
                                                 for i in range(10)))
        (home / "novels" / "zz-empty.txt").write_bytes(b"")
        (home / "novels" / "zz-link.txt").symlink_to(home.parent / "gone" / "away.txt")  # broken, absolute
    outs = [tmp_path / f"out{n}" for n in range(2)]
    manifests = [prepare([str(home / "novels"), str(home / "code.jsonl")], str(out), val_fraction=0.3, **QUIET)
                 for home, out in zip(homes, outs)]
    assert shard_digests(outs[0]) == shard_digests(outs[1]) and any("val" in n for n in shard_digests(outs[0]))
    assert manifests[0]["skipped"] == [
        {"source": "novels/zz-link.txt", "line": None, "reason": "broken symbolic link (to .../away.txt); fix or remove it"},
        {"source": "novels/zz-empty.txt", "line": None, "reason": "empty document"}]
    # the manifest is the same file too, and names no local path: inputs by name, the output left out
    assert (outs[0] / "manifest.json").read_bytes() == (outs[1] / "manifest.json").read_bytes()
    assert str(tmp_path) not in (outs[0] / "manifest.json").read_text()
    assert manifests[0]["config"]["inputs"] == ["novels", "code.jsonl"] and "output" not in manifests[0]["config"]
    docs = read_documents(str(outs[0]))
    assert "novels/d00.txt" in docs and "code.jsonl#1" in docs
    for tar in outs[0].glob("*.tar"):
        assert str(tmp_path).encode() not in tar.read_bytes()
    # a finished job is found again from the corpus wherever it sits, and from a manifest written by the
    # pico prep before this one (which recorded the inputs and the output as given)
    inputs = [str(homes[1] / "novels"), str(homes[1] / "code.jsonl")]
    assert run_job(PrepConfig(inputs=inputs, output=str(outs[0]), val_fraction=0.3), progress=False)[1]["already_complete"]
    old = PrepConfig(inputs=inputs, output=str(outs[1]), val_fraction=0.3)
    (outs[1] / "manifest.json").write_text(json.dumps({**manifests[1], "config": old.output_options()}))
    assert run_job(old, progress=False)[1]["already_complete"]


def test_rerun_of_a_finished_job_changes_nothing_and_other_options_are_refused(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    out = str(tmp_path / "out")
    first = prepare([str(src)], out, **QUIET)
    again, stats = run_job(PrepConfig(inputs=[str(src)], output=out), progress=False)
    assert again == first and stats["already_complete"]
    with pytest.raises(UserError, match="other options.*--overwrite"):
        prepare([str(src)], out, zstd_level=9, **QUIET)
    with pytest.raises(UserError, match="other options"):  # it decides which files are read: not a finished job
        prepare([str(src)], out, max_expansion=5000.0, **QUIET)
    # a manifest from before max_expansion was recorded: found again at the default, not with another value
    m = json.loads((Path(out) / "manifest.json").read_text())
    del m["config"]["max_expansion"]
    (Path(out) / "manifest.json").write_text(json.dumps(m))
    assert run_job(PrepConfig(inputs=[str(src)], output=out), progress=False)[1]["already_complete"]
    with pytest.raises(UserError, match="other options"):
        prepare([str(src)], out, max_expansion=5000.0, **QUIET)
    assert prepare([str(src)], out, zstd_level=9, overwrite=True, **QUIET)["config"]["zstd_level"] == 9


def kill_one_worker(out: Path, after_done: int, victims: list[int], timeout: float = 60) -> None:
    """kill -9 the Ray worker running a unit of the job at `out`, once `after_done` units are done."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(out.glob("_work/u*/done.json"))) >= after_done:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if (p.info["cmdline"] or [""])[0].startswith("ray::run_unit"):
                    os.kill(p.info["pid"], signal.SIGKILL)
                    victims.append(p.info["pid"])
                    return
        time.sleep(0.02)


@pytest.mark.slow
def test_resume_after_kill_9_of_the_driver_gives_identical_shards(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(10):
        (src / f"d{i}.txt").write_bytes(words(i, 30_000))
    opts = {"zstd_level": 19, "unit_bytes": 1, "workers": 1, "val_fraction": 0.2, "shard_bytes": 80_000}
    flags = [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    killed = tmp_path / "killed"
    address = ray_local.get_runtime_context().gcs_address
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pico.pipeline.cli", "prep", "--input", str(src), "--output",
                                 str(killed), "--ray-address", address, "--no-progress", *flags], stderr=log, stdout=log)
        deadline = time.monotonic() + 60
        while len(list(killed.glob("_work/u*/done.json"))) < 2:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()
            assert time.monotonic() < deadline, "the driver made no progress in 60 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "manifest.json").exists()
    time.sleep(1)  # let Ray reap the dead driver's task
    # the rerun loses a worker to kill -9 as well: Ray retries that unit from scratch
    done_before = len(list(killed.glob("_work/u*/done.json")))
    victims: list[int] = []
    killer = threading.Thread(target=kill_one_worker, args=(killed, done_before + 1, victims), daemon=True)
    killer.start()
    resumed, stats = run_job(PrepConfig(inputs=[str(src)], output=str(killed), **opts), progress=False)
    killer.join()
    assert victims, "no Ray worker was running a unit to kill"
    assert 2 <= stats["units_resumed"] < stats["units"] == 10
    clean = prepare([str(src)], str(tmp_path / "clean"), **opts, **QUIET)
    assert without_output(resumed) == without_output(clean)
    assert shard_digests(killed) == shard_digests(tmp_path / "clean") and len(shard_digests(killed)) >= 10
    assert verify(str(killed)) == []


def test_verify_reports_flipped_byte_truncation_missing_and_extra_shards(ray_local, corpus_dir, tmp_path, capsys):
    root, _ = corpus_dir
    out = tmp_path / "out"
    m = prepare([str(root)], str(out), shard_bytes=8192, val_fraction=0.2, **QUIET)
    train = [s["name"] for s in m["shards"] if s["split"] == "train"]
    assert len(train) >= 4
    flipped, cut, gone = out / train[0], out / train[1], out / train[2]
    data = bytearray(flipped.read_bytes())
    size = int(data[124:136].rstrip(b"\0 ") or b"0", 8)  # the first member's (a payload's) size, from its header
    data[512 + size // 2] ^= 0x01  # inside the first payload
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:3000])
    gone.rename(out / "train-999999.tar")
    problems = verify(str(out))
    text = "\n".join(problems)
    assert f"{flipped}: sha256" in text and f"{flipped}: sample" in text
    assert f"{cut}: truncated or corrupt tar" in text
    assert f"{gone}: listed in manifest.json but missing" in text
    assert f"{out / 'train-999999.tar'}: shard not listed" in text
    assert prep_main(["verify", str(out)]) == 1
    assert "problems" in capsys.readouterr().err
    assert prep_main(["verify", str(tmp_path)]) == 1  # no manifest at all


def test_cli_prints_one_json_object(ray_local, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    (src / "b.jsonl").write_bytes(b'{"text": "beta"}\n')
    assert prep_main(["--input", str(src), "--output", str(tmp_path / "out"), "--json", "--no-progress",
                      "--shard-bytes", "64K"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert ray_local.is_initialized()  # this process's Ray was reused, and left running
    assert summary["documents"]["written"] == 2 and summary["shards"]["train"] + summary["shards"]["val"] >= 1
    assert prep_main(["verify", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.slow
def test_cli_starts_and_stops_its_own_ray_and_keeps_stdout_for_json(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-m", "pico.pipeline.cli", "prep", "--input", str(src), "--output",
                          str(tmp_path / "out"), "--workers", "1", "--json"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["documents"]["written"] == 1  # exactly one JSON object on stdout
    assert "Started a local Ray instance" in out.stderr


def test_bad_option_is_a_user_error_with_exit_2(tmp_path, capsys):
    from pico.pipeline.cli import main

    assert main(["prep", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--val-fraction", "2"]) == 2
    assert "--val-fraction=2.0 must lie in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prep", "--input", "x", "--output", "y", "--shard-bytes", "lots"])
    assert "is not a size" in capsys.readouterr().err


def test_an_unfinished_job_resumes_only_with_the_same_options(ray_local, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b'{"text": "fine"}\nnot json\n')
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match="a.jsonl line 2"):
        prepare([str(src)], out, fail_fast=True, **QUIET)  # leaves an unfinished job behind
    with pytest.raises(UserError, match=r"unfinished job with other options \(zstd_level\).*--overwrite"):
        prepare([str(src)], out, zstd_level=5, **QUIET)
    (src / "b.txt").write_bytes(b"new file")
    with pytest.raises(UserError, match="unfinished job with other input files"):
        prepare([str(src)], out, **QUIET)
    plan = Path(out) / "_work" / "plan.json"  # as the pico prep before portable names wrote it: [url, size]
    old = json.loads(plan.read_text())
    plan.write_text(json.dumps({**old, "units": [[f[:2] for f in unit] for unit in old["units"]]}))
    with pytest.raises(UserError, match="unfinished job of an older pico prep.*--overwrite"):
        prepare([str(src)], out, **QUIET)
    m = prepare([str(src)], out, overwrite=True, **QUIET)
    assert m["documents"] == {"read": 3, "written": 2, "deduplicated": 0, "empty": 0, "failed": 1}


def test_duplicate_ordinals_keep_the_first_in_input_order():
    from pico.data_prep.job import duplicate_ordinals

    a, b, c = (bytes([i]) * 16 for i in (1, 2, 3))
    assert duplicate_ordinals([a + b, b"", c + a + a, b + c]) == {2: [1, 2], 3: [0, 1]}
    assert duplicate_ordinals([b"", b""]) == {}


def test_a_unit_that_reads_other_documents_than_its_dedup_pass_fails_rather_than_drop_the_wrong_ones(tmp_path):
    from pico.data_prep.job import run_unit

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    options = PrepConfig(inputs=[str(src)], output=str(tmp_path / "out"), dedup=True).to_dict()
    files = [[str(src), src.stat().st_size, "in.jsonl"]]
    with pytest.raises(RuntimeError, match="read 3 documents where its dedup pass read 4"):
        run_unit(options, 0, files, [1], hashed=4)
    assert not (tmp_path / "out" / "_work" / "u000000" / "done.json").exists()
    assert run_unit(options, 0, files, [1], hashed=3)["documents"]["deduplicated"] == 1
