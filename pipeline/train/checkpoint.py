"""Checkpoints that are complete or absent.

Layout of one checkpoint (all ranks write into a temporary directory on a shared filesystem;
rank 0 renames it once every rank has finished, so a directory named `step_*` is complete):

    <checkpoint dir>/step_000200/
        ds/                    DeepSpeed's own files (model, ZeRO partitions, client optimizer)
        rank00000.pt           per rank: loader position, RNG states, sharded optimizer state
        SHA256SUMS             sha256 of every file above, hashed at save time (ranks share the work)
        pico_state.json        step, bytes seen, world size, the resolved config, last metrics

`--resume` loads the newest complete `step_*`. Older ones beyond `checkpoint.keep_last` are
deleted. `load_model_state()` turns any checkpoint (ZeRO 0-3, any rank count) into a plain
fp32 state dict for eval, generate and convert.

Untrusted checkpoints: a `.pt` file is a pickle, and unpickling can run any code. pico reads its
own files with `torch.load(weights_only=True)` and the few numpy globals of an RNG state
registered explicitly. DeepSpeed's loaders (resume, ZeRO-3 consolidation) unpickle with
weights_only=False, so before they run, every `.pt` file of the checkpoint is disassembled
without being executed (`torch.serialization.get_unsafe_globals_in_checkpoint`) and refused
when it names anything outside `SAFE_GLOBALS`, unless the user passes --trust-checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import pickletools
import random
import shutil
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pico.pipeline import dist
from pico.configs.errors import UserError
from pico.configs.files import SUMS, fsync, read_sums, sha256_file
from pico.configs.runs import (DS_TAG, STATE_FILE, latest_checkpoint, list_checkpoints, read_run_state,  # noqa: F401
                               resolve_checkpoint, step_dir_name, step_of)

# The numpy objects of an RNG state (pico's rank files); loaded by the weights_only unpickler.
_NP_CORE = getattr(np, "_core", None) or np.core  # numpy 2, numpy 1
NUMPY_GLOBALS = [_NP_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
# What else DeepSpeed's own files name (ZeRO optimizer partitions): plain records and enums.
DEEPSPEED_GLOBALS = {"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address"}
SAFE_GLOBALS = {f"{g.__module__}.{g.__name__}" for g in NUMPY_GLOBALS} | DEEPSPEED_GLOBALS
TRUST_HINT = ("a crafted checkpoint can run code when it is loaded; if you trust where this one came from, pass "
              "--trust-checkpoint")


MAX_SUMS_BYTES = 16 << 20  # SHA256SUMS: ~100 bytes per file, a few files per rank
MAX_PICKLE_BYTES = 64 << 20  # a torch.save file's data.pkl (structure, no tensor bytes): KBs to MBs


class UntrustedCheckpoint(UserError):
    """A checkpoint file names Python objects outside the allowlist: refused, not damaged."""


def safe_load(f: Path, trust: bool = False) -> Any:
    """torch.load of one checkpoint file; nothing outside the weights_only allowlist is unpickled
    unless `trust`. A damaged file or a refused global raises UserError naming the file."""
    try:
        if trust:
            return torch.load(f, map_location="cpu", weights_only=False)
        _check_archive(f)
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        check_pickles(f, trust)  # names the refused globals, if that is why
        raise UserError(f"{f} cannot be read ({_first_line(e)}); it is corrupt, use another step") from None
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{f} cannot be read ({type(e).__name__}: {_first_line(e)}); it is corrupt, "
                        "use another step") from None


def check_pickles(step_dir: Path, trust: bool = False) -> None:
    """Refuse a checkpoint (or one file) any of whose .pt files would run code outside SAFE_GLOBALS when unpickled.

    Static: each file's pickle is disassembled, not executed. Run before handing the directory to
    DeepSpeed, whose loaders unpickle with weights_only=False. A damaged file is refused too, and
    so is a checkpoint holding a symbolic link (see `checkpoint_files`)."""
    if trust:
        return
    from torch.serialization import get_unsafe_globals_in_checkpoint

    root = Path(step_dir)
    for f in [root] if root.is_file() else checkpoint_files(root):
        if f.suffix != ".pt":  # every file DeepSpeed or pico unpickles is named *.pt (checked in DeepSpeed 0.19)
            continue
        try:
            _check_archive(f)  # before torch's scanner, which reads the whole pickle
            unsafe = sorted(set(get_unsafe_globals_in_checkpoint(f)) - SAFE_GLOBALS)
        except pickle.UnpicklingError as e:  # an opcode torch's scanner does not read (e.g. STACK_GLOBAL, INST)
            unsafe = sorted(set(pickle_globals(f)) - SAFE_GLOBALS - _torch_safe_globals()) or [f"<{_first_line(e)}>"]
        except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f"{f} cannot be read ({type(e).__name__}: {_first_line(e)}); it is corrupt, "
                            "use another step") from None
        if unsafe:
            raise UntrustedCheckpoint(f"{f} would call {', '.join(unsafe[:5])} when unpickled, which no pico checkpoint "
                            f"does; {TRUST_HINT}")


def pickle_globals(f: Path) -> list[str]:
    """The globals a .pt file's pickles name, read statically with pickletools (nothing runs).

    torch's scanner stops at STACK_GLOBAL (protocol 4+) and INST with "Unsupported operand 147",
    which names no global; this reads them too: GLOBAL and INST carry the name, STACK_GLOBAL takes
    the two strings pushed before it (remembered through the memo). What it cannot read is left out."""
    names: list[str] = []
    try:
        with _pickle_stream(f) as stream:
            while stream.peek(1) if hasattr(stream, "peek") else False:  # the legacy format: several pickles
                names += _globals_of_one_pickle(stream)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        pass
    return names


def _torch_safe_globals() -> set[str]:
    """What torch's weights_only unpickler allows (tensor rebuilds, storages): its scanner leaves them out too."""
    from torch import _weights_only_unpickler

    return set(_weights_only_unpickler._get_allowed_globals())


