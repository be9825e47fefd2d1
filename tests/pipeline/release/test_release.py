"""`pico convert` and `load_release`: the release is the trained model, safe to load, and refused when bad.

Two kinds of source checkpoint:

- real 2-rank ZeRO-2 and ZeRO-3 trainings (torchrun, gloo; slow, distributed). Their releases are
  compared with (a) the model rebuilt from `load_model_state` and (b) the DeepSpeed engine itself,
  rebuilt on 2 ranks by the same code the trainer uses, loaded from the same checkpoint, run
  forward on the same bytes (this file run as a module under torchrun, see `engine_logits_main`);
- a ZeRO-0 one-rank checkpoint laid out by hand here (the layout `pipeline/train/checkpoint.py` reads:
  `ds/mp_rank_00_model_states.pt`, `rank00000.pt`, `pico_state.json`), so that the release
  format itself (checksums, versions, atomicity, idempotence, no pickle) is tested fast.

bf16 tolerance: every bf16 weight must equal the fp32 weight rounded to bf16 (exact), and the
logits of the bf16 release (run in fp32) must be within BF16_TOL of the fp32 ones with top-k
routing. Measured on the 3-step ZeRO runs here: max |difference| 1.6e-3 with top-k routing and
4.3e-3 with causal routing, on logits of magnitude <= 0.65 (argmax identical everywhere). Causal
routing is not held to the tolerance: a score within bf16 rounding of 0 may flip a decision.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pico.configs.errors import UserError
from tests.conftest import REPO, free_port
from tests.pipeline.train.test_trainer import TINY, _env, train_run

PROBE_SEED = 1234
BF16_TOL = {"atol": 1e-2, "rtol": 1e-2}


def probe_input(max_seq_len: int) -> torch.Tensor:
    """The bytes every comparison in this file runs forward: (2, max_seq_len) ids, fixed by a seed."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, 256, (2, max_seq_len), generator=g)


def tiny_config():
    """The learned MoD router (its top-k and causal routings differ, which the comparisons here need)."""
    from pico.configs.tree import load_config

    return load_config("learned", [a for a in TINY if not a.startswith("--logging")] + ["--optim.name=adamw",
                                                                                         "--data.train=[shards/novels]"])


def make_zero0_checkpoint(root: Path, seed: int = 0) -> Path:
    """A one-rank ZeRO-0 checkpoint in pico's layout, weights from build_model at `seed`."""
    from pico.model import build_model

    cfg = tiny_config()
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    step = root / "checkpoints" / "step_000005"
    (step / "ds").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, step / "ds" / "mp_rank_00_model_states.pt")
    torch.save({"loader": {}, "rng": {}}, step / "rank00000.pt")
    state = {"step": 5, "bytes_seen": 1280, "world_size": 1, "zero_stage": 0, "optimizer": "adamw",
             "n_params": sum(p.numel() for p in model.parameters()), "flops_per_byte": 1.0,
             "eval": {"bpb": 7.9, "bpb_head1": 7.9, "bpb_head2": 7.95, "router/routed_frac_mean": 0.21},
             "config": cfg.to_dict(), "time": 1.5e9}
    (step / "pico_state.json").write_text(json.dumps(state))
    return step


def reference_model(ckpt: Path):
    """The checkpoint's fp32 weights in a freshly built model (the path eval and generate take)."""
    from pico.model import build_model
    from pico.model.config import ModelConfig
    from pico.pipeline.train.checkpoint import load_model_state
    from pico.configs.tree import from_dict

    sd, run_state = load_model_state(ckpt)
    model = build_model(from_dict(ModelConfig, run_state["config"]["model"], "model"))
    model.load_state_dict(sd, strict=True)
    return model.eval(), sd


