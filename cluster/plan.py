"""What a submission asks for, whether that can work, and what it will cost.

`Resources` is the request (nodes, GPUs, CPUs, memory, time); `check()` rejects requests that
cannot run before anything reaches a scheduler; `estimate()` sizes the job: model-state memory
per GPU under the configured ZeRO stage and the time to train the configured bytes at an
assumed MFU. Nothing here talks to Slurm or Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pico.configs.errors import ConfigError, UserError
from pico.configs.runs import STATE_FILE, latest_checkpoint
from pico.configs.tree import Config
from pico.model.config import hidden_width
from pico.model.flops import GPU_PEAK_FLOPS, flops_per_byte, param_count

H100_BF16_DENSE_FLOPS = GPU_PEAK_FLOPS["H100"]
"""The time estimate assumes H100s (dense bf16, no sparsity): the GPU a submission asks for is not known here."""

_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM_RE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", re.IGNORECASE)


@dataclass
class Resources:
    """One Slurm request. Defaults come from the config's `cluster` section, flags override them."""

    nodes: int
    gpus_per_node: int
    ranks_per_node: int
    """Training processes per node: one per GPU, or a chosen count of CPU ranks when gpus_per_node is 0."""
    cpus_per_task: int
    """CPU cores for the one launcher task on each node (shared by its ranks)."""
    mem: str
    time: str
    partition: str = ""
    account: str = ""
    qos: str = ""
    signal_grace: int = 300
    """Seconds between Slurm's warning signal and the time limit: the ranks' budget to checkpoint."""
    max_requeues: int = 20

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def resources_from(cfg: Config, **flags: Any) -> Resources:
    """The config's cluster section with every flag that is not None laid over it."""
    c = cfg.cluster

    def pick(name: str, default: Any) -> Any:
        return default if flags.get(name) is None else flags[name]

    gpus = pick("gpus_per_node", c.gpus_per_node)
    return Resources(
        nodes=pick("nodes", c.nodes), gpus_per_node=gpus,
        ranks_per_node=pick("ranks_per_node", gpus if gpus > 0 else 1),
        cpus_per_task=pick("cpus_per_task", c.cpus_per_task), mem=str(pick("mem", c.mem)),
        time=pick("time", c.time), partition=pick("partition", c.partition),
        account=pick("account", c.account), qos=pick("qos", c.qos),
        signal_grace=pick("signal_grace", 300), max_requeues=pick("max_requeues", 20))