def _globals_of_one_pickle(stream) -> list[str]:
    names, pushed, memo = [], [], {}
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            names.append(arg.replace(" ", "."))
        elif op.name.startswith("EXT"):  # a global by its copyreg extension code
            names.append(f"<the global of copyreg extension code {arg}>")
        elif op.name == "STACK_GLOBAL":
            operands = pushed[-2:]
            ok = len(operands) == 2 and all(isinstance(x, str) for x in operands)
            names.append(".".join(operands) if ok else "<a global whose name is computed>")
        if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):  # stores the top of the stack, pushes nothing
            memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        else:
            is_text = isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name)
            pushed.append(arg if is_text else None)
    return names


def _check_archive(f: Path) -> None:
    """Refuse, unread, a torch.save archive that could inflate past what its file holds: torch.save stores
    every member uncompressed, so a compressed one (a deflate bomb: KBs inflating to GBs) is refused, and
    so is a pickle (`<archive>/data.pkl`, structure without tensor bytes) over MAX_PICKLE_BYTES."""
    if not zipfile.is_zipfile(f):
        return  # the legacy format: a plain pickle, no larger than the file
    with zipfile.ZipFile(f) as z:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise UntrustedCheckpoint(f"{f}: its member {info.filename} is compressed, which torch.save never "
                                          "does (a decompression bomb's way in). Refused")
            if _is_pickle(info.filename) and info.file_size > MAX_PICKLE_BYTES:
                raise UntrustedCheckpoint(f"{f}: its pickle holds {info.file_size:,} bytes; a checkpoint's is KBs "
                                          "to MBs. Refused")


def _is_pickle(name: str) -> bool:
    return name.count("/") == 1 and name.endswith("/data.pkl")  # the record torch reads, one folder down


def _pickle_stream(f: Path):
    """The pickle of a torch.save file (its zip's data.pkl, checked by `_check_archive`), or the file itself
    in the legacy format."""
    if zipfile.is_zipfile(f):
        with zipfile.ZipFile(f) as z:
            name = next((n for n in z.namelist() if _is_pickle(n)), None)
            data = z.read(name) if name else b""  # data.pkl holds no tensor bytes: it is small
        return io.BufferedReader(io.BytesIO(data))
    return open(f, "rb")


def checkpoint_files(step_dir: Path) -> list[Path]:
    """Every file under a step directory (resolved), which must hold only plain files and directories.

    Decision (issue 28): a symbolic link anywhere inside a step directory is refused, not followed.
    Loaders are handed the resolved step directory and join fixed names under it, so with no link
    inside, the files scanned are exactly the files they can open. Following links instead would
    make the scan repeat DeepSpeed's own path logic to stay exact, and pico never writes a link.
    The step directory itself (or a parent) may be a link: it is resolved once, here and by callers."""
    root = Path(step_dir).resolve()
    found = []
    for parent, dirs, files in os.walk(root, onerror=_raise):  # os.walk lists a linked dir but never enters it
        for name in dirs + files:
            p = Path(parent, name)
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise UntrustedCheckpoint(f"{p} is a symbolic link (to {os.readlink(p)}); pico checkpoints hold "
                                          "none, and a link lets a loader open a file this check did not see. "
                                          f"Replace it with a copy of its target (cp -rL); {TRUST_HINT}")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise UntrustedCheckpoint(f"{p} is not a regular file (a device, socket or pipe); pico checkpoints "
                                          "hold none; remove it")
            if stat.S_ISREG(mode):
                found.append(p)
    return sorted(found)


