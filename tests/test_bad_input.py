"""Bad input, as a suite: the CLI run the way a skeptical new user runs it (issue 19).

Each case calls the `pico` entry point with bad config values, damaged files, a full or
read-only disk or an unreachable S3 endpoint, and asserts: a non-zero exit, one line on stderr
that names the thing, no traceback, and nothing lost that was there before.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pico.pipeline.cli import main
from tests.conftest import free_port
from tests.fsfaults import read_only_dir  # noqa: F401 (fixture)
from tests.pipeline.release.test_release import release, zero0  # noqa: F401 (fixtures)


def refused(capsys, argv: list[str], *needles: str, code: int = 2) -> str:
    """Run `pico ARGV`; assert exit `code`, no traceback and one `pico` line holding every needle; return it."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("pico")]  # DeepSpeed may print its build note
    assert rc == code, err
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(zero0) -> Path:
    """A one-rank ZeRO-0 checkpoint in pico's layout (test_release's), and `release` its release."""
    return zero0


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("override, says", [
    ("--optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("--optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("--optim.weight_decay=-1", "optim.weight_decay=-1.0 must be >= 0"),
    ("--optim.grad_clip=nan", "optim.grad_clip=nan must be a finite number"),
    ("--model.capacity=nan", "model.capacity=nan must be a finite number"),
])
def test_non_finite_or_negative_config_values_are_refused_at_validation(capsys, tmp_path, override, says):
    refused(capsys, ["train", override, f"--train.out_dir={tmp_path / 'run'}"], says)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- generate and eval


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_temperature_must_be_finite(capsys, release, value):
    refused(capsys, ["generate", "--model", str(release), "--prompt", "a", "--temperature", value],
            f"--temperature {float(value)}", "finite number >= 0")


@pytest.mark.parametrize("value", [10**9, 100_000])
def test_generate_context_is_bounded_by_the_model(capsys, release, value):
    """Issue 28: --context 10**9 sized caches from it; 100000 was accepted silently on a model trained shorter."""
    max_seq_len = json.loads((release / "config.json").read_text())["model"]["max_seq_len"]
    refused(capsys, ["generate", "--model", str(release), "--prompt", "a", "--context", str(value)],
            f"--context {value}: this model supports at most {max_seq_len} bytes")


def test_eval_json_of_a_one_byte_file_is_valid_json(capsys, release, tmp_path):
    (tmp_path / "one.txt").write_bytes(b"x")
    assert main(["eval", "--model", str(release), "--data", str(tmp_path / "one.txt"), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in JSON output: {out}"))
    assert result["bytes"] == 2  # the byte and the EOS that ends the document (see eval_packing)


def test_eval_json_on_failure_is_one_json_object(capsys, release, tmp_path):
    """Issue 28: the README promised valid JSON always, but a failure printed nothing on stdout."""
    assert main(["eval", "--model", str(release), "--data", str(tmp_path / "missing.txt"), "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == {"model": str(release), "error": f"--data {tmp_path / 'missing.txt'}: no such file, "
                                                              "shard directory or .tar"}
    assert err.count("pico eval: error:") == 1


def test_eval_corrupt_shard_offers_what_eval_can_do(capsys, release, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "val-000000.tar").write_bytes(b"\x00garbage" * 200)
    line = refused(capsys, ["eval", "--model", str(release), "--data", str(shards)], "val-000000.tar",
                   "re-run `pico prep` for it")
    assert "skip_corrupt" not in line


def write_train_only_shards(d: Path) -> Path:
    d.mkdir()
    (d / "train-000000.tar").write_bytes(b"")
    (d / "manifest.json").write_text(json.dumps({"version": 1, "shards": [{"name": "train-000000.tar",
                                                                          "split": "train"}]}))
    return d


def test_a_corrupt_member_is_named_as_stored(capsys, release, tmp_path):
    """Issue 28: a shard made with `tar -cf x.tar ./KEY.*` had its corrupt member named `.bin.zst`."""
    import io
    import tarfile

    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "val-000000.tar", "w") as tar:
        for name, data in (("./abc.bin.zst", b"not zstd"), ("./abc.json", b'{"bytes": 3}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    refused(capsys, ["eval", "--model", str(release), "--data", str(tmp_path / "shards")],
            "member ./abc.bin.zst: not a zstd frame")


def test_no_val_split_says_how_to_get_one(capsys, release, tmp_path):
    shards = write_train_only_shards(tmp_path / "shards")
    refused(capsys, ["train", f"--data.train=[{shards}]", f"--train.out_dir={tmp_path / 'run'}"],
            "no validation split", "lists no val shards", "data.val", "--val-fraction")
    refused(capsys, ["eval", "--model", str(release), "--data", str(shards)], "lists no val shards", "--split")


# ----------------------------------------------------------------------------- decompression bombs


def bomb_shard(d: Path, name: str = "val-000000.tar") -> Path:
    """A shard of one good sample and one whose 8 KB zstd frame expands to 256 MiB (its JSON says 5 bytes)."""
    import zstandard

    from pico.data_prep.shards import sample_bytes
    from tests.data_prep.test_shards import zstd_zeros

    d.mkdir()
    good = zstandard.ZstdCompressor(write_content_size=True).compress(b"hello")
    meta = json.dumps({"source": "s", "id": "0", "chunk": 0, "n_chunks": 1, "bytes": 5}).encode()
    tar = sample_bytes("00" * 12, good, meta) + sample_bytes("ab" * 12, zstd_zeros(256 << 20), meta)
    (d / name).write_bytes(tar + bytes(1024 + -(len(tar) + 1024) % 10240))
    return d / name


def test_a_bomb_in_a_shard_is_one_line_naming_shard_and_member(capsys, release, tmp_path):
    """Issue 28: a 100 KB sample expanding to 3 GB took pico eval to 9.7 GB RSS."""
    shard = bomb_shard(tmp_path / "shards")
    refused(capsys, ["eval", "--model", str(release), "--data", str(shard.parent)], str(shard),
            f"member {'ab' * 12}.bin.zst: decompresses to 268,435,456 bytes", "limit")
    assert main(["prep", "verify", str(shard.parent)]) == 1  # no manifest: the listing names that first
    out = tmp_path / "out"
    (tmp_path / "in.txt").write_bytes(b"alpha")
    assert main(["prep", "--input", str(tmp_path / "in.txt"), "--output", str(out), "--no-progress"]) == 0
    shutil.copy(shard, out / "train-000000.tar")  # the bomb in place of a real shard
    capsys.readouterr()
    assert main(["prep", "verify", str(out)]) == 1
    assert f"sample {'ab' * 12}: member {'ab' * 12}.bin.zst: decompresses to 268,435,456" in capsys.readouterr().out


def test_a_compressed_bomb_among_prep_inputs_is_skipped_and_the_rest_written(capsys, tmp_path):
    import gzip

    from tests.data_prep.test_shards import zstd_zeros

    src = tmp_path / "in"
    src.mkdir()
    (src / "good.txt").write_bytes(b"alpha")
    (src / "bomb.txt.zst").write_bytes(zstd_zeros(256 << 20, content_size=False))
    with gzip.open(src / "rows.jsonl.gz", "wb", compresslevel=1) as f:  # a good row, then a 100 MiB one
        f.write(b'{"text": "beta"}\n{"text": "' + b"a" * (100 << 20) + b'"}\n')
    assert main(["prep", "--input", str(src), "--output", str(tmp_path / "out"), "--no-progress",
                 "--max-expansion=100", "--val-fraction=0", "--json"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = {Path(s["source"]).name: s for s in m["skipped"]}
    assert sorted(skipped) == ["bomb.txt.zst", "rows.jsonl.gz"], skipped
    assert all(s["reason"].startswith("decompresses to more than 67,108,864 bytes") for s in skipped.values())
    assert skipped["rows.jsonl.gz"]["line"] == 2 and m["documents"]["written"] == 2  # alpha, beta


# ----------------------------------------------------------------------------- pico prep outputs


def test_prep_output_that_is_a_file(capsys, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"alpha")
    (tmp_path / "afile").write_bytes(b"keep me")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        refused(capsys, ["prep", "--input", str(tmp_path / "in.txt"), "--output", str(out), "--no-progress"],
                f"{tmp_path / 'afile'} is a file, not a directory")
    assert (tmp_path / "afile").read_bytes() == b"keep me"


def test_prep_output_on_a_read_only_filesystem(capsys, tmp_path, read_only_dir):  # noqa: F811
    (tmp_path / "in.txt").write_bytes(b"alpha")
    refused(capsys, ["prep", "--input", str(tmp_path / "in.txt"), "--output", str(read_only_dir / "out"),
                     "--no-progress"], f"cannot write the output {read_only_dir / 'out'}", "choose a directory")


def test_prep_output_on_an_unreachable_s3_endpoint(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    import s3fs

    # s3fs caches its filesystems by arguments, not by environment: an earlier test's instance
    # (pointing at the suite's moto server) would otherwise serve this one in the driver.
    s3fs.S3FileSystem.clear_instance_cache()
    (tmp_path / "in.txt").write_bytes(b"alpha")
    refused(capsys, ["prep", "--input", str(tmp_path / "in.txt"), "--output", "s3://pico-out/x", "--no-progress"],
            "cannot open the output s3://pico-out/x", "AWS_ENDPOINT_URL")


def test_prep_damaged_manifest_is_kept_and_named(capsys, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"alpha")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_bytes(b'{"shards": [')
    refused(capsys, ["prep", "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out"), "--no-progress"],
            "manifest.json is damaged (not JSON); pass --overwrite")
    assert (tmp_path / "out" / "manifest.json").read_bytes() == b'{"shards": ['



def test_prep_reads_linked_folders_and_records_a_broken_link(capsys, tmp_path):
    """Issue 28: 1 of 4 documents read from a folder with a linked subfolder; a broken link aborted the job."""
    src, shared = tmp_path / "in", tmp_path / "shared"
    src.mkdir()
    shared.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    for name in ("b", "c", "d"):
        (shared / f"{name}.txt").write_bytes(name.encode() * 3)
    (src / "more").symlink_to(shared)
    (src / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    argv = ["prep", "--input", str(src), "--output", str(tmp_path / "out"), "--no-progress", "--val-fraction=0"]
    assert main(argv) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["documents"]["written"] == 4
    assert [s["source"] for s in m["skipped"]] == ["in/gone.txt"]  # by name: the manifest names no local path
    assert f"{src / 'gone.txt'}: broken symbolic link" in capsys.readouterr().err  # the terminal says where


def test_prep_output_that_is_its_input(capsys, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"alpha")
    refused(capsys, ["prep", "--input", str(tmp_path), "--output", str(tmp_path), "--no-progress"],
            f"this input is the output directory {tmp_path}", "choose an --output elsewhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_a_second_prep_on_one_output_is_refused_naming_the_first(capsys, tmp_path):
    """Issue 28: two jobs on one output ran unlocked. The holder is a real process; kill -9 frees the output."""
    from tests.configs.test_lock import Holder

    (tmp_path / "in.txt").write_bytes(b"alpha")
    argv = ["prep", "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out"), "--no-progress"]
    with Holder(tmp_path / "out", "pico prep") as first:
        refused(capsys, argv, f"{tmp_path / 'out'} is in use by pico prep (pid {first.proc.pid} on")
        assert [p.name for p in (tmp_path / "out").iterdir()] == [".pico.lock"]  # nothing written
        first.kill()
        assert main(argv) == 0


def test_a_second_trainer_on_one_run_directory_is_refused_naming_the_first(capsys, tmp_path):
    """Issue 28: two trainers on one out_dir both exited 0, one's checkpoints replacing the other's."""
    from tests.configs.test_lock import Holder

    argv = ["train", f"--train.out_dir={tmp_path / 'run'}", "--data.train=[unused]"]
    with Holder(tmp_path / "run", "pico train") as first:
        refused(capsys, argv, f"{tmp_path / 'run'} is in use by pico train (pid {first.proc.pid} on", "Wait for it")
        first.kill()  # a crash: the next trainer takes over and gets as far as its data
        refused(capsys, argv, "unused does not exist")
    assert list((tmp_path / "run").iterdir()) == []  # and lets go when it stops
    # two runs sharing a checkpoint.dir outside their run directories: a save clears the other's debris
    argv = ["train", f"--train.out_dir={tmp_path / 'other'}", f"--checkpoint.dir={tmp_path / 'ckpts'}",
            "--data.train=[unused]"]
    with Holder(tmp_path / "ckpts", "pico train") as first:
        refused(capsys, argv, f"{tmp_path / 'ckpts'} is in use by pico train (pid {first.proc.pid} on")


# ----------------------------------------------------------------------------- pico convert over what is there


def test_convert_keeps_what_is_in_out(capsys, ckpt, release, tmp_path):
    from tests.pipeline.release.test_release import make_zero0_checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(capsys, ["convert", str(ckpt), str(out)], f"{out} exists and is not a pico release")
    assert snapshot(out) == {"notes.txt": b"mine"}

    rel = Path(shutil.copytree(release, tmp_path / "rel"))
    (rel / "notes.txt").write_text("mine")
    (rel / "eval").mkdir()
    (rel / "eval" / "bpb.json").write_text("{}")
    before = snapshot(rel)
    assert main(["convert", str(ckpt), str(rel)]) == 0  # identical: a no-op
    assert snapshot(rel) == before
    other = make_zero0_checkpoint(tmp_path / "other", seed=1)
    refused(capsys, ["convert", str(other), str(rel)], "holds a different release", "--overwrite")
    assert snapshot(rel) == before
    assert main(["convert", str(other), str(rel), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "kept its other files: eval, notes.txt" in err
    after = snapshot(rel)
    assert after["notes.txt"] == b"mine" and after["eval/bpb.json"] == b"{}"
    assert after["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out", "rel"]  # no temporary debris


def test_convert_removes_what_a_killed_convert_left_beside_it(capsys, ckpt, tmp_path):
    """Issue 28: kill -9 during convert left hidden `.OUT.tmp-PID` folders (9.8 MB each) that nothing removed."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    debris = [f".rel.tmp-{dead}", f".other.tmp-{dead}@{host}", f".gone.old-{dead}@{host}"]
    kept = [f".rel.tmp-{os.getppid()}@{host}", f".rel.tmp-{dead}@another-node", "notes"]  # a live pid, another node
    for name in debris + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    assert main(["convert", str(ckpt), str(tmp_path / "rel")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["rel", "gone"])
    assert (tmp_path / "gone" / "model.safetensors").read_bytes() == b"x"  # a release set aside mid-swap: put back


# ----------------------------------------------------------------------------- checkpoints from elsewhere


class _RunsShell:
    """Unpickling this runs a shell command: what a crafted checkpoint does."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return os.system, (self.cmd,)


def test_a_malicious_checkpoint_runs_nothing(capsys, ckpt, tmp_path):
    import torch

    bad = Path(shutil.copytree(ckpt.parent.parent, tmp_path / "run"))
    step = bad / "checkpoints" / ckpt.name
    mark = tmp_path / "pwned"
    states = step / "ds" / "mp_rank_00_model_states.pt"
    good = torch.load(states, weights_only=True)
    torch.save({**good, "extra": _RunsShell(f"touch {mark}")}, states)
    for argv in (["generate", "--model", str(step), "--prompt", "a", "--max-bytes", "1"],
                 ["eval", "--model", str(step), "--data", str(states)],
                 ["convert", str(step), str(tmp_path / "rel")]):
        refused(capsys, argv, "mp_rank_00_model_states.pt", "--trust-checkpoint")
    torch.save(good, states)  # resume: now the trainer's own per-rank file is the crafted one
    torch.save({"loader": {}, "rng": _RunsShell(f"touch {mark}")}, step / "rank00000.pt")
    refused(capsys, ["train", "--resume", f"--train.out_dir={bad}", "--data.train=[unused]"],
            "rank00000.pt would call posix.system when unpickled", "--trust-checkpoint")
    assert not mark.exists() and not (tmp_path / "rel").exists()
    torch.load(step / "rank00000.pt", weights_only=False)  # control: the crafted file is live
    assert mark.exists()


def test_a_refused_protocol_4_pickle_names_its_global(capsys, ckpt, tmp_path):
    """Issue 28: STACK_GLOBAL (protocol 4+) stopped torch's scanner, and the refusal named `<Unsupported operand 147>`."""
    import torch

    step = Path(shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name))
    states = step / "ds" / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=True), "x": _RunsShell("true")}, states, pickle_protocol=4)
    line = refused(capsys, ["convert", str(step), str(tmp_path / "rel")],
                   "mp_rank_00_model_states.pt would call posix.system when unpickled")
    assert "Unsupported operand" not in line


def _linked_ds(run: Path, step: Path, shape: str, elsewhere: Path) -> None:
    """Make `step/ds` reach a file outside the step directory through a link, in one of three shapes."""
    ds = step / "ds"
    if shape == "dir inside the run":
        shutil.move(ds, run / "stash")
        (step / "ds").symlink_to(Path("..", "..", "stash"))  # relative: travels inside a tarball of the run
    elif shape == "dir outside the run":
        shutil.move(ds, elsewhere / "ds")
        ds.symlink_to(elsewhere / "ds")
    else:  # one file
        shutil.move(ds / "mp_rank_00_model_states.pt", elsewhere / "states.pt")
        (ds / "mp_rank_00_model_states.pt").symlink_to(elsewhere / "states.pt")


@pytest.mark.parametrize("shape", ["dir inside the run", "dir outside the run", "file"])
def test_a_symlink_in_a_checkpoint_is_refused_before_anything_unpickles(capsys, ckpt, tmp_path, shape):
    """Issue 28: the scan did not enter a linked `ds`, and DeepSpeed then unpickled through it in full."""
    import torch

    run = Path(shutil.copytree(ckpt.parent.parent, tmp_path / "run"))
    step, elsewhere, mark = run / "checkpoints" / ckpt.name, tmp_path / "elsewhere", tmp_path / "pwned"
    elsewhere.mkdir()
    states = step / "ds" / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=True), "extra": _RunsShell(f"touch {mark}")}, states)
    _linked_ds(run, step, shape, elsewhere)
    for argv in (["train", "--resume", f"--train.out_dir={run}", "--data.train=[unused]"],
                 ["generate", "--model", str(step), "--prompt", "a", "--max-bytes", "1"],
                 ["convert", str(step), str(tmp_path / "rel")]):
        refused(capsys, argv, "is a symbolic link", "--trust-checkpoint")
    assert not mark.exists() and not (tmp_path / "rel").exists()
    torch.load(states, weights_only=False)  # control: through the link, the payload is live
    assert mark.exists()


def test_a_linked_step_directory_is_scanned_where_it_points(capsys, ckpt, tmp_path):
    """The step directory itself (or checkpoints/) may be a link, e.g. to scratch: it is resolved, then scanned."""
    import torch

    real = Path(shutil.copytree(ckpt, tmp_path / "scratch" / ckpt.name))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / ckpt.name).symlink_to(real)
    argv = ["train", "--resume", f"--train.out_dir={tmp_path / 'run'}", "--data.train=[unused]"]
    refused(capsys, argv, "has a different model config")  # clean: the scan passed, the run got to its config
    states = real / "ds" / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=True), "extra": _RunsShell("true")}, states)
    refused(capsys, argv, f"{states} would call posix.system", "--trust-checkpoint")