def time_seconds(text: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME_RE.match(text.strip())
    if not m:
        raise UserError(f"--time {text!r} is not a Slurm time; use HH:MM:SS or D-HH:MM:SS (for example 24:00:00)")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    if b is not None:
        return a * 60 + b
    return a * 60


def mem_megabytes(text: str) -> int:
    """Slurm's --mem: a number with an optional K/M/G/T suffix (M when absent); 0 means the whole node."""
    m = _MEM_RE.match(text.strip())
    if not m:
        raise UserError(f"--mem {text!r} is not a Slurm memory size; use for example 64G, 500M or 0 (the whole node)")
    scale = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def check(cfg: Config, res: Resources) -> list[str]:
    """Reject a request that cannot run anywhere; return warnings for ones that can but look wrong."""
    if res.nodes < 1:
        raise UserError(f"--nodes {res.nodes}: request at least one node")
    if res.gpus_per_node < 0 or res.ranks_per_node < 1 or res.cpus_per_task < 1:
        raise UserError("--gpus-per-node must be >= 0, --ranks-per-node and --cpus-per-task >= 1")
    if res.gpus_per_node and res.ranks_per_node != res.gpus_per_node:
        raise UserError(f"--ranks-per-node {res.ranks_per_node} with --gpus-per-node {res.gpus_per_node}: a GPU job "
                        "runs exactly one rank per GPU; drop --ranks-per-node")
    if res.cpus_per_task < res.ranks_per_node:
        raise UserError(f"{res.ranks_per_node} ranks per node but --cpus-per-task {res.cpus_per_task}: give every "
                        f"rank at least one core (--cpus-per-task {res.ranks_per_node} or more)")
    limit = time_seconds(res.time)
    if res.signal_grace < 10 or res.signal_grace >= limit:
        raise UserError(f"--signal-grace {res.signal_grace}s must be at least 10 s and shorter than the time limit "
                        f"--time {res.time} ({limit}s): the warning would fire before any training")
    mem_megabytes(res.mem)
    if res.gpus_per_node == 0 and cfg.train.device == "cuda":
        raise UserError("train.device=cuda but --gpus-per-node 0: request GPUs, or set --train.device=cpu")
    warnings = []
    if res.gpus_per_node == 0 and cfg.train.precision == "bf16":
        warnings.append("train.precision=bf16 on CPU ranks: pico trains fp32 on CPU")
    return warnings


def check_fits(res: Resources, nodes_available: list[dict[str, int]]) -> None:
    """Reject a request the partition cannot hold (nodes from `sinfo`: cpus, mem_mb, gpus each)."""
    mem_mb = mem_megabytes(res.mem)
    fits = [n for n in nodes_available
            if n["cpus"] >= res.cpus_per_task and n["gpus"] >= res.gpus_per_node
            and (mem_mb == 0 or n["mem_mb"] >= mem_mb)]
    if len(fits) < res.nodes:
        best = max(nodes_available, key=lambda n: (n["gpus"], n["cpus"], n["mem_mb"]), default=None)
        where = f"partition {res.partition!r}" if res.partition else "the default partition"
        have = (f"{len(nodes_available)} node(s), the largest with {best['cpus']} CPUs, {best['gpus']} GPUs, "
                f"{best['mem_mb']} MB" if best else "no nodes")
        raise UserError(f"impossible request: {res.nodes} node(s) with {res.cpus_per_task} CPUs, "
                        f"{res.gpus_per_node} GPUs and {res.mem} memory each, but {where} has {have}. "
                        "Lower --nodes/--gpus-per-node/--cpus-per-task/--mem or pick another --partition")


def checkpoint_world_size(ckpt_dir: Path) -> tuple[Path, int] | None:
    """(newest complete checkpoint, ranks that wrote it), or None when there is none yet."""
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        return None
    try:
        state = json.loads((latest / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    world = state.get("world_size") if isinstance(state, dict) else None
    if not isinstance(world, int):
        world = len(list(latest.glob("rank*.pt")))
    return latest, world


def check_resume(cfg: Config, res: Resources) -> None:
    """The job always starts with --resume: its world size must match the checkpoint it would resume."""
    found = checkpoint_world_size(cfg.checkpoint_dir)
    if found is None or found[1] in (0, res.world_size):
        return
    latest, world = found
    raise UserError(
        f"world size mismatch: {latest} was written by {world} ranks, but this request runs {res.world_size} "
        f"({res.nodes} node(s) x {res.ranks_per_node} ranks) and the job resumes from that checkpoint. Request "
        f"{world} ranks, or start a new run (--train.out_dir=... or --checkpoint.dir=...)")


# ---------------------------------------------------------------------------------------------
# Estimates


def _model_numbers(cfg: Config) -> tuple[int, float]:
    """(parameters, training FLOPs per byte), counted from the config without building the model. The router's
    own counts come from its class (pico.model.flops), which also refuses an unknown router or its options."""
    try:
        return param_count(cfg.model), flops_per_byte(cfg.model, training=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _largest_layer(cfg: Config) -> int:
    """Parameters of the widest linear layer (a latent SwiGLU projection): ZeRO-3 gathers one at a time."""
    m = cfg.model
    return max(m.d_latent * hidden_width(m.d_latent, m.mlp_ratio), m.d_local * hidden_width(m.d_local, m.mlp_ratio))


@contextlib.contextmanager
def _quiet_deepspeed_import():
    """DeepSpeed probes for an accelerator on import and logs a warning on a login node without
    GPUs; only its estimators are needed here, so name the CPU accelerator for the import alone."""
    saved = os.environ.get("DS_ACCELERATOR")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("DS_ACCELERATOR", None)


def model_state_bytes_per_gpu(params: int, zero_stage: int, gpus_per_node: int, nodes: int,
                              largest_layer: int, precision: str = "bf16") -> tuple[int, str]:
    """Weights + gradients + Adam state per GPU, and where the number comes from.

    Stages 2 and 3 use DeepSpeed's own estimators (no offload; they assume bf16/fp16 mixed
    precision). Stages 0 and 1 use the same accounting by hand: with bf16, 2 bytes of weights and
    2 of gradients plus 16 of fp32 master weights, gradients and Adam moments per parameter;
    with fp32, 4 + 4 + 8. Stage 1 splits the optimizer part across GPUs.
    """
    n = gpus_per_node * nodes
    replicated, optim = (4, 16) if precision == "bf16" else (8, 8)
    if zero_stage == 0:
        return (replicated + optim) * params, f"weights + grads + Adam, replicated ({replicated}+{optim} bytes/param, {precision})"
    if zero_stage == 1:
        return replicated * params + optim * params // n, f"weights + grads replicated, Adam state sharded (ZeRO-1, {precision})"
    if zero_stage == 2:
        with _quiet_deepspeed_import():
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=False)
        return gpu, "DeepSpeed estimate_zero2_model_states_mem_needs, no offload"
    with _quiet_deepspeed_import():
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, gpus_per_node, nodes,
                                                      cpu_offload=False, cpu_offload_params=False)
    return gpu, "DeepSpeed estimate_zero3_model_states_mem_needs, no offload"


def estimate(cfg: Config, res: Resources) -> dict[str, Any]:
    """Memory per GPU and time to train, as numbers plus the assumptions behind them."""
    params, fpb = _model_numbers(cfg)
    t = cfg.train
    bytes_per_step = t.grad_accum * cfg.data.batch_size * cfg.data.seq_len * res.world_size
    out: dict[str, Any] = {
        "world_size": res.world_size, "nodes": res.nodes, "gpus_per_node": res.gpus_per_node,
        "ranks_per_node": res.ranks_per_node, "zero_stage": t.zero_stage, "params": params,
        "train_bytes": t.steps * bytes_per_step, "bytes_per_step": bytes_per_step,
        "flops_per_byte": fpb, "assumed_mfu": cfg.cluster.assumed_mfu,
    }
    if res.gpus_per_node > 0:
        mem, how = model_state_bytes_per_gpu(params, t.zero_stage, res.gpus_per_node, res.nodes, _largest_layer(cfg),
                                             t.precision)
        out.update(model_state_gib_per_gpu=mem / 2**30, memory_method=how)
        flops = fpb * out["train_bytes"]
        out.update(train_flops=flops, peak_flops_per_gpu=H100_BF16_DENSE_FLOPS,
                   hours=flops / (res.gpus * H100_BF16_DENSE_FLOPS * cfg.cluster.assumed_mfu) / 3600)
    return out


def describe(est: dict[str, Any], optimizer: str) -> str:
    """The estimate as the lines `--dry-run` prints."""
    lines = [f"plan: {est['nodes']} node(s) x {est['ranks_per_node']} ranks = world size {est['world_size']}; "
             f"ZeRO stage {est['zero_stage']}"]
    lines.append(f"  bytes to train: {est['train_bytes']:,} ({est['bytes_per_step']:,} per optimizer step)")
    lines.append(f"  parameters: {est['params']:,}")
    if "model_state_gib_per_gpu" in est:
        note = ("; counted as Adam: SOAP adds Kronecker factors and eigenbases per matrix, which pico shards "
                "across ranks by matrix") if optimizer == "soap" else ""
        lines.append(f"  model states per GPU: {est['model_state_gib_per_gpu']:.2f} GiB ({est['memory_method']}; "
                     f"activations come on top{note})")
    if "hours" in est:
        lines.append(f"  time: {est['hours']:.2f} h for {est['train_flops']:.3g} FLOPs at MFU {est['assumed_mfu']:.0%} "
                     f"of {H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s per GPU (H100 bf16 dense peak)")
    else:
        lines.append("  time: not estimated for CPU ranks (no stated peak)")
    return "\n".join(lines)