def _raise(e: OSError) -> None:
    raise UserError(f"{e.filename} cannot be listed ({e.strerror}); check its permissions") from None


def check_complete(step_dir: Path, run_state: dict[str, Any]) -> None:
    """Refuse a checkpoint that lacks a file some rank wrote: its weights cannot be trusted."""
    world = int(run_state.get("world_size", 1))
    stage = int(run_state.get("zero_stage", 0))
    ds = step_dir / DS_TAG
    missing = [f"rank{r:05d}.pt" for r in range(world) if not (step_dir / f"rank{r:05d}.pt").exists()]
    if stage < 3 and not (ds / "mp_rank_00_model_states.pt").exists():
        missing.append(f"{DS_TAG}/mp_rank_00_model_states.pt")
    kinds = ["optim_states"] if stage in (1, 2) else ["model_states", "optim_states"] if stage == 3 else []
    for r in range(world):
        for kind in kinds:
            if not list(ds.glob(f"*zero_pp_rank_{r}_mp_rank_00_{kind}.pt")):
                missing.append(f"{DS_TAG}/zero_pp_rank_{r}_mp_rank_00_{kind}.pt (ZeRO-{stage} partition of rank {r})")
    if missing:
        raise UserError(f"checkpoint {step_dir} is incomplete (written by {world} ranks at ZeRO stage {stage}); "
                        f"missing: {', '.join(missing)}. Restore the missing files or use an earlier step")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only: a resume may see other GPUs
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's, by index
            here = torch.cuda.current_device()
            if here >= len(cuda):
                return
            cuda = cuda[here]
        torch.cuda.set_rng_state(cuda)