@pytest.mark.parametrize("sizes, says", [({"n_in": 10**9}, "model.n_in=1000000000 makes"),
                                         ({"d_local": 2**22}, "model.d_local=4194304 makes"),
                                         ({"max_seq_len": 10**12}, "model.max_seq_len=1000000000000 makes"),
                                         ({"max_seq_len": 10**6, "window": 10**6}, "attention scores take"),
                                         # the latent blocks' scores are dense over every routed position
                                         ({"max_seq_len": 2**21, "window": 16, "capacity": 1.0},
                                          "makes one sequence's latent attention scores take")])
def test_hostile_sizes_in_a_release_are_refused_before_anything_is_allocated(capsys, release, tmp_path, sizes, says):
    """Issue 28: config.json sizes went to build_model unchecked (an allocator traceback, or all memory).
    The attacker rewrites SHA256SUMS too: it is a checksum, not a signature."""
    from pico.configs.files import sha256_file

    rel = Path(shutil.copytree(release, tmp_path / "rel"))
    config = json.loads((rel / "config.json").read_text())
    config["model"].update(sizes)
    (rel / "config.json").write_text(json.dumps(config))
    (rel / "SHA256SUMS").write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in sorted(rel.iterdir())
                                            if p.name != "SHA256SUMS"))
    refused(capsys, ["generate", "--model", str(rel), "--prompt", "a"], says, "GiB", "nothing was allocated")


