"""`pico convert`: turn a training checkpoint into a release that anyone can load safely.

A release is one directory:

    model.safetensors   the weights (fp32 or bf16), no pickle; the header's metadata records the
                        training run (step, bytes seen, eval) as JSON
    config.json         the model config and the release format version: enough to rebuild it
    README.md           the model card: architecture, size, FLOPs per byte, training data and
                        length, eval bits per byte per head, routing statistics, how to generate
    SHA256SUMS          sha256 of each file above (`sha256sum -c SHA256SUMS` checks it too)

Properties, each tested:

- **Any checkpoint**: ZeRO stage 0-3 written by any number of ranks (`load_model_state` gathers
  the fp32 weights); an incomplete checkpoint (a rank file or a ZeRO partition missing) is
  refused, since it cannot be trusted to be the model that was trained.
- **Atomic**: everything is written into a temporary directory beside OUT, verified by loading
  it back, and renamed to OUT; a failed convert leaves nothing behind.
- **Nothing else lost**: an OUT that holds anything but a pico release is refused; a different
  release is replaced only with --overwrite, which keeps (and names) OUT's other files.
- **Idempotent**: the same checkpoint gives byte-identical files (no timestamps; the safetensors
  file is written here with a sorted header, because the library orders its metadata map
  differently from one process to the next). Converting again over an identical release leaves
  it untouched.
- **Safe to load**: `load_release` reads JSON and safetensors only, checks every checksum first,
  refuses a newer format version, rebuilds the network with `pico.model.build_model` and loads
  the weights strictly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from pico.configs.errors import UserError
from pico.configs.runs import TRUST_HELP
from pico.pipeline.release import hf
from pico.pipeline.release.files import canonical_json, model_card, write_safetensors
from pico.configs.files import SUMS, fsync, public_paths, sha256_file
from pico.pipeline.release.load import (CARD, CONFIG, DTYPES, FORMAT, FORMAT_VERSION, WEIGHTS, checksum_errors,
                                        load_release, parse_model_config, pico_version, read_checksums)

FORMATS = ("pico", "hf")

EPILOG = """examples:
  pico convert runs/quickstart/run                       # newest checkpoint -> runs/quickstart/run/releases/step_NNNNNN
  pico convert runs/big/checkpoints/step_020000 releases/big-20k --dtype bf16
  pico convert runs/big/checkpoints/step_020000 releases/big-20k-hf --format hf   # for transformers
  pico generate --model releases/big-20k --prompt 'The '
"""


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `pico convert`."""
    parser.add_argument("checkpoint", help="a run directory, its checkpoints/ directory, or one step_NNNNNN directory "
                                           "(a run or checkpoints directory means its newest complete step)")
    parser.add_argument("out", nargs="?", default=None,
                        help="release directory to write (default: <run dir>/releases/step_NNNNNN)")
    parser.add_argument("--format", choices=FORMATS, default="pico",
                        help="pico: pico's own release (default); hf: a Hugging Face transformers directory "
                             "(custom code, byte tokenizer, generate()); see pipeline/release/hf.py")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="weight dtype of the release (default: fp32, the exact trained weights; bf16 halves "
                             "the size and is loaded back into fp32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a release already at OUT that differs (another checkpoint or dtype); only "
                             "the release's own files are replaced, other files in OUT stay")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    parser.add_argument("--json", action="store_true", help="print one JSON object describing the release")


