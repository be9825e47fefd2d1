"""A design file: what an experiment compares, and the runs that follow from it.

    design = load_design("configs/experiments/routing-ladder-cpu.yaml")
    runs = plan(design, results)      # the runs ready to launch now, in launch order

A design is YAML read into the dataclasses below, strictly (an unknown key is an error naming
it, like the config tree). Paths may use ${VAR} (e.g. ${PICO_CORPUS}); relative ones are relative
to the directory `pico experiment` runs in, as for `pico train --config`.

The protocol, the same for every model:
- every run of a budget spends that budget's training FLOPs: steps = budget / (training FLOPs per
  byte x bytes per step), FLOPs per byte from `pico.model.flops` (the config alone, nothing built);
- shapes (`shape_rule`): `fixed` (one per model; with `match_flops`, every model within the
  tolerance of the reference's FLOPs per byte, a model's `match` field set by
  `pico.model.flops.match_flops`), `isoflop` (every shape at every budget; the table takes each
  model's best shape per budget on the select set, Chinchilla's IsoFLOP profile; with a model's
  `start`, its sweep begins with those shapes and adds the next listed one past an end that wins) or
  `ladder` (shape i at budget i, budgets ascending: the shape grows with the budget);
- the LR (`lr`): one per domain (`fixed`), or a sweep of `grid` at seed 0 for each domain, model and
  shape, at `lr.budget` (or, for a shape that does not run there, the smallest budget it runs at);
  the grid grows past an edge that wins, up to `extend` times; the lowest select-set bpb wins;
- seeds: `seeds` at every budget unless the budget names its own;
- a later stage in the same design: a budget with `shapes: best` runs each model's best shape of the
  sweep budget and its better neighbour at the first seed, then its other seeds at the one of the two
  that wins there (a family at its own best shape, and a neighbour to show it is the best).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pico.configs.errors import ConfigError, UserError
from pico.configs.tree import from_dict, load_config

try:
    from pico.configs.tree import read_yaml
except ImportError:  # a running experiment's worktree pins older training code; the harness must run on it
    def read_yaml(path: Path):
        try:
            return yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


@dataclass
class ModelSpec:
    """One model family: a config and its overrides, and the shapes it is tried at."""

    config: str = ""
    """Config file (a path, or a packaged name such as quickstart, spacebyte, vanilla)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides of that config, e.g. [model.router=learned]."""
    shapes: dict[str, list[str]] = field(default_factory=dict)
    """Shape name -> overrides of the shape (model.d_local=64, ...); empty: one shape, `base`, the config's own."""
    match: str = ""
    """fixed shapes with match_flops only: a model field (d_local) set so that FLOPs per byte match the reference's."""
    start: list[str] = field(default_factory=list)
    """isoflop only: the shapes swept first, adjacent names of `shapes` (listed smallest first). While the
    best of the swept shapes at the sweep budget is at an end of them and `shapes` lists one beyond it,
    that one is swept too, so the IsoFLOP minimum gets a shape on each side. Empty: every shape."""


@dataclass
class PrepSpec:
    """A corpus the design prepares itself with `pico prep`; held-out sets come from its val split."""

    inputs: list[str] = field(default_factory=list)
    """`pico prep --input` sources (files, directories, globs), e.g. [${PICO_CORPUS}/novels]."""
    val_fraction: float = 0.05
    """`pico prep --val-fraction`: documents held out by hash; test and select are cut from them."""
    test_kb: int = 512
    """Held-out test set size (KB): an equal slice of each test document, from its middle."""
    select_kb: int = 128
    """Select set size (KB): every 4th held-out document (the others are test), a slice of each."""


