"""Where numbers go: `metrics.jsonl` in the run directory and a W&B run (offline by default).

Only rank 0 logs. The W&B run id is kept in `<out_dir>/wandb_run_id`, so a resumed job appends
to the same run instead of starting a new one. `metrics.jsonl` holds one history: a job that
starts at step S (its checkpoint's, or 0) moves the records of later steps, which a killed job
logged after its last checkpoint and this one logs again, to `metrics.superseded.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from pico.configs.files import public_paths
from pico.pipeline import dist


class MetricsLogger:
    """Append-only JSON lines plus W&B; both no-ops on ranks other than 0."""

    def __init__(self, out_dir: Path, logging_cfg, config_dict: dict[str, Any], resume: bool, start_step: int = 0):
        self.out_dir = Path(out_dir)
        self.enabled = dist.is_main()
        self.run = None
        self.jsonl = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _supersede(self.out_dir / "metrics.jsonl", start_step if resume else None)
        self.jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        if logging_cfg.wandb_mode != "disabled":
            self.run = self._init_wandb(logging_cfg, config_dict, resume)

    def _init_wandb(self, cfg, config_dict, resume: bool):
        import wandb

        id_file = self.out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if (resume and id_file.exists()) else secrets.token_hex(4)
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(
            project=cfg.project, entity=cfg.entity or None, name=cfg.run_name or self.out_dir.name,
            # W&B shares the config: data and run paths as a release shows them (no local layout, no URL keys)
            id=run_id, resume="allow", mode=cfg.wandb_mode, dir=str(self.out_dir), config=public_paths(config_dict),
            # no host metadata either: it records the command line, local paths included
            settings=wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, disable_git=True,
                                    quiet=True),
        )

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self.run, "dir", None) and str(Path(self.run.dir).parent)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), **{k: v for k, v in clean.items() if _jsonable(v)}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in clean.items() if not (isinstance(v, float) and not math.isfinite(v))},
                         step=step)

    def log_media(self, step: int, png: Path | None, html: Path | None, key: str = "routing") -> None:
        if not self.enabled or self.run is None:
            return
        import wandb

        media = {}
        if png is not None and png.exists():
            media[f"{key}/picture"] = wandb.Image(str(png))
        if html is not None and html.exists():
            media[f"{key}/html"] = wandb.Html(html.read_text())
        if media:
            self.run.log(media, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def close(self) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def _jsonable(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return isinstance(v, (int, str, bool, list, dict)) or v is None


def _supersede(path: Path, keep_through: int | None) -> None:
    """Move the records of steps after `keep_through` (all of them when None: a run starting over) from
    `path` to metrics.superseded.jsonl beside it. Appended there first, then `path` replaced, so a kill
    in between repeats records but loses none."""
    if not path.exists():
        return
    keep, moved = [], []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                step = None
            later = keep_through is None or not isinstance(step, (int, float)) or step > keep_through
            (moved if later else keep).append(line if line.endswith("\n") else line + "\n")
    if not moved:
        return
    with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
        f.writelines(moved)
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