def test_hostile_sizes_in_a_checkpoint_are_refused_before_anything_is_allocated(capsys, ckpt, tmp_path):
    step = Path(shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name))
    state = json.loads((step / "pico_state.json").read_text())
    state["config"]["model"]["max_seq_len"] = 10**12
    (step / "pico_state.json").write_text(json.dumps(state))
    for argv in (["generate", "--model", str(step), "--prompt", "a"], ["convert", str(step), str(tmp_path / "rel")]):
        refused(capsys, argv, "pico_state.json: model.max_seq_len=1000000000000 makes one sequence's activations")


def test_damaged_pico_state_is_one_line(capsys, ckpt, tmp_path):
    step = Path(shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name))
    (step / "pico_state.json").write_text('{"step": 5, "conf')
    for argv in (["generate", "--model", str(step), "--prompt", "a"], ["convert", str(step), str(tmp_path / "rel")]):
        refused(capsys, argv, "pico_state.json is damaged (not JSON")
    assert (step / "pico_state.json").read_text() == '{"step": 5, "conf'


@pytest.mark.parametrize("key, value", [("world_size", 10**11), ("world_size", "many"), ("zero_stage", 7)])
def test_impossible_numbers_in_pico_state_are_damage_not_a_hang(capsys, ckpt, tmp_path, key, value):
    step = Path(shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name))
    state = json.loads((step / "pico_state.json").read_text())
    state[key] = value
    (step / "pico_state.json").write_text(json.dumps(state))
    refused(capsys, ["convert", str(step), str(tmp_path / "rel")], "pico_state.json is damaged", f"{key}=")


