"""The on-disk layout of a training run, readable without torch: where checkpoints are and what they record.

    <run dir>/checkpoints/step_000200/
        ds/                 DeepSpeed's files            (DS_TAG)
        rank00000.pt        one per rank
        pico_state.json     step, world size, the resolved config, last metrics   (STATE_FILE)

A `step_*` directory with a `pico_state.json` is complete (the trainer renames it into place
only when every rank has written). The trainer writes checkpoints with
`pico.pipeline.train.checkpoint`; everything that only needs to find or inspect them (resume,
`pico convert`, `pico eval`, and cluster/ checking a resume's world size on a login node) uses
this module, which imports neither torch nor the trainer.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pico.configs.errors import UserError

STEP_RE = re.compile(r"^step_(\d{6,})$")
DS_TAG = "ds"
STATE_FILE = "pico_state.json"


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint at `step` (step_NNNNNN)."""
    return f"step_{step:06d}"


def step_of(step_dir: Path) -> int:
    """The step of a checkpoint directory (step_NNNNNN)."""
    m = STEP_RE.match(Path(step_dir).name)
    if m is None:
        raise ValueError(f"{step_dir} is not a checkpoint directory (step_NNNNNN)")
    return int(m.group(1))


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=step_of)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint under ckpt_dir, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


# --trust-checkpoint's help, shared by the commands that load checkpoints (train --resume, eval, generate, convert)
TRUST_HELP = ("checkpoints only: their .pt files are pickles, which DeepSpeed's loaders unpickle in full, so pico "
              "first checks every one against an allowlist and refuses a checkpoint naming anything else; this flag "
              "skips that check (a crafted checkpoint then runs code; releases never need it)")


MAX_STATE_BYTES = 16 << 20  # pico_state.json: a config and a few metrics, KBs
MAX_WORLD = 1 << 16  # ranks: a world_size past this in pico_state.json is damage, not a run


def read_run_state(path: Path) -> dict[str, Any]:
    """pico_state.json of a complete checkpoint (step, world size, config, metrics)."""
    f = Path(path) / STATE_FILE
    if not f.exists():
        raise UserError(f"{path} is not a complete pico checkpoint (no {STATE_FILE}); pass a step_* directory "
                        "or the checkpoint directory that holds them")
    try:
        if not f.is_file() or f.stat().st_size > MAX_STATE_BYTES:
            raise ValueError(f"not a regular file of at most {MAX_STATE_BYTES >> 20} MiB")
        state = json.loads(f.read_text())
    except OSError as e:
        raise UserError(f"{f} cannot be read ({e.strerror or e}); use another step_* checkpoint") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{f} is damaged (not JSON: {str(e)[:200]}); use another step_* checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "step" not in state:
        raise UserError(f"{f} is damaged (no step or config in it); use another step_* checkpoint")
    bad = [f"{k}={state.get(k)!r}"[:80] for k, lo, hi in (("step", 0, 1 << 62), ("world_size", 1, MAX_WORLD),
                                                          ("zero_stage", 0, 3))
           if k in state and not (type(state[k]) is int and lo <= state[k] <= hi)]
    bad += [f"config.{k} is a {type(v).__name__}" for k, v in state["config"].items() if not isinstance(v, dict)]
    if bad or not isinstance(state["config"].get("model"), dict):
        raise UserError(f"{f} is damaged ({', '.join(bad) or 'no model config'}); use another step_* checkpoint")
    return state


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step_* directory, or a checkpoint directory / run directory holding them -> newest step."""
    p = Path(path)
    if (p / STATE_FILE).exists():
        return p
    for cand in (p, p / "checkpoints"):
        latest = latest_checkpoint(cand)
        if latest is not None:
            return latest
    raise UserError(f"no complete pico checkpoint under {p}: expected a step_NNNNNN directory with "
                    f"{STATE_FILE}, a checkpoints/ directory, or a run directory")