def save(engine, ckpt_dir: Path, step: int, rank_state: dict[str, Any], run_state: dict[str, Any],
         keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / f".tmp-{step_dir_name(step)}"
    if dist.is_main():
        for debris in ckpt_dir.glob(".tmp-step_*"):  # saves that were killed (the run lock: no other writer)
            shutil.rmtree(debris, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        with _optimizer_left_out(engine, "optimizer" in rank_state):
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        part = tmp / f"rank{dist.rank():05d}.pt"
        torch.save(rank_state, str(part) + ".part")
        fsync(Path(str(part) + ".part"))
        os.replace(str(part) + ".part", part)
    except (OSError, RuntimeError) as e:  # a full disk: torch's zip writer raises RuntimeError, not OSError
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(_save_failed(ckpt_dir, final, tmp, e)) from None
    dist.barrier()
    _write_sums(tmp)
    if dist.is_main():
        missing = [r for r in range(dist.world_size()) if not (tmp / f"rank{r:05d}.pt").exists()]
        if missing:
            raise RuntimeError(f"checkpoint {tmp}: rank files {missing} are missing; is {ckpt_dir} on a "
                               "filesystem shared by all nodes?")
        (tmp / STATE_FILE).write_text(json.dumps(run_state, indent=1, default=str))
        for f in (tmp / SUMS, tmp / STATE_FILE):
            fsync(f)
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            fsync(d)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # only now on disk, every file and folder of it: a crash cannot leave a
        fsync(ckpt_dir)    # renamed step whose data was lost, with the older steps already pruned
        # prune older steps only: a newer one is one a resume skipped as damaged, never a reason to delete
        older = [p for p in list_checkpoints(ckpt_dir) if step_of(p) < step]
        for old in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _write_sums(tmp: Path) -> None:
    """Collective: SHA256SUMS of every file in tmp (`sha256sum -c` reads it); rank r hashes every
    world_size-th file, and fsyncs it (the checkpoint is renamed into place only once on disk), rank 0
    joins the parts."""
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file() and not p.name.startswith(SUMS))
    mine = names[dist.rank()::dist.world_size()]
    for n in mine:
        fsync(tmp / n)
    part = tmp / f"{SUMS}.part{dist.rank():05d}"
    part.write_text("".join(f"{sha256_file(tmp / n)}  {n}\n" for n in mine))
    dist.barrier()
    if dist.is_main():
        parts = sorted(tmp.glob(f"{SUMS}.part*"))
        lines = sorted((ln for p in parts for ln in p.read_text().splitlines(keepends=True)),
                       key=lambda ln: ln.split("  ", 1)[1])
        (tmp / SUMS).write_text("".join(lines))
        for p in parts:
            p.unlink()


def sums_errors(step_dir: Path, rank: int = 0, world: int = 1) -> list[str]:
    """What does not match the SHA256SUMS written at save time (this rank's share of the files), read as
    untrusted (`configs.files.read_sums`: bounded, every path inside the step). Checkpoints from before
    pico wrote one have none, and pass."""
    f = Path(step_dir) / SUMS
    if not f.exists() and not f.is_symlink():
        return []
    try:
        entries = sorted(read_sums(f, MAX_SUMS_BYTES, "use another step", nested=True).items())
    except UserError as e:
        return [str(e)]
    errors = []
    for name, digest in entries[rank::world]:
        p = Path(step_dir) / name
        if p.is_symlink() or not p.is_file():  # a FIFO or a device would hang or never end the hash
            errors.append(f"{name} is missing or not a regular file")
        elif sha256_file(p) != digest:
            errors.append(f"{name} does not match its sha256 in {SUMS} (altered or damaged since it was saved)")
    return errors


@contextlib.contextmanager
def _optimizer_left_out(engine, left_out: bool):
    """Keep DeepSpeed from also writing the client optimizer's state into its model-states file
    when pico saves it per rank (SOAP shards its state by matrix: rank files hold every rank's)."""
    opt = getattr(engine, "optimizer", None)
    if not left_out or opt is None:
        yield
        return
    opt.state_dict = lambda: None  # an instance attribute shadows the method while DeepSpeed saves
    try:
        yield
    finally:
        del opt.state_dict


def _save_failed(ckpt_dir: Path, final: Path, tmp: Path, e: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    last = latest_checkpoint(ckpt_dir)
    return (f"writing checkpoint {final.name} into {ckpt_dir} failed ({type(e).__name__}: {_first_line(e)}; "
            f"{free}); the partial {tmp.name} was removed. Free some space (or set checkpoint.dir elsewhere), then "
            f"rerun with --resume, which continues from {last.name if last else 'step 0 (no checkpoint yet)'}")




def load_rank_state(path: Path, trust: bool = False) -> dict[str, Any]:
    f = Path(path) / f"rank{dist.rank():05d}.pt"
    if not f.exists():
        raise UserError(f"checkpoint {path} has no {f.name}: it was written by fewer ranks than this run has "
                        f"({dist.world_size()}). Resume with the same number of ranks")
    # Our own file: loader positions, RNG states (numpy arrays, python tuples), optimizer tensors.
    return safe_load(f, trust)


# What torch.load raises on a truncated or damaged file (zip reader, unpickler).
_UNREADABLE = (OSError, RuntimeError, EOFError, pickle.UnpicklingError)


def load_model_state(path: str | os.PathLike, trust: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 model state dict and run state of a checkpoint, whatever its ZeRO stage and rank count.

    Nothing outside the weights_only allowlist is unpickled unless `trust` (see the module doc)."""
    ckpt = resolve_checkpoint(path).resolve()  # the loaders get the directory check_pickles scanned
    run_state = read_run_state(ckpt)
    ds_dir = ckpt / DS_TAG
    stage = int(run_state.get("zero_stage", 0))
    check_pickles(ckpt, trust)  # ZeRO-3 consolidation unpickles with weights_only=False; one rule for every stage
    if stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"checkpoint {ckpt} is incomplete or corrupt (ZeRO-3 partitions): {e}") from None
        except _UNREADABLE as e:  # a truncated or damaged partition file
            raise UserError(f"checkpoint {ckpt}: a ZeRO-3 partition under {DS_TAG}/ cannot be read ({e}); it is "
                            "corrupt, use another step") from None
    else:
        f = ds_dir / "mp_rank_00_model_states.pt"
        if not f.exists():
            raise UserError(f"checkpoint {ckpt} lacks {f.relative_to(ckpt)}; it is incomplete, use another step")
        try:
            sd = safe_load(f, trust)["module"]
        except (KeyError, TypeError, IndexError) as e:
            raise UserError(f"checkpoint {ckpt}: {f.relative_to(ckpt)} cannot be read ({type(e).__name__}: {e}); "
                            "it is corrupt, use another step") from None
    sd = {k.removeprefix("module."): v.float() for k, v in sd.items()}
    return sd, run_state