@dataclass
class DomainSpec:
    """Training data and held-out sets of one domain: given (train, test, select) or prepared (prep)."""

    train: list[str] = field(default_factory=list)
    """Training shard directories (`pico prep` output)."""
    test: list[str] = field(default_factory=list)
    """Held-out test set: text files or directories of them; the reported bpb."""
    select: list[str] = field(default_factory=list)
    """Held-out select set, disjoint from test: picks the LR and the shape, never reported as the result."""
    prep: PrepSpec | None = None
    """Or: a corpus to prepare (train shards, test and select from its val split)."""


@dataclass
class BudgetSpec:
    """One training budget (a bare number in YAML means {flops: N})."""

    flops: float = 0.0
    """Training FLOPs of every run at this budget."""
    seeds: list[int] = field(default_factory=list)
    """Seeds at this budget (empty: the design's `seeds`)."""
    shapes: Literal["all", "best"] = "all"
    """isoflop only. all: every shape runs here. best: two shapes run here at the first seed, the one with
    the lowest select bpb at the sweep budget (lr.budget) and its better neighbour (models list their
    shapes by size); the budget's other seeds then run at whichever of the two scores lower here."""


@dataclass
class LRSpec:
    """The LR rule: a sweep on the select set, or one LR per domain."""

    grid: list[float] = field(default_factory=list)
    """LRs swept at seed `seed`; the lowest select bpb wins."""
    budget: float = 0.0
    """Budget of the sweep (0: each shape's smallest budget)."""
    extend: int = 0
    """While the winner is at an edge of the grid, add half (twice) it, at most this many times."""
    seed: int = 0
    """Seed of the sweep runs (they double as that seed's run at the sweep budget)."""
    fixed: dict[str, float] = field(default_factory=dict)
    """Domain -> LR of every model (no sweep)."""


@dataclass
class MatchSpec:
    """Fixed shapes: every model's training FLOPs per byte within `tolerance` of `reference`'s."""

    reference: str = ""
    """The model the others are matched to."""
    tolerance: float = 0.03
    """Largest allowed |FLOPs per byte / reference's - 1|."""


@dataclass
class TargetSpec:
    """A claim the table checks per domain and budget: the best of `models` against the best of `against`
    (each family at its own best shape; the best family of a group, like its shape, chosen on the select set)."""

    name: str = ""
    """What the claim is, for the table (e.g. "best routed vs best plain")."""
    models: list[str] = field(default_factory=list)
    """The group whose best member is measured."""
    against: list[str] = field(default_factory=list)
    """The group whose best member is the reference."""
    at_most: float = 1.0
    """Met when the ratio of the test-bpb means over paired seeds is at most this."""
    budget: float = 0.0
    """The budget the claim is judged at (0: the largest); other budgets' ratios are shown as provisional."""


@dataclass
class ClusterSpec:
    """What one run asks a cluster for (Slurm array task or Ray job), and the GPU-hours estimate."""

    gpus: int = 0
    """GPUs per run (0: a CPU run)."""
    cpus: int = 1
    """CPU cores per run."""
    mem: str = "4G"
    """Slurm memory per run."""
    time: str = "04:00:00"
    """Slurm time limit per run (a preempted or timed-out run is requeued and resumes from its checkpoint)."""
    partition: str = ""
    account: str = ""
    qos: str = ""
    max_parallel: int = 0
    """Slurm array throttle (%N): most runs at once (0: no limit)."""
    assumed_mfu: float = 0.3
    """Model FLOPs utilisation assumed by the --dry-run time estimate on GPUs."""
    flops_per_s: float = 0.0
    """Measured training FLOP/s of one run (bytes/s x FLOPs per byte) for the --dry-run estimate; 0: GPUs at assumed_mfu of an H100's peak."""
    run_overhead_s: float = 30.0
    """Seconds per run besides training (start-up, checkpoints, scoring both held-out sets), for the estimate."""


