"""Checkpoints that are complete or absent.

Layout of one checkpoint (all ranks write into a temporary directory on a shared filesystem;
rank 0 renames it once every rank has finished, so a directory named `step_*` is complete):

    <checkpoint dir>/step_000200/
        ds/                    DeepSpeed's own files (model, ZeRO partitions, client optimizer)
        rank00000.pt           per rank: loader position, RNG states, sharded optimizer state
        pico_state.json        step, bytes seen, world size, the resolved config, last metrics

`--resume` loads the newest complete `step_*`. Older ones beyond `checkpoint.keep_last` are
deleted. `load_model_state()` turns any checkpoint (ZeRO 0-3, any rank count) into a plain
fp32 state dict for eval, generate and convert.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pico.pipeline import dist
from pico.configs.errors import UserError
from pico.configs.runs import (DS_TAG, STATE_FILE, latest_checkpoint, list_checkpoints, read_run_state,  # noqa: F401
                               resolve_checkpoint, step_dir_name)

def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, rank_state: dict[str, Any], run_state: dict[str, Any],
         keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / f".tmp-{step_dir_name(step)}"
    if dist.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of a save that was killed
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    part = tmp / f"rank{dist.rank():05d}.pt"
    torch.save(rank_state, str(part) + ".part")
    os.replace(str(part) + ".part", part)
    dist.barrier()
    if dist.is_main():
        missing = [r for r in range(dist.world_size()) if not (tmp / f"rank{r:05d}.pt").exists()]
        if missing:
            raise RuntimeError(f"checkpoint {tmp}: rank files {missing} are missing; is {ckpt_dir} on a "
                               "filesystem shared by all nodes?")
        (tmp / STATE_FILE).write_text(json.dumps(run_state, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_rank_state(path: Path) -> dict[str, Any]:
    f = Path(path) / f"rank{dist.rank():05d}.pt"
    if not f.exists():
        raise UserError(f"checkpoint {path} has no {f.name}: it was written by fewer ranks than this run has "
                        f"({dist.world_size()}). Resume with the same number of ranks")
    # Our own file: loader positions, RNG states (numpy arrays, python tuples), optimizer tensors.
    return torch.load(f, map_location="cpu", weights_only=False)


# What torch.load raises on a truncated or damaged file (zip reader, unpickler).
_UNREADABLE = (OSError, RuntimeError, EOFError, pickle.UnpicklingError)


def load_model_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 model state dict and run state of a checkpoint, whatever its ZeRO stage and rank count."""
    ckpt = resolve_checkpoint(path)
    run_state = read_run_state(ckpt)
    ds_dir = ckpt / DS_TAG
    stage = int(run_state.get("zero_stage", 0))
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
        # DeepSpeed's own file format is a pickle; we read only files our trainer wrote.
        try:
            sd = torch.load(f, map_location="cpu", weights_only=False)["module"]
        except (*_UNREADABLE, KeyError) as e:
            raise UserError(f"checkpoint {ckpt}: {f.relative_to(ckpt)} cannot be read ({type(e).__name__}: {e}); "
                            "it is corrupt, use another step") from None
    sd = {k.removeprefix("module."): v.float() for k, v in sd.items()}
    return sd, run_state