def logits(model, routing: str) -> torch.Tensor:
    with torch.no_grad():
        return model(probe_input(model.cfg.max_seq_len), routing=routing).logits


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def rewrite_sums(release: Path) -> None:
    """Recompute SHA256SUMS, so that a damaged file reaches the parser behind the checksums."""
    import hashlib

    names = [line.split("  ", 1)[1] for line in (release / "SHA256SUMS").read_text().splitlines()]
    (release / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((release / n).read_bytes()).hexdigest()}  {n}\n" for n in names))


@pytest.fixture(scope="module")
def zero0(tmp_path_factory) -> Path:
    return make_zero0_checkpoint(tmp_path_factory.mktemp("zero0"))


@pytest.fixture(scope="module")
def release(zero0, tmp_path_factory) -> Path:
    from pico.pipeline.release.convert import convert

    return convert(zero0, tmp_path_factory.mktemp("rel") / "fp32")


@pytest.fixture
def damaged(release, tmp_path) -> Path:
    """A private copy of the release to break."""
    return Path(shutil.copytree(release, tmp_path / "copy"))


# ----------------------------------------------------------------------------- format (fast)


def test_release_layout_card_and_round_trip(zero0, release):
    from pico.pipeline.release.load import load_model
    from pico.pipeline.release.load import load_release

    assert sorted(p.name for p in release.iterdir()) == ["README.md", "SHA256SUMS", "config.json", "model.safetensors"]
    config = json.loads((release / "config.json").read_text())
    assert config["format_version"] == 1 and config["pico_version"] and config["dtype"] == "fp32"
    assert set(config) == {"format", "format_version", "pico_version", "dtype", "model"}
    card = (release / "README.md").read_text()
    for needle in ("parameters", "FLOPs per byte", "steps: 5", "bytes seen: 1,280", "7.9000", "7.9500",
                   "routed_frac_mean", "pico generate --model DIR --prompt", "ZeRO stage 0", "`shards/novels`"):
        assert needle in card, needle
    ref, _ = reference_model(zero0)
    model, info = load_release(release)
    assert info["step"] == 5 and info["format_version"] == 1 and info["n_params"] == sum(
        p.numel() for p in ref.parameters())
    for routing in ("topk", "causal"):
        assert torch.equal(logits(model, routing), logits(ref, routing))
    model2, info2 = load_model(release)  # the entry point eval and generate use
    assert info2["kind"] == "release" and torch.equal(logits(model2, "topk"), logits(ref, "topk"))
    lines = (release / "SHA256SUMS").read_text().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["model.safetensors", "config.json", "README.md"]


def test_convert_is_idempotent_and_leaves_an_identical_release_alone(zero0, release, tmp_path):
    from pico.pipeline.release.convert import convert

    again = convert(zero0, tmp_path / "again")
    assert files_of(again) == files_of(release)
    before = {p.name: p.stat().st_ino for p in again.iterdir()}
    assert convert(zero0, again) == again.absolute()
    assert {p.name: p.stat().st_ino for p in again.iterdir()} == before  # not rewritten
    b1, b2 = convert(zero0, tmp_path / "b1", dtype="bf16"), convert(zero0, tmp_path / "b2", dtype="bf16")
    assert files_of(b1) == files_of(b2)
    assert b1.joinpath("model.safetensors").stat().st_size < 0.6 * release.joinpath("model.safetensors").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "b1", "b2"]  # no temporary debris


def test_bf16_release_is_the_rounded_weights_and_close_logits(zero0, release, tmp_path):
    from safetensors.torch import load_file

    from pico.pipeline.release.convert import convert
    from pico.pipeline.release.load import load_release

    b = convert(zero0, tmp_path / "bf16", dtype="bf16")
    _, sd = reference_model(zero0)
    stored = load_file(b / "model.safetensors")
    assert set(stored) == set(sd)
    for k, v in stored.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, sd[k].to(torch.bfloat16)), k
    model, info = load_release(b)
    assert info["dtype"] == "bf16" and all(p.dtype == torch.float32 for p in model.parameters())
    fp32, _ = load_release(release)
    torch.testing.assert_close(logits(model, "topk"), logits(fp32, "topk"), **BF16_TOL)