@dataclass
class Design:
    """An experiment: models x domains x budgets x seeds, one LR rule and one shape rule for all."""

    name: str = ""
    """Short name (results and run folders are named after it)."""
    title: str = ""
    """One line for the table's heading."""
    models: dict[str, ModelSpec] = field(default_factory=dict)
    """Model name -> spec; the order is the launch order and the table's."""
    domains: dict[str, DomainSpec] = field(default_factory=dict)
    """Domain name -> its data."""
    budgets: list[BudgetSpec] = field(default_factory=list)
    """Training budgets in FLOPs."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of every budget that names none (a seed sets the init and the data order)."""
    lr: LRSpec = field(default_factory=LRSpec)
    shape_rule: Literal["fixed", "isoflop", "ladder"] = "fixed"
    """fixed: one shape per model; isoflop: every shape at every budget; ladder: shape i at budget i."""
    match_flops: MatchSpec | None = None
    """Fixed shapes: match every model's FLOPs per byte to a reference's."""
    baselines: list[str] = field(default_factory=list)
    """Models every other model is compared to (ratio of means over paired seeds); default: the first model."""
    overrides: list[str] = field(default_factory=list)
    """Overrides of every run (after the model's and the shape's), e.g. [optim.name=soap]."""
    targets: list[TargetSpec] = field(default_factory=list)
    """Claims the table checks (best of a group of models against the best of another, ratio at most N)."""
    warmup_fraction: float = 0.1
    """Linear warmup over this fraction of each run's steps, then cosine decay to 0.1 x the peak LR."""
    results: str = ""
    """Folder of the result JSONs and the table (default: runs/experiments/NAME); shared storage on a cluster."""
    work_dir: str = ""
    """Folder of run directories, logs and prepared data (default: runs/experiments/NAME/work)."""
    keep: Literal["checkpoints", "release", "none"] = "release"
    """What a finished run's directory keeps once scored: its checkpoints (~110 MB for a 2.5M-parameter model
    with SOAP's state), a release in RUN/release (weights and config, a few MB: `pico eval`/`generate` read
    it; the default) or only its config, logs and metrics."""
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    notes: str = ""
    """Free text: where the sizing came from (measured rates), what the design is for."""

    @property
    def results_dir(self) -> Path:
        return Path(expand(self.results, "results")) if self.results else Path(f"runs/experiments/{self.name}")

    @property
    def work(self) -> Path:
        return Path(expand(self.work_dir, "work_dir")) if self.work_dir else self.results_dir / "work"


@dataclass(frozen=True)
class Run:
    """One training run: a model at a shape, trained on a domain at a budget, LR and seed."""

    domain: str
    model: str
    shape: str
    budget: float
    lr: float
    seed: int

    def key(self, design: Design) -> str:
        shape = f"-{self.shape}" if len(shapes_of(design.models[self.model])) > 1 or design.shape_rule != "fixed" else ""
        return f"{self.domain}-{self.model}{shape}-{label(self.budget)}-lr{self.lr:g}-s{self.seed}"


def label(budget: float) -> str:
    """1e+13 -> 1e13, 3e+13 -> 3e13."""
    return f"{budget:g}".replace("+", "")


# ---------------------------------------------------------------------------------------------- loading


_VAR = re.compile(r"\$\{(\w+)\}")


