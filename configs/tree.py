"""The config tree: one typed dataclass per component, loaded from YAML with strict dotted overrides.

    cfg = load_config("configs/quickstart.yaml", ["--optim.lr=3e-4", "--model.capacity=0.25"])
    cfg.model   # ModelConfig: handed to the model and nothing else
    cfg.data    # DataConfig:  handed to the loader
    ...

Unknown keys, wrong types and values outside a Literal's choices raise `ConfigError`, whose
message names the dotted key and lists what is valid. Each component receives only its own
sub-config (torchtitan's lesson: a monolithic config passed everywhere leaks).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pico.configs.errors import ConfigError
from pico.model.config import ModelConfig


@dataclass
class MixSource:
    """One source of a weighted training mixture (`data.mix`)."""

    name: str = ""
    """Short name, used in metrics (`bpb_train/NAME`, `val/bpb/NAME`, `data/bytes_seen/NAME`)."""
    paths: list[str] = field(default_factory=list)
    """Shard directories, globs or s3:// URLs of this source (the train split is trained on, the val split scored)."""
    weight: float = 1.0
    """Share of training bytes, relative to the other sources' weights (0: scored, never trained on)."""


@dataclass
class DataConfig:
    """Where training bytes come from and how they are packed into sequences."""

    train: list[str] = field(default_factory=list)
    """Training shards: directories written by `pico prep`, globs, or s3:// URLs (`{split}-*.tar` inside a directory)."""
    val: list[str] = field(default_factory=list)
    """Validation shards (same forms as train); empty means: the val split of the train directories (or of every data.mix source)."""
    mix: list[MixSource] = field(default_factory=list)
    """Weighted sources instead of data.train, e.g. [{name: web, paths: [s/web], weight: 0.7}, {name: code, paths: [s/code], weight: 0.3}]: each batch row comes from one source, so that byte shares follow the weights; a small source repeats its epochs while a large one goes on."""
    seq_len: int = 512
    """Bytes per training sequence (the model sees seq_len inputs; targets run n_predict bytes further)."""
    batch_size: int = 8
    """Sequences per rank per micro-step."""
    num_workers: int = 0
    """Loader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 256
    """Documents held in the seeded shuffle buffer of each loader worker."""
    shuffle_buffer_bytes: int = 64 * 2**20
    """Cap on the bytes held in each worker's shuffle buffer (documents can be 16 MiB chunks), so memory stays bounded."""
    skip_corrupt: bool = False
    """Skip (and count) corrupt shards or samples instead of stopping with an error."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be >= 2")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size} must be >= 1")
        if self.num_workers < 0 or self.shuffle_buffer < 1 or self.shuffle_buffer_bytes < 1:
            raise ConfigError("data.num_workers must be >= 0, data.shuffle_buffer and data.shuffle_buffer_bytes >= 1")
        _check_mix(self)


def _check_mix(data: DataConfig) -> None:
    """data.mix: named, non-empty sources with weights >= 0 that sum to more than 0, and not beside data.train."""
    if not data.mix:
        return
    if data.train:
        raise ConfigError("data.train and data.mix are both set; list every training source in data.mix "
                          "(--data.train=[]) or drop data.mix")
    seen: set[str] = set()
    for i, src in enumerate(data.mix):
        key = f"data.mix[{i}]"
        if not src.name or not src.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{key}.name={src.name!r}: give each source a short name of letters, digits, - or _")
        if src.name in seen:
            raise ConfigError(f"{key}.name={src.name!r} is used twice; source names must be unique")
        seen.add(src.name)
        if not src.paths:
            raise ConfigError(f"{key}.paths is empty: list the shard directories of source {src.name!r}")
        if src.weight < 0:
            raise ConfigError(f"{key}.weight={src.weight} is negative; weights are shares >= 0")
    if sum(src.weight for src in data.mix) <= 0:
        raise ConfigError("data.mix weights sum to 0; give at least one source a weight > 0")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "soap"] = "adamw"
    """Optimizer: adamw (torch AdamW) or soap (Shampoo-preconditioned Adam, sharded by matrix)."""
    lr: float = 1e-3
    """Peak learning rate."""
    lr_scale_local: float = 1.0
    """LR multiplier of the local (byte-level) stage: embedding, local blocks, MTP heads, final norm, unembedding, dechunk residual."""
    lr_scale_latent: float = 1.0
    """LR multiplier of the latent stage: the latent blocks and their projections in and out."""
    lr_scale_router: float = 1.0
    """LR multiplier of the router's parameters (MoD score and predictor, chunk W_q/W_k, router_prior's weight)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas (SOAP's paper default is [0.95, 0.95])."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms and 1-D parameters)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: warmup then cosine decay; wsd: warmup, stable, then linear decay; constant: warmup then flat."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    decay_fraction: float = 0.2
    """WSD only: fraction of the steps spent in the final decay."""
    shampoo_beta: float = 0.95
    """SOAP: EMA factor of the Kronecker factors."""
    precondition_frequency: int = 10
    """SOAP: steps between eigenbasis refreshes."""
    max_precond_dim: int = 10000
    """SOAP: dimensions larger than this are not preconditioned (Adam along them)."""
    merge_dims: bool = False
    """SOAP: merge neighbouring dimensions, from the first, while their product stays under max_precond_dim (as the reference SOAP does: a weight smaller than that becomes one vector, i.e. Adam, or with precondition_1d one factor as large as the weight)."""
    precondition_1d: bool = False
    """SOAP: also precondition 1-D parameters (off: Adam for them)."""

    def __post_init__(self) -> None:
        if not self.lr > 0 or not math.isfinite(self.lr):  # `not x > 0` also refuses nan
            raise ConfigError(f"optim.lr={self.lr} must be a finite number > 0")
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0 (0 disables it)")
        for stage in ("local", "latent", "router"):
            scale = getattr(self, f"lr_scale_{stage}")
            if not scale > 0 or not math.isfinite(scale):
                raise ConfigError(f"optim.lr_scale_{stage}={scale} must be a finite number > 0 (1 = optim.lr)")
        if not 0 < self.eps < math.inf:
            raise ConfigError(f"optim.eps={self.eps} must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 <= self.grad_clip < math.inf:
            raise ConfigError(f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction} must be in [0, 1] (a fraction of the "
                              "steps, 0.2 = the last 20 %)")
        if not 0 <= self.shampoo_beta < 1:
            raise ConfigError(f"optim.shampoo_beta={self.shampoo_beta} must be in [0, 1)")
        if self.precondition_frequency < 1 or self.max_precond_dim < 1:
            raise ConfigError(f"optim.precondition_frequency={self.precondition_frequency} and optim.max_precond_dim="
                              f"{self.max_precond_dim} must be >= 1")


@dataclass
class TrainConfig:
    """The training loop: length, parallelism, precision, evaluation."""

    out_dir: str = "runs/pico"
    """Run directory: resolved config, metrics.jsonl, checkpoints, routing pictures, W&B files."""
    steps: int = 1000
    """Optimizer steps to train."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (SOAP shards its own state by matrix and needs stage 0)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 (always on CPU) or bf16 mixed precision (GPU)."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU."""
    seed: int = 0
    """Seed for weights, data order and dropout-free sampling."""
    eval_every: int = 200
    """Evaluate validation bits per byte every this many steps (and at the end)."""
    eval_batches: int = 20
    """Validation batches per evaluation (0 = the whole validation split)."""
    log_every: int = 10
    """Write metrics every this many steps."""
    compile: bool = False
    """torch.compile the model through DeepSpeed's engine.compile (GPU runs; off on CPU and in CI, where compiling even a tiny model takes minutes)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage} must be one of 0, 1, 2, 3")
        if self.steps < 1 or self.grad_accum < 1:
            raise ConfigError("train.steps and train.grad_accum must be >= 1")
        if self.eval_every < 1 or self.log_every < 1:
            raise ConfigError("train.eval_every and train.log_every must be >= 1")


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written."""

    every: int = 200
    """Save a checkpoint every this many steps (and at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted."""
    dir: str = ""
    """Checkpoint directory; empty means <train.out_dir>/checkpoints."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ConfigError("checkpoint.every and checkpoint.keep_last must be >= 1")


@dataclass
class LoggingConfig:
    """Weights & Biases and local metrics."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """offline writes a run under <out_dir>/wandb to sync later; online streams to W&B; disabled skips W&B."""
    project: str = "pico"
    """W&B project."""
    entity: str = ""
    """W&B entity (team); empty uses your default."""
    run_name: str = ""
    """W&B run name; empty uses the run directory's name."""


@dataclass
class ClusterConfig:
    """Defaults for `pico submit`; command-line flags override them."""

    nodes: int = 1
    """Nodes to request."""
    gpus_per_node: int = 1
    """GPUs (= training ranks) per node; 0 runs CPU ranks (gloo)."""
    cpus_per_task: int = 8
    """CPU cores per node launcher."""
    partition: str = ""
    """Slurm partition (empty: the cluster default)."""
    time: str = "24:00:00"
    """Slurm time limit (HH:MM:SS or D-HH:MM:SS)."""
    account: str = ""
    """Slurm account."""
    qos: str = ""
    """Slurm QoS."""
    mem: str = "0"
    """Slurm memory per node (0 = all of it)."""
    assumed_mfu: float = 0.35
    """Model FLOPs utilisation assumed when `--dry-run` estimates the training time."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ConfigError("cluster.nodes must be >= 1 and cluster.gpus_per_node >= 0")


@dataclass
class Config:
    """The whole run: one sub-config per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}: raise model.max_seq_len or lower data.seq_len")
        if self.optim.name == "soap" and self.train.zero_stage != 0:
            raise ConfigError(
                f"optim.name=soap with train.zero_stage={self.train.zero_stage}: DeepSpeed ZeRO 1-3 hand the "
                "optimizer flat 1-D partitions, so SOAP would never see a weight matrix. pico shards SOAP's "
                "state itself (whole matrices per rank); set train.zero_stage=0, or use optim.name=adamw")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or os.path.join(self.train.out_dir, "checkpoints"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Strict construction from plain dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting the few safe cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    pass
        raise ConfigError(f"{key}={value!r} does not have type {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and item_tp is str:
            value = [value]  # a single path where a list of paths is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list of {_type_name(item_tp)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the list of valid ones."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    if hasattr(cls, "upgrade"):  # keys an older pico wrote (ModelConfig.RETIRED)
        try:
            data = cls.upgrade(data, where)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        dotted = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        raise ConfigError(f"unknown key {dotted}; valid keys of {where}: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--optim.lr=3e-4", "model.router=none"]` -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for arg in args:
        item = arg[2:] if arg.startswith("--") else arg
        if "=" not in item:
            raise ConfigError(f"override {arg!r} must look like --section.key=value (for example --optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {arg!r}: the key must be dotted, like optim.lr or model.d_local")
        value = _parse_scalar(raw)
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with another override of {p}")
        node[parts[-1]] = value
    return nested


def _parse_scalar(raw: str) -> Any:
    """YAML scalar parsing, plus the numbers YAML 1.1 leaves as strings (`3e-4`, `1e6`)."""
    if raw == "":
        return ""
    value = yaml.load(raw, Loader=YamlLoader)
    if isinstance(value, str):
        for conv in (int, float):
            try:
                return conv(value)
            except ValueError:
                pass
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def packaged_config(name: str) -> Path:
    """Path of a YAML file shipped in pico.configs (for example 'quickstart')."""
    from importlib import resources

    path = Path(str(resources.files("pico.configs").joinpath(f"{name}.yaml")))
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no packaged config named {name!r}; available: {', '.join(have)}")
    return path


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A YAML path, or the bare name of a packaged config ('quickstart', 'pico-125m', ...)."""
    p = Path(path)
    if p.exists():
        return p
    if p.suffix == "" and os.sep not in str(path):
        return packaged_config(str(path))
    raise ConfigError(f"config file {path} does not exist; pass a YAML path or a packaged name "
                      f"({', '.join(sorted(q.stem for q in packaged_config('quickstart').parent.glob('*.yaml')))})")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe YAML 1.1 without base-60 numbers: `time: 48:00:00` stays the string it looks like
    (YAML 1.1 reads it as 172800, which Slurm would take as minutes: 120 days)."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))

MAX_YAML_BYTES = 4 << 20
MAX_YAML_VALUES = 1_000_000


def read_yaml(path: Path) -> Any:
    """A user's YAML file (a config, a design), bounded: at most MAX_YAML_BYTES, and at most MAX_YAML_VALUES
    values with its aliases expanded (a few hundred bytes of nested aliases stand for billions of values,
    which any later walk or message would write out). Every problem is a one-line ConfigError naming it."""
    try:
        size = path.stat().st_size
        if not path.is_file() or size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: not a regular file of at most {MAX_YAML_BYTES >> 20} MiB; a YAML file "
                              "of pico's is a few KB")
        raw = yaml.load(path.read_text(), Loader=YamlLoader)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, RecursionError, ValueError) as e:  # unreadable, nested past Python's stack, a 5000-digit int
        raise ConfigError(f"{path}: cannot be read as YAML ({type(e).__name__}: {str(e)[:200]})") from None
    left, stack = MAX_YAML_VALUES, [raw]
    while stack:  # iterative, and shared (aliased) parts count each time they appear
        node = stack.pop()
        left -= 1
        if left < 0:
            raise ConfigError(f"{path}: more than {MAX_YAML_VALUES:,} values once its aliases are expanded; "
                              "write the file out without nested aliases")
        if isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Config:
    """Load YAML (or defaults when `path` is None), apply `extra` then dotted `overrides`, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = resolve_config_path(path)
        raw = read_yaml(p) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, ...)")
    if extra:
        raw = _merge(raw, extra)
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
    return from_dict(Config, raw)


def save_config(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config as `config.yaml` into `run_dir` (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(cfg.to_yaml())
    os.replace(tmp, out)
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings of a config dataclass, read from its source (one place for help text)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = " ".join(str(node.value.value).split())  # type: ignore[union-attr]
    return docs


def describe_config() -> str:
    """Every key of the tree with its type, default and help: the text of `--help-config`."""
    lines = []
    root = Config.__new__(Config)  # defaults without validation of cross-section rules
    for sec in dataclasses.fields(Config):
        cls = sec.type if isinstance(sec.type, type) else typing.get_type_hints(Config)[sec.name]
        lines.append(f"{sec.name}:  {cls.__doc__.strip().splitlines()[0] if cls.__doc__ else ''}")
        docs = field_docs(cls)
        default = cls()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            val = getattr(default, f.name)
            lines.append(f"  {sec.name}.{f.name} ({_type_name(hints[f.name])}, default {val!r})")
            if f.name in docs:
                lines.append(f"      {docs[f.name]}")
    del root
    return "\n".join(lines)