def test_a_config_section_that_is_not_a_mapping_in_pico_state_is_damage(capsys, ckpt, tmp_path):
    step = Path(shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name))
    state = json.loads((step / "pico_state.json").read_text())
    state["config"]["optim"] = ["lr", 3]
    (step / "pico_state.json").write_text(json.dumps(state))
    refused(capsys, ["convert", str(step), str(tmp_path / "rel")], "pico_state.json is damaged",
            "config.optim is a list")


@pytest.mark.parametrize("size", [2**45, -5])
def test_a_tar_header_claiming_petabytes_is_refused_before_it_is_read(capsys, release, tmp_path, size):
    import tarfile

    info = tarfile.TarInfo("abc.bin.zst")
    info.size = size  # base-256 in a GNU header: 1.5 KB of file
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "val-000000.tar").write_bytes(info.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    refused(capsys, ["eval", "--model", str(release), "--data", str(tmp_path / "shards")],
            "val-000000.tar", f"declares {size:,} bytes")


def test_a_manifest_naming_a_shard_outside_its_folder_is_refused(capsys, release, tmp_path):
    shards = write_train_only_shards(tmp_path / "shards")
    (shards / "manifest.json").write_text(json.dumps({"version": 1, "shards": [
        {"name": "../../secret.tar", "split": "val"}]}))
    refused(capsys, ["eval", "--model", str(release), "--data", str(shards)], "manifest.json is not a valid manifest",
            "'../../secret.tar' is not train-NNNNNN.tar")


def test_a_manifest_past_its_bound_is_refused_whatever_size_the_store_reports(capsys, release, tmp_path, monkeypatch):
    from pico.pipeline.data import loader

    monkeypatch.setattr(loader, "MAX_MANIFEST_BYTES", 1 << 10)  # stands for 64 MiB: read that far, no further
    shards = write_train_only_shards(tmp_path / "shards")
    (shards / "manifest.json").write_text(json.dumps({"version": 1, "shards": [], "pad": "x" * 2048}))
    refused(capsys, ["eval", "--model", str(release), "--data", str(shards)], "manifest.json is not a valid manifest",
            "over 1,024 bytes")


def test_a_config_of_nested_aliases_is_one_line_not_gigabytes(capsys, tmp_path):
    """391 bytes of aliases nine levels deep stand for 9**9 strings: refused before any walk writes them out."""
    levels = ["&a [x, x, x, x, x, x, x, x, x]"] + [f"&{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]"
                                                    for i in range(8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("data:\n  train:\n" + "".join(f"    - {lv}\n" for lv in levels))
    refused(capsys, ["train", "--config", str(bomb)], "bomb.yaml: more than 1,000,000 values")
    (tmp_path / "deep.yaml").write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    refused(capsys, ["train", "--config", str(tmp_path / "deep.yaml")], "deep.yaml: cannot be read as YAML")
    (tmp_path / "big.yaml").write_text("# pad\n" * (1 << 20))
    assert "cannot be read" not in refused(capsys, ["train", "--config", str(tmp_path / "big.yaml")],
                                           "big.yaml: not a regular file of at most 4 MiB")


@pytest.mark.parametrize("name, make", [("config.json", lambda p: p.symlink_to("/dev/zero")),
                                        ("SHA256SUMS", lambda p: p.write_bytes(b"x" * (2 << 20))),
                                        ("model.safetensors", lambda p: os.mkfifo(p))])
def test_a_release_file_that_is_a_device_a_fifo_or_huge_is_refused_not_read(capsys, release, tmp_path, name, make):
    rel = Path(shutil.copytree(release, tmp_path / "rel"))
    (rel / name).unlink()
    make(rel / name)
    refused(capsys, ["generate", "--model", str(rel), "--prompt", "a"], name)


def test_a_pickle_too_big_to_scan_is_refused_unread(capsys, ckpt, tmp_path, monkeypatch):
    """When torch's scanner stops (protocol 4), pico reads the pickle itself: first its size, so a deflate bomb
    (a few KB inflating to GBs) is refused before it is inflated. The limit is lowered here to stand for one."""
    import torch

    from pico.pipeline.train import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_PICKLE_BYTES", 4096)
    step = Path(shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name))
    states = step / "ds" / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=True), "x": _RunsShell("true"), "pad": "p" * 10_000}, states,
               pickle_protocol=4)
    refused(capsys, ["convert", str(step), str(tmp_path / "rel")], "mp_rank_00_model_states.pt: its pickle holds",
            "Refused")
    # torch's own scanner (protocol 2) reads the whole pickle as well: the size is checked before it runs
    torch.save({**torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", weights_only=True), "pad": "p" * 10_000},
               states)
    refused(capsys, ["convert", str(step), str(tmp_path / "rel")], "mp_rank_00_model_states.pt: its pickle holds")


@pytest.mark.parametrize("line, message", [
    ("{digest}  ../../outside.pt", "malformed line"),         # a path leaving the step: never hashed
    ("{digest}  /etc/hostname", "malformed line"),
    (None, "not a regular file of at most"),                  # a link to /dev/zero: never read
])
def test_a_checkpoint_sums_file_is_read_as_untrusted(capsys, ckpt, tmp_path, line, message):
    step = Path(shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name))
    sums = step / "SHA256SUMS"
    if line is None:
        sums.unlink(missing_ok=True)
        sums.symlink_to("/dev/zero")
    else:
        sums.write_text(line.format(digest="0" * 64) + "\n")
    refused(capsys, ["convert", str(step), str(tmp_path / "rel")], "is damaged", "SHA256SUMS", message)