def expand(value: str, key: str) -> str:
    """${VAR} from the environment; an unset one is an error naming the key."""
    def sub(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise UserError(f"{key}: {m.group(0)} is not set; export {m.group(1)}=... (see the design's notes)")
        return os.environ[m.group(1)]
    return _VAR.sub(sub, value)


def load_design(path: str | os.PathLike) -> Design:
    """Read and check a design file; every error is one line naming the key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"design file {path} does not exist")
    try:
        raw = read_yaml(p) or {}
    except ConfigError as e:
        raise UserError(str(e)) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping (name, models, domains, budgets, ...)")
    raw.setdefault("name", p.stem)
    if isinstance(raw.get("budgets"), list):  # a bare number is a budget with the design's seeds
        raw["budgets"] = [{"flops": b} if isinstance(b, (int, float, str)) else b for b in raw["budgets"]]
    try:
        design = _design(raw)
    except ConfigError as e:
        raise UserError(f"{path}: {e}") from None
    try:
        check(design)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return design


def _mapping(raw: dict, key: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping of names to entries, got {type(value).__name__}")
    return value


def _design(raw: dict) -> Design:
    """from_dict for the Design tree; the name -> entry mappings (models, domains, shapes, lr.fixed) are built here."""
    raw = dict(raw)
    models = {str(k): from_dict(ModelSpec, v, f"models.{k}") for k, v in _mapping(raw, "models").items()}
    domains = {str(k): from_dict(DomainSpec, v, f"domains.{k}") for k, v in _mapping(raw, "domains").items()}
    raw["models"], raw["domains"] = {}, {}
    design = from_dict(Design, raw)
    design.models, design.domains = models, domains
    for name, m in models.items():
        if not isinstance(m.shapes, dict):
            raise ConfigError(f"models.{name}.shapes must map shape names to lists of overrides")
        m.shapes = {str(s): [str(o) for o in (v if isinstance(v, list) else [v])] for s, v in m.shapes.items()}
    if not isinstance(design.lr.fixed, dict):
        raise ConfigError("lr.fixed must map domain names to learning rates")
    for d, lr in design.lr.fixed.items():
        try:
            design.lr.fixed[d] = float(lr)
        except (TypeError, ValueError):
            raise ConfigError(f"lr.fixed.{d}={lr!r} must be a number") from None
    return design


def shapes_of(spec: ModelSpec) -> dict[str, list[str]]:
    return spec.shapes or {"base": []}


def budgets(design: Design) -> list[float]:
    return sorted(b.flops for b in design.budgets)


def _budget(design: Design, budget: float) -> BudgetSpec:
    return next(b for b in design.budgets if b.flops == budget)


def seeds_at(design: Design, budget: float) -> list[int]:
    return _budget(design, budget).seeds or design.seeds


def picks_best(design: Design, budget: float) -> bool:
    """Whether the budget runs each model's best shape (and a neighbour) rather than every shape."""
    return _budget(design, budget).shapes == "best"


def shape_budgets(design: Design, model: str, shape: str) -> list[float]:
    """The budgets a shape runs at under the shape rule."""
    if design.shape_rule == "ladder":
        return [budgets(design)[list(shapes_of(design.models[model])).index(shape)]]
    return budgets(design)


def check(design: Design) -> None:
    """The design's own consistency (no configs loaded)."""
    if not design.models:
        raise UserError("models: none given; name at least one, e.g. models: {rule: {config: spacebyte}}")
    if not design.domains:
        raise UserError("domains: none given; name at least one with train/test/select or prep")
    if not design.budgets:
        raise UserError("budgets: none given; list training FLOPs, e.g. budgets: [1e13, 3e13]")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", design.name):
        raise UserError(f"name={design.name!r}: use letters, digits, - _ . (it names folders)")
    for name in [*design.models, *design.domains]:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.]*(-[A-Za-z0-9_.]+)*", name):
            raise UserError(f"{name!r}: model and domain names are letters, digits, - _ . (they name files)")
    for i, b in enumerate(design.budgets):
        if not b.flops > 0:
            raise UserError(f"budgets[{i}].flops={b.flops}: give a positive number of training FLOPs")
    if len({b.flops for b in design.budgets}) != len(design.budgets):
        raise UserError("budgets: a budget is listed twice")
    if not design.seeds:
        raise UserError("seeds: empty; give at least one seed")
    for name, m in design.models.items():
        if not m.config:
            raise UserError(f"models.{name}.config: missing; name a config file or a packaged config (quickstart)")
        n = len(shapes_of(m))
        if design.shape_rule == "fixed" and n > 1:
            raise UserError(f"models.{name}.shapes: {n} shapes with shape_rule fixed; use shape_rule isoflop or one shape")
        if design.shape_rule == "ladder" and n != len(design.budgets):
            raise UserError(f"models.{name}.shapes: shape_rule ladder needs one shape per budget "
                            f"({len(design.budgets)}, ascending), got {n}")
        if m.start:
            names = list(shapes_of(m))
            if design.shape_rule != "isoflop":
                raise UserError(f"models.{name}.start: only with shape_rule isoflop")
            if any(x not in names for x in m.start):
                bad = next(x for x in m.start if x not in names)
                raise UserError(f"models.{name}.start: {bad!r} is not one of its shapes ({', '.join(names)})")
            at = [names.index(x) for x in m.start]
            if at != list(range(at[0], at[0] + len(at))):
                raise UserError(f"models.{name}.start={m.start}: give adjacent shapes in the order of `shapes` "
                                f"({', '.join(names)}, smallest first)")
        if m.match and (design.shape_rule != "fixed" or design.match_flops is None):
            raise UserError(f"models.{name}.match: only with shape_rule fixed and a match_flops section")
    for name, d in design.domains.items():
        if d.prep is not None and (d.train or d.test or d.select):
            raise UserError(f"domains.{name}: give either prep or train/test/select, not both")
        if d.prep is None and not (d.train and d.test and d.select):
            missing = [k for k in ("train", "test", "select") if not getattr(d, k)]
            raise UserError(f"domains.{name}.{missing[0]}: missing; give train, test and select, or prep")
        if d.prep is not None and not d.prep.inputs:
            raise UserError(f"domains.{name}.prep.inputs: empty; name the corpus to prepare")
    lr = design.lr
    if bool(lr.grid) == bool(lr.fixed):
        raise UserError("lr: give exactly one of grid (a sweep on the select set) or fixed (domain -> LR)")
    for d in design.domains:
        if lr.fixed and d not in lr.fixed:
            raise UserError(f"lr.fixed.{d}: missing; every domain needs its LR")
    if lr.budget and lr.budget not in budgets(design):
        raise UserError(f"lr.budget={lr.budget:g} is not one of the budgets ({', '.join(map(label, budgets(design)))})")
    for b in design.baselines:
        if b not in design.models:
            raise UserError(f"baselines: {b!r} is not a model of the design ({', '.join(design.models)})")
    for i, t in enumerate(design.targets):
        for key in ("models", "against"):
            names = getattr(t, key)
            if not names:
                raise UserError(f"targets[{i}].{key}: empty; name the models of the group")
            for m in names:
                if m not in design.models:
                    raise UserError(f"targets[{i}].{key}: {m!r} is not a model of the design ({', '.join(design.models)})")
        if not t.at_most > 0:
            raise UserError(f"targets[{i}].at_most={t.at_most}: give a ratio > 0 (e.g. 0.97)")
        if t.budget and t.budget not in budgets(design):
            raise UserError(f"targets[{i}].budget={t.budget:g} is not one of the budgets "
                            f"({', '.join(map(label, budgets(design)))})")
    if design.match_flops is not None and design.match_flops.reference not in design.models:
        raise UserError(f"match_flops.reference={design.match_flops.reference!r} is not a model of the design")
    for i, b in enumerate(design.budgets):
        if b.shapes == "best" and (design.shape_rule != "isoflop" or not lr.grid or not lr.budget
                                   or lr.budget == b.flops or _budget(design, lr.budget).shapes != "all"):
            raise UserError(f"budgets[{i}].shapes=best: needs shape_rule isoflop and an LR sweep at another budget "
                            "whose shapes are all (lr.grid and lr.budget), where the best shape is chosen")
    if not 0 <= design.warmup_fraction < 1:
        raise UserError(f"warmup_fraction={design.warmup_fraction}: give a fraction in [0, 1)")