LOADER_PROBE = r"""
import os, pickle, sys, torch
release = sys.argv[1]
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append(os.fsdecode(args[0]))
    if event == "pickle.find_class":
        raise RuntimeError(f"unpickling {args}")
def refuse(*a, **k):
    raise RuntimeError("pickle or torch.load was called")
class Refuse:
    def __init__(self, *a, **k):
        refuse()
pickle.load = pickle.loads = torch.load = torch.serialization.load = refuse
pickle.Unpickler = Refuse
import torch._weights_only_unpickler as wou
wou.load = refuse
wou.Unpickler = Refuse
sys.addaudithook(hook)
from pico.pipeline.cli import main
rc = main(["generate", "--model", release, "--prompt", "ab", "--max-bytes", "8", "--json"])
mine = sorted({os.path.basename(p) for p in opened if os.path.abspath(p).startswith(os.path.abspath(release))})
print("OPENED", mine, "RC", rc)
"""


def test_release_loads_and_generates_without_pickle(release):
    """In a fresh process: every unpickler refuses, and the loader opens only the release's own files."""
    proc = subprocess.run([sys.executable, "-c", LOADER_PROBE, str(release)], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tail = proc.stdout.strip().splitlines()[-1]
    # README.md is opened too: its checksum is verified with the others
    assert tail == "OPENED ['README.md', 'SHA256SUMS', 'config.json', 'model.safetensors'] RC 0", proc.stdout[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[0])
    assert out  # generate's JSON object


# ----------------------------------------------------------------------------- bad input (fast)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_weights_are_refused(damaged, how):
    from pico.pipeline.release.load import load_release

    f = damaged / "model.safetensors"
    data = bytearray(f.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
        data[len(data) // 2 + 1] ^= 0x01
    else:
        data = data[: len(data) - 1000]
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt: model.safetensors has sha256"):
        load_release(damaged)
    rewrite_sums(damaged)  # past the checksums, a truncated file fails in the parser; a flipped one is caught
    if how == "truncate":
        with pytest.raises(UserError, match="cannot be read as safetensors"):
            load_release(damaged)


def test_damaged_header_with_matching_sums_is_refused(damaged):
    from pico.pipeline.release.load import load_release

    f = damaged / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:14] = b"\xff\xfe\x00{"  # inside the JSON header
    f.write_bytes(bytes(data))
    rewrite_sums(damaged)
    with pytest.raises(UserError, match="cannot be read as safetensors"):
        load_release(damaged)


def test_newer_format_version_is_refused(damaged):
    from pico.pipeline.release.load import load_release

    cfg = json.loads((damaged / "config.json").read_text())
    cfg["format_version"] = 2
    (damaged / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"release format 2 .* reads formats up to 1\. Upgrade pico"):
        load_release(damaged)
    rewrite_sums(damaged)
    with pytest.raises(UserError, match="Upgrade pico"):
        load_release(damaged)


def test_missing_sums_or_config_or_mismatched_weights_are_refused(damaged, tmp_path):
    from pico.pipeline.release.load import load_release

    cfg = json.loads((damaged / "config.json").read_text())
    cfg["model"]["d_local"] = 64  # weights no longer fit the config
    (damaged / "config.json").write_text(json.dumps(cfg))
    rewrite_sums(damaged)
    with pytest.raises(UserError, match="does not match config.json"):
        load_release(damaged)
    (damaged / "SHA256SUMS").unlink()
    with pytest.raises(UserError, match="has no SHA256SUMS"):
        load_release(damaged)
    (damaged / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json; it is not a pico release"):
        load_release(damaged)


def test_paths_that_are_neither_are_refused(release, tmp_path, capsys):
    from pico.pipeline.release.load import load_model
    from pico.pipeline.cli import main
    from pico.pipeline.release.convert import convert

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="is not a training checkpoint"):
        convert(junk, tmp_path / "out")
    with pytest.raises(UserError, match="is already a release"):
        convert(release, tmp_path / "out")
    with pytest.raises(UserError, match="neither a release"):
        load_model(junk)
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pico convert: error:" in err and "not a training checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_file_is_refused(zero0, tmp_path):
    from pico.pipeline.release.load import load_model
    from pico.pipeline.release.convert import convert

    ckpt = Path(shutil.copytree(zero0, tmp_path / "checkpoints" / zero0.name))
    f = ckpt / "ds" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:5000])
    for call in (lambda: convert(ckpt, tmp_path / "out"), lambda: load_model(ckpt)):
        with pytest.raises(UserError, match="mp_rank_00_model_states.pt cannot be read .* corrupt, use another step"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_convert_refuses_to_overwrite_what_is_not_a_release(zero0, tmp_path):
    from pico.pipeline.release.convert import convert

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a pico release"):
        convert(zero0, tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


def test_failed_convert_leaves_nothing_and_keeps_the_old_release(zero0, release, tmp_path, monkeypatch):
    from pico.pipeline.release import convert as rel

    def broken(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(rel, "model_card", broken)
    with pytest.raises(OSError, match="simulated"):
        rel.convert(zero0, tmp_path / "new")
    with pytest.raises(OSError, match="simulated"):
        rel.convert(zero0, tmp_path / "releases" / "deep" / "new")
    assert list(tmp_path.iterdir()) == []
    old = Path(shutil.copytree(release, tmp_path / "old"))
    before = files_of(old)
    with pytest.raises(OSError, match="simulated"):
        rel.convert(zero0, old, dtype="bf16")
    assert files_of(old) == before and sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_cli_json_prints_one_object(zero0, tmp_path, capsys):
    from pico.pipeline.cli import main

    assert main(["convert", str(zero0.parent.parent), "--dtype", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    default = zero0.parent.parent / "releases" / "step_000005"
    assert out["release"] == str(default.absolute()) and out["dtype"] == "bf16"
    assert set(out["files"]) == {"model.safetensors", "config.json", "README.md"}
    shutil.rmtree(default.parent)


# ----------------------------------------------------------------------------- real ZeRO runs


@pytest.fixture(scope="module")
def zero_runs(tiny_shards, tmp_path_factory) -> dict[int, Path]:
    """Step 3 of a 2-rank ZeRO-2 and a 2-rank ZeRO-3 training (AdamW, eval at step 3)."""
    runs = {}
    for stage in (2, 3):
        out = tmp_path_factory.mktemp(f"z{stage}")
        train_run(out, tiny_shards, "--optim.name=adamw", "--optim.lr=3e-3", f"--train.zero_stage={stage}",
                  "--train.steps=3", "--train.eval_every=3", "--checkpoint.every=3", ranks=2)
        runs[stage] = out / "checkpoints" / "step_000003"
    return runs


@pytest.fixture(scope="module")
def engine_logits(zero_runs, tmp_path_factory) -> dict[int, dict[str, torch.Tensor]]:
    """Logits of the DeepSpeed engines (2 ranks) loaded from each checkpoint, on probe_input."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("engine")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "tests.pipeline.release.test_release", str(out),
           str(zero_runs[2]), str(zero_runs[3])]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {stage: load_file(out / f"{path.parent.parent.name}.safetensors") for stage, path in zero_runs.items()}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_release_of_zero_run_equals_the_training_engine(zero_runs, engine_logits, tmp_path, stage):
    from pico.pipeline.release.convert import convert
    from pico.pipeline.release.load import load_release

    ckpt = zero_runs[stage]
    rel = convert(ckpt, tmp_path / "fp32")
    model, info = load_release(rel)
    assert info["zero_stage"] == stage and info["world_size"] == 2 and info["step"] == 3
    assert "bpb_head2" in info["eval"] and "router/causal_agreement" in info["eval"]
    ref, _ = reference_model(ckpt)
    for routing in ("topk", "causal"):
        got = logits(model, routing)
        assert torch.equal(got, logits(ref, routing)), routing
        assert torch.equal(got, engine_logits[stage][routing]), (routing, (got - engine_logits[stage][routing]).abs().max())
    bf = convert(ckpt, tmp_path / "bf16", dtype="bf16")
    torch.testing.assert_close(logits(load_release(bf)[0], "topk"), engine_logits[stage]["topk"], **BF16_TOL)
    card = (rel / "README.md").read_text()
    assert f"ZeRO stage {stage}" in card and "2 rank(s)" in card and "causal_agreement" in card


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_json_stdout_is_clean_for_zero3(zero_runs, tmp_path):
    """DeepSpeed's ZeRO-3 gatherer prints to stdout; `--json` must still print exactly one object."""
    proc = subprocess.run([sys.executable, "-m", "pico.pipeline.cli", "convert", str(zero_runs[3]),
                           str(tmp_path / "rel"), "--json"], env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["release"] == str(tmp_path / "rel") and out["dtype"] == "fp32"
    assert "zero checkpoint" in proc.stderr  # DeepSpeed's progress went to stderr


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage,victim,says", [
    (2, "rank00001.pt", "rank00001.pt"),
    (2, "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "ZeRO-2 partition of rank 1"),
    (2, "ds/mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"),
    (3, "rank00000.pt", "rank00000.pt"),
    (3, "ds/zero_pp_rank_1_mp_rank_00_model_states.pt", "ZeRO-3 partition of rank 1"),
    (3, "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ZeRO-3 partition of rank 0"),
    (3, "truncate ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
     "zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its sha256 in SHA256SUMS .*Convert an earlier step"),
])
def test_incomplete_zero_checkpoint_is_refused(zero_runs, tmp_path, stage, victim, says):
    from pico.pipeline.release.convert import convert

    ckpt = Path(shutil.copytree(zero_runs[stage], tmp_path / "checkpoints" / "step_000003"))
    if victim.startswith("truncate "):
        f = ckpt / victim.split()[1]
        f.write_bytes(f.read_bytes()[:5000])
    else:
        (ckpt / victim).unlink()
        says = f"is incomplete .*{says}"
    with pytest.raises(UserError, match=says):
        convert(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


# ----------------------------------------------------------------------------- engine side (torchrun)


def engine_logits_main(out_dir: str, *checkpoints: str) -> None:
    """Under torchrun: rebuild the trainer's DeepSpeed engine for each checkpoint, load it, and save
    rank 0's logits on probe_input (every rank runs the forward: ZeRO-3 gathers weights collectively)."""
    import deepspeed
    from safetensors.torch import save_file

    from pico.model import build_model
    from pico.pipeline.train import checkpoint as ckpt
    from pico.pipeline import dist
    from pico.configs.tree import Config, from_dict
    from pico.pipeline.optim.build import build_optimizer
    from pico.pipeline.train.trainer import deepspeed_config

    dist.init(torch.device("cpu"))
    for path in map(Path, checkpoints):
        cfg = from_dict(Config, ckpt.read_run_state(path)["config"])
        torch.manual_seed(99)  # other initial weights than the run's: the load must replace them all
        model = build_model(cfg.model)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(
            list(model.named_parameters()), cfg.optim), config=deepspeed_config(cfg))
        loaded, _ = engine.load_checkpoint(str(path), tag=ckpt.DS_TAG, load_lr_scheduler_states=False)
        assert loaded is not None, path
        engine.eval()
        with torch.no_grad():
            got = {r: engine(probe_input(cfg.model.max_seq_len), routing=r).logits.contiguous()
                   for r in ("topk", "causal")}
        if dist.is_main():
            save_file(got, str(Path(out_dir) / f"{path.parent.parent.name}.safetensors"))
        dist.barrier()


if __name__ == "__main__":
    engine_logits_main(*sys.argv[1:])