def test_a_compressed_checkpoint_member_is_refused_before_anything_inflates_it(capsys, ckpt, tmp_path):
    """torch.save never compresses; a deflated member is how a few KB would inflate to GBs in torch's reader."""
    import zipfile

    step = Path(shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name))
    states = step / "ds" / "mp_rank_00_model_states.pt"
    with zipfile.ZipFile(ckpt / "ds" / "mp_rank_00_model_states.pt") as src, \
            zipfile.ZipFile(states, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    refused(capsys, ["convert", str(step), str(tmp_path / "rel")], "mp_rank_00_model_states.pt: its member",
            "is compressed", "Refused")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv, says", [
    (["eval", "--data", "x.txt", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["eval", "--data", "x.txt", "--max-batches", "-1"], "--max-batches -1: must be >= 0"),
    (["eval", "--data", "x.txt", "--seq-len", "100000"], "--seq-len 100000 is longer than the model's context"),
    (["eval", "--data", "x.txt", "--device", "cuda"], "--device=cuda: no such CUDA device is visible"),
    (["generate", "--prompt", "a", "--device", "gpu"], "--device='gpu' is not a device"),
])
def test_eval_and_generate_settings_that_cannot_work_are_one_line(capsys, release, tmp_path, argv, says):
    (tmp_path / "x.txt").write_text("some text to score")
    argv = [a.replace("x.txt", str(tmp_path / "x.txt")) for a in argv]
    refused(capsys, [argv[0], "--model" if argv[0] == "generate" else "--checkpoint", str(release), *argv[1:]], says)