# ---------------------------------------------------------------------------------------------- models


@dataclass
class Shape:
    """A model at one shape, resolved: what `pico train` gets and what it costs."""

    config: str
    overrides: list[str]
    """The model's, the shape's, the match's and the design's overrides, in that order."""
    router: str
    params: int
    flops_per_byte: float
    bytes_per_step: int


def _dotted(o: str) -> str:
    return o if o.startswith("--") else f"--{o}"


def resolve_shape(design: Design, model: str, shape: str, _matched: dict | None = None) -> Shape:
    """Load the config of `model` at `shape` and count its FLOPs (a ConfigError names the model and shape)."""
    from pico.model.flops import flops_per_byte, match_flops, param_count

    spec = design.models[model]
    where = f"models.{model}" + (f".shapes.{shape}" if spec.shapes else "")
    overrides = [*map(_dotted, spec.overrides), *map(_dotted, shapes_of(spec)[shape]), *map(_dotted, design.overrides)]
    try:
        cfg = load_config(expand(spec.config, f"models.{model}.config"), overrides)
    except ConfigError as e:
        raise UserError(f"{where}: {e}") from None
    if spec.match:
        ref = resolve_shape(design, design.match_flops.reference, "base") if model != design.match_flops.reference else None
        if ref is not None:
            if not hasattr(cfg.model, spec.match):
                raise UserError(f"models.{model}.match={spec.match!r} is not a model field (model.{spec.match})")
            try:
                coarse = getattr(match_flops(cfg.model, ref.flops_per_byte, spec.match, range(8, 4097, 8)), spec.match)
                matched = match_flops(cfg.model, ref.flops_per_byte, spec.match, range(max(1, coarse - 8), coarse + 9))
            except ValueError as e:
                raise UserError(f"models.{model}.match: {e}") from None
            overrides.append(f"--model.{spec.match}={getattr(matched, spec.match)}")
            cfg = load_config(expand(spec.config, f"models.{model}.config"), overrides)
    m = cfg.model
    return Shape(config=spec.config, overrides=overrides, router=m.router, params=param_count(m),
                 flops_per_byte=flops_per_byte(m, training=True),
                 bytes_per_step=cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum)