def run(args: argparse.Namespace) -> int:
    # DeepSpeed prints progress (and its logger writes) to stdout; stdout is for --json alone.
    with contextlib.redirect_stdout(sys.stderr):
        out = convert(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite,
                      trust=args.trust_checkpoint, format=args.format)
    sums = read_checksums(out)
    config = json.loads((out / CONFIG).read_text())
    if args.json:
        print(json.dumps({"release": str(out), "format": args.format, "dtype": args.dtype,
                          "format_version": config.get("format_version"),
                          "files": sums, "bytes": sum((out / f).stat().st_size for f in sums)}))
    else:
        print(f"release: {out}", file=sys.stderr)
        for name in sums:
            print(f"  {name:<22} {(out / name).stat().st_size:>12,} bytes", file=sys.stderr)
        if args.format == "hf":
            print(f"next: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)", file=sys.stderr)
        else:
            print(f"next: pico generate --model {out} --prompt 'The '", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- convert


def convert(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
            dtype: str = "fp32", overwrite: bool = False, trust: bool = False, format: str = "pico") -> Path:
    """Write the release of a checkpoint (a run, checkpoints or step directory) to out_dir; return its path.

    `format`: "pico" (pico's own release) or "hf" (a transformers directory, see hf.py).

    An identical release already at out_dir is left alone; a different one is replaced only with
    `overwrite` (other files in out_dir are kept and named in a warning)."""
    from pico.pipeline.train import checkpoint as ckpt

    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r}: choose one of {', '.join(sorted(DTYPES))}")
    if format not in FORMATS:
        raise UserError(f"format={format!r}: choose one of {', '.join(FORMATS)}")
    src = Path(checkpoint_path)
    if (src / CONFIG).exists() or (src / WEIGHTS).exists():
        raise UserError(f"{src} is already a release; convert takes a training checkpoint (a run directory or "
                        "a step_NNNNNN directory)")
    try:
        step_dir = ckpt.resolve_checkpoint(src)
    except UserError as e:
        raise UserError(f"{src} is not a training checkpoint: {e}") from None
    run_state = ckpt.read_run_state(step_dir)
    ckpt.check_complete(step_dir, run_state)
    damage = ckpt.sums_errors(step_dir)
    if damage:
        raise UserError(f"checkpoint {step_dir} is damaged: {'; '.join(damage)}. Convert an earlier step")
    out = Path(out_dir) if out_dir is not None else default_out_dir(step_dir, format)

    model_cfg = parse_model_config(run_state["config"]["model"], step_dir / ckpt.STATE_FILE)
    if format == "hf":
        hf.check_supported(model_cfg)  # before the weights are read: a refusal costs nothing
    from pico.model.pico import upgrade_state_dict

    state, _ = ckpt.load_model_state(step_dir, trust)
    state = upgrade_state_dict(state)  # a checkpoint of an older pico: today's parameter names
    _check_matches(state, model_cfg, step_dir)
    if format == "hf":
        return _publish(out, lambda tmp: hf.write_hf_release(tmp, _cast(state, dtype), model_cfg,
                                                             training_record(model_cfg, run_state, step_dir), dtype),
                        overwrite, verify=hf.verify_hf_release, replaceable=hf.is_hf_release,
                        what="Hugging Face export written by pico (--format hf replaces only those)")
    return _publish(out, lambda tmp: _write_release(tmp, state, model_cfg, run_state, step_dir, dtype), overwrite)


def default_out_dir(step_dir: Path, format: str = "pico") -> Path:
    """<run dir>/releases/step_NNNNNN (-hf for --format hf; the run dir holds checkpoints/; else beside
    the checkpoints dir)."""
    holder = step_dir.parent
    base = holder.parent if holder.name == "checkpoints" else holder
    return base / "releases" / (step_dir.name + ("-hf" if format == "hf" else ""))


def _check_matches(state: dict, model_cfg, where: Path) -> None:
    import torch

    from pico.model import build_model

    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        expected = build_model(model_cfg).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise UserError(f"{where}: the weights do not match the model config saved with them (missing "
                        f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shape {shapes[:5]})")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{where}: weights {bad[:5]} hold NaN or infinite values; convert an earlier step")


def _publish(out: Path, write, overwrite: bool = False, verify=None, replaceable=None,
             what: str = "pico release") -> Path:
    """Run write(tmp) on a temporary directory beside out, verify it, then rename it to out.

    An existing release at out is left alone when its files are the same bytes; else (with
    `overwrite`) it is replaced by two renames (old aside, new in), after the other files of out
    were linked into the new directory, so that they survive and the swap stays atomic. On any
    failure the temporary directory, and any parent this call created, are removed and an old
    release is put back. `verify(tmp)` (default: load_release) must pass before the rename;
    `replaceable(out)` (default: a pico release) says which existing directory may be replaced, and
    `what` names it in the refusal."""
    verify = verify or load_release
    replaceable = replaceable or _replaceable
    out = out.absolute()
    if out.exists() and not (_empty_dir(out) or replaceable(out)):
        raise UserError(f"{out} exists and is not a {what}; choose another output directory or remove it")
    created = [p for p in reversed(out.parents) if not p.exists()]  # outermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_debris(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}@{_HOST}"
    old = out.parent / f".{out.name}.old-{os.getpid()}@{_HOST}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        verify(tmp)  # the release must load before anyone can see it
        if out.exists() and _same_files(out, tmp):
            shutil.rmtree(tmp)
            return out
        others = _keep_others(out, tmp, overwrite) if out.exists() else []
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        for p in reversed(created):  # parents this call made, innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
    if others:
        print(f"pico convert: replaced the release in {out}; kept its other files: {', '.join(others)}",
              file=sys.stderr)
    return out