def steps_for(shape: Shape, budget: float) -> int:
    return round(budget / (shape.flops_per_byte * shape.bytes_per_step))


def check_models(design: Design) -> dict[tuple[str, str], Shape]:
    """Resolve every model at every shape; check FLOP matching and that every budget is at least one step."""
    shapes = {(m, s): resolve_shape(design, m, s) for m, spec in design.models.items() for s in shapes_of(spec)}
    if design.match_flops is not None:
        ref = shapes[design.match_flops.reference, "base"].flops_per_byte
        for (m, s), sh in shapes.items():
            ratio = sh.flops_per_byte / ref
            if abs(ratio - 1) > design.match_flops.tolerance:
                how = (f"set models.{m}.match (e.g. d_local) or change its shape" if not design.models[m].match
                       else f"no value of model.{design.models[m].match} comes closer")
                raise UserError(f"models.{m}: {ratio:.3f}x {design.match_flops.reference}'s training FLOPs per byte, "
                                f"outside match_flops.tolerance {design.match_flops.tolerance:g}; {how}")
    for (m, s), sh in shapes.items():
        for b in shape_budgets(design, m, s):
            if steps_for(sh, b) < 1:
                one = sh.flops_per_byte * sh.bytes_per_step
                raise UserError(f"budgets: {label(b)} is smaller than one training step of models.{m}"
                                + (f" (shape {s})" if design.models[m].shapes else "")
                                + f", which costs {one:.3g} FLOPs; raise the budget or shrink the batch")
    return shapes


def spec_hash(run: Run, shape: Shape, steps: int) -> str:
    """A fingerprint of what the run trains: a finished result with another fingerprint is stale."""
    blob = json.dumps({"config": shape.config, "overrides": shape.overrides, "steps": steps, "lr": run.lr,
                       "seed": run.seed, "domain": run.domain}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def as_dict(design: Design) -> dict:
    return dataclasses.asdict(design)