# What a convert killed in a parent leaves: `.OUT.tmp-PID@HOST` (PID without @HOST before issue 28).
_DEBRIS = re.compile(r"^\.(?P<out>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(@(?P<host>.+))?$")
_HOST = socket.gethostname()


def _clean_debris(parent: Path) -> None:
    """Remove the temporary directories of converts into `parent` that were killed (issue 28: 10 MB each,
    never removed). Only a dead process's, on this host (a pid means nothing on another node of a shared
    filesystem); a `.old-` one is the previous release set aside mid-swap, so it is put back where
    OUT is missing instead of removed."""
    for p in parent.iterdir():
        m = _DEBRIS.match(p.name)
        if not m or not p.is_dir() or (m["host"] or _HOST) != _HOST or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not (parent / m["out"]).exists():
            os.replace(p, parent / m["out"])
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _keep_others(out: Path, tmp: Path, overwrite: bool) -> list[str]:
    """Link every file of out that is not the release's own into tmp; refuse without overwrite."""
    if any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} holds a different release (another checkpoint or dtype); pass --overwrite to "
                        "replace it (its other files are kept), or choose another output directory")
    own = {WEIGHTS, CONFIG, CARD, SUMS}
    with contextlib.suppress(OSError, UserError):
        own |= set(read_checksums(out))
    others = sorted(p.name for p in out.iterdir() if p.name not in own)
    for name in others:
        src, dst = out / name, tmp / name
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
    return others


def _link_or_copy(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _empty_dir(out: Path) -> bool:
    return out.is_dir() and not any(out.iterdir())


def _replaceable(out: Path) -> bool:
    """An empty directory, or a release written by pico (any version) may be replaced."""
    if _empty_dir(out):
        return True
    try:
        return json.loads((out / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _same_files(a: Path, b: Path) -> bool:
    try:
        return (a / SUMS).read_bytes() == (b / SUMS).read_bytes() and not checksum_errors(a, read_checksums(a))
    except (OSError, UserError):
        return False


def _write_release(tmp: Path, state: dict, model_cfg, run_state: dict[str, Any], step_dir: Path, dtype: str) -> None:
    import dataclasses

    tensors = _cast(state, dtype)
    training = training_record(model_cfg, run_state, step_dir)
    write_safetensors(tmp / WEIGHTS, tensors, {"format": "pt", "pico_training": canonical_json(training)})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "pico_version": pico_version(),
              "dtype": dtype, "model": dataclasses.asdict(model_cfg)}
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (tmp / CARD).write_text(model_card(model_cfg, training, dtype))
    sums = {name: sha256_file(tmp / name) for name in (WEIGHTS, CONFIG, CARD)}
    (tmp / SUMS).write_text("".join(f"{h}  {name}\n" for name, h in sums.items()))


def _cast(state: dict, dtype: str) -> dict:
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in state.items()}


def training_record(model_cfg, run_state: dict[str, Any], step_dir: Path) -> dict[str, Any]:
    """What a release records about its training (safetensors metadata and the card), without local paths."""
    from pico.model import flops_per_byte, param_count

    data = run_state["config"].get("data", {})
    return {
        "checkpoint": step_dir.name,
        **{k: run_state.get(k) for k in ("step", "bytes_seen", "world_size", "zero_stage", "optimizer")},
        "n_params": param_count(model_cfg),  # parameters only (the state also holds buffers)
        "flops_per_byte": {"training": flops_per_byte(model_cfg, True), "inference": flops_per_byte(model_cfg, False)},
        "data": {"train": public_paths(data.get("train")), "val": public_paths(data.get("val")),
                 "seq_len": data.get("seq_len")},
        "eval": run_state.get("eval") or {},
    }


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        fsync(p)
    fsync(folder)
