"""`pico train`: train Pico with DeepSpeed from a YAML config plus dotted overrides.

The same command runs as one process or one process per rank under torchrun, deepspeed or
srun, on CPU (gloo, fp32) or GPU (nccl, bf16 autocast). A step is: `grad_accum` micro-batches
from the streaming loader, DeepSpeed's backward (gradient all-reduce or ZeRO reduce-scatter),
clipping and the optimizer step, with the learning rate set by pico's schedule. Every
`checkpoint.every` steps all ranks write a complete-or-absent checkpoint that holds the loader
position, RNG states and optimizer state, so `--resume` continues exactly where a killed job
stopped. SIGUSR1/SIGTERM (Slurm's warning before the time limit) make the run save and exit
with code 75; rerun the same command with `--resume`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import math
import resource
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pico.configs.errors import UserError
from pico.configs.files import strict_json
from pico.configs.lock import hold
from pico.configs.runs import TRUST_HELP
from pico.configs.tree import Config, describe_config, load_config, save_config
from pico.model.flops import GPU_PEAK_FLOPS
from pico.pipeline import dist
from pico.pipeline.train import checkpoint as ckpt

ACCEPTS_OVERRIDES = True
EXIT_PREEMPTED = 75
EPILOG = ("Any config key can be overridden: --optim.lr=3e-4 --model.capacity=0.25 --train.steps=100.\n"
          "`pico train --help-config` lists every key with its type, default and meaning.\n"
          "Multi-rank: torchrun --nproc_per_node 2 -m pico.pipeline.cli train --config FILE")


# Param-group settings a resumed run takes from its config, not from the checkpoint (torch restores them as
# saved), and the optimizer settings that shape the saved state, which a resumed run cannot change.
CONFIG_GROUP_KEYS = frozenset({"lr", "lr_scale", "betas", "eps", "weight_decay", "precondition_frequency",
                               "shampoo_beta"})
STRUCTURAL_OPTIM_KEYS = ("name", "max_precond_dim", "merge_dims", "precondition_1d")


class TrainingDiverged(UserError):
    """Loss became NaN or infinite; the last good checkpoint is kept."""


class _Preemption:
    """Remembers that SIGUSR1/SIGTERM arrived; the loop checks it between steps."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test harness thread)
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """DeepSpeed's JSON config, derived from pico's tree (the only place DeepSpeed is configured)."""
    zero: dict[str, Any] = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage == 3:
        # Small models on CPU: keep every parameter partitioned so the code path is the real one.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        # DeepSpeed 0.19.8 silently defaults this to 1.0; pico always sets it.
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": False},
    }


def apply_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each block (every member of the model's ModuleLists) in the backward pass.

    Applied from outside the model by wrapping `forward`, so parameter names do not change and
    checkpoints stay interchangeable with runs that do not checkpoint activations."""
    from torch.utils.checkpoint import checkpoint

    wrapped = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                inner = block.forward
                block.forward = functools.partial(checkpoint, inner, use_reentrant=False)
                wrapped += 1
    return wrapped


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large fp32 matmul on this CPU right now: the yardstick for CPU utilisation."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _peak_flops(device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s of one rank for MFU; an unknown GPU is measured against the H100 number and says so."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak, f"{key} dense bf16"
        return GPU_PEAK_FLOPS["H100"], f"H100 dense bf16 (unknown GPU {name})"
    return measure_matmul_flops(), "measured fp32 matmul on this CPU"


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resume_point(ckpt_dir: Path, rank: int, world: int, trust: bool) -> Path | None:
    """The newest checkpoint that reads back on every rank; newer damaged ones are named, with the reason, and
    skipped. A checkpoint refused as untrusted stops the run instead: it is not damage to route around.

    Every rank makes the same collective calls: the ranks first agree on the listing (a stale listing on
    one node would otherwise pair one rank's calls with another's), then on each checkpoint's verdict,
    the worst of any rank's (0 reads back, 1 damaged in some rank's share, 2 untrusted)."""
    found = ckpt.list_checkpoints(ckpt_dir)
    listing = int(hashlib.sha256(" ".join(p.name for p in found).encode()).hexdigest()[:12], 16)  # exact in float64
    if not dist.same_on_all_ranks(listing):
        raise UserError(f"--resume: the ranks found different checkpoints under {ckpt_dir} (this rank: "
                        f"{', '.join(p.name for p in found) or 'none'}); put checkpoint.dir on storage every node "
                        "sees alike")
    for path in reversed(found):
        verdict, refusal = 0, None
        try:
            ckpt.check_complete(path, ckpt.read_run_state(path))
            damage = ckpt.sums_errors(path, rank, world)  # each rank hashes its share
            if damage:
                raise UserError("; ".join(damage))
            ckpt.check_pickles(path, trust)  # DeepSpeed's loader unpickles with weights_only=False
        except ckpt.UntrustedCheckpoint as e:
            verdict, refusal = 2, e
        except UserError as e:
            print(f"--resume: skipping damaged checkpoint {path.name}: {e}", file=sys.stderr)
            verdict = 1
        worst = dist.rank_max(verdict)
        if worst == 2:
            raise refusal or ckpt.UntrustedCheckpoint(f"--resume: another rank refused {path} as untrusted; "
                                                      f"{ckpt.TRUST_HINT}")
        if worst == 0:
            return path
    return None


class Trainer:
    """Owns the engine, the loader, the loggers and the loop. Build, then `fit()`."""

    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True, trust: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.trust = trust  # --trust-checkpoint: let DeepSpeed unpickle files outside the allowlist
        self.progress = progress and dist.is_main()
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = cfg.checkpoint_dir
        self.device = dist.pick_device(cfg.train.device)
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints to stdout; --json owns it
            dist.init(self.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.autocast_dtype = torch.bfloat16 if (cfg.train.precision == "bf16" and self.device.type == "cuda") else None
        if cfg.train.precision == "bf16" and self.device.type == "cpu":
            dist.print0("note: train.precision=bf16 on CPU runs fp32 (bf16 matmuls are ~300x slower on CPU)")
        if cfg.data.seq_len < cfg.model.max_seq_len:
            dist.print0(f"note: data.seq_len={cfg.data.seq_len} < model.max_seq_len={cfg.model.max_seq_len}: decoding and "
                        "causal eval use contexts (and routing caps) up to max_seq_len, longer than any training "
                        "sequence; set model.max_seq_len to data.seq_len unless that is meant")
        self.preemption = _Preemption()
        self.preemption.install()  # from the start: a stop while building (resume scan, DeepSpeed) still exits 75
        self.step = 0
        self.bytes_seen = 0
        self.last_eval: dict[str, float] = {}
        self._corrupt_seen, self._corrupt_named = 0, []  # corrupt samples skipped so far, shards named
        self.run_lock = _lock_run_dir(self.out_dir, self.ckpt_dir)  # before anything reads or writes either
        try:
            self._build()
        except BaseException:
            self.run_lock.close()
            raise

    # ----------------------------------------------------------------------------- building
    def _build(self) -> None:
        import deepspeed

        from pico.model import build_model
        from pico.pipeline.data.loader import ByteBatches, resolve_shards
        from pico.pipeline.optim.build import build_optimizer

        cfg = self.cfg
        start = resume_point(self.ckpt_dir, self.rank, self.world, self.trust) if self.resume else None
        if not self.resume and ckpt.latest_checkpoint(self.ckpt_dir) is not None:
            raise UserError(f"{self.ckpt_dir} already holds checkpoints; pass --resume to continue that run, or "
                            "choose a new train.out_dir (or checkpoint.dir)")
        if self.resume and start is None and ckpt.list_checkpoints(self.ckpt_dir):
            raise UserError(f"--resume: every checkpoint under {self.ckpt_dir} is damaged (reasons above); move them "
                            "away to start from step 0")
        if self.resume and start is None:
            dist.print0(f"--resume: no complete checkpoint under {self.ckpt_dir}; starting from step 0")
        if start is not None:
            self._check_resumable(start)

        if not cfg.data.train and not cfg.data.mix:
            raise UserError("data.train is empty: pass shard directories, e.g. --data.train=[runs/shards] "
                            "(make them with `pico prep`), or weighted sources in data.mix")
        self.mix = self._mix_sources() if cfg.data.mix else None
        self.train_shards = ([u for _, src, w in self.mix if w > 0 for u in src] if self.mix
                             else resolve_shards(cfg.data.train, "train"))
        listing = hashlib.sha256("\n".join(self.train_shards).encode()).hexdigest()[:12]
        if not dist.same_on_all_ranks(int(listing, 16)):  # else the ranks' slots overlap or miss shards, silently
            raise UserError(f"the ranks found different train shards (this rank: {len(self.train_shards)}, listing "
                            f"{listing}); a glob taken while pico prep was writing, or storage the nodes see "
                            "differently: rerun once every node sees the finished shards")
        if not cfg.data.val and self.mix:
            self.val_shards = [u for shards in self.val_sources.values() for u in shards]
            if not self.val_shards:
                raise UserError("no validation split in any data.mix source (data.val is empty). Set data.val to shards "
                                "with a val split, or re-run `pico prep` with --val-fraction > 0 (e.g. 0.01)")
        else:
            try:
                self.val_shards = resolve_shards(cfg.data.val or cfg.data.train, "val")
            except UserError as e:
                where = "data.val" if cfg.data.val else "data.train (data.val is empty)"
                raise UserError(f"no validation split in {where}: {e}. Set data.val to shards with a val split, or "
                                "re-run `pico prep` with --val-fraction > 0 (e.g. 0.01)") from None

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        self.flops_per_byte = model.flops_per_byte(training=True)
        self.n_params = sum(p.numel() for p in model.parameters())
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        model.to(self.device)
        self.optimizer = build_optimizer(list(model.named_parameters()), cfg.optim)
        with contextlib.redirect_stdout(sys.stderr):
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                        config=deepspeed_config(cfg))
        if cfg.train.compile:
            self.engine.compile()
        self.loader = ByteBatches(self.train_shards, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                  extra=cfg.model.n_predict, rank=self.rank, world_size=self.world,
                                  num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                                  shuffle_buffer=cfg.data.shuffle_buffer, skip_corrupt=cfg.data.skip_corrupt,
                                  shuffle_buffer_bytes=cfg.data.shuffle_buffer_bytes, mix=self.mix)
        if start is not None:
            self._load(start)
        if dist.is_main():
            save_config(cfg, self.out_dir)
        from pico.pipeline.train.metrics import MetricsLogger

        self.logger = MetricsLogger(self.out_dir, cfg.logging, cfg.to_dict(), resume=start is not None,
                                    start_step=ckpt.step_of(start) if start is not None else 0)

    def _mix_sources(self) -> list[tuple[str, list[str], float]]:
        """(name, train shards, weight) per data.mix source; `self.val_sources` gets each one's val shards, if any."""
        from pico.pipeline.data.loader import resolve_shards

        out, self.val_sources = [], {}
        for i, src in enumerate(self.cfg.data.mix):
            try:
                shards = resolve_shards(src.paths, "train") if src.weight > 0 else []
            except UserError as e:
                raise UserError(f"data.mix[{i}] ({src.name}): {e}") from None
            out.append((src.name, shards, src.weight))
            try:
                self.val_sources[src.name] = resolve_shards(src.paths, "val")
            except UserError:
                dist.print0(f"data.mix[{i}] ({src.name}) has no val split: it gets no val/bpb/{src.name}")
        return out

    def _check_resumable(self, path: Path) -> None:
        state = ckpt.read_run_state(path)
        if state.get("world_size") != self.world:
            raise UserError(f"checkpoint {path} was written by {state.get('world_size')} ranks and this run has "
                            f"{self.world}; the loader position and the sharded optimizer state are per rank, so "
                            "resume with the same number of ranks (or convert it and start a new run)")
        saved_model = state["config"]["model"]
        now_model = self.cfg.to_dict()["model"]
        if saved_model != now_model:
            diff = sorted(k for k in now_model if saved_model.get(k) != now_model[k])
            raise UserError(f"checkpoint {path} has a different model config (keys: {', '.join(diff)}); resume "
                            "with the config saved in the run directory (config.yaml)")
        saved_optim, now_optim = state["config"].get("optim") or {}, self.cfg.to_dict()["optim"]
        fixed = [k for k in STRUCTURAL_OPTIM_KEYS if k in saved_optim and saved_optim[k] != now_optim[k]]
        if fixed:
            raise UserError(f"checkpoint {path} was trained with " + ", ".join(f"optim.{k}={saved_optim[k]!r}" for k in fixed)
                            + "; its optimizer state is shaped by them: resume with the same values")

    def _load(self, path: Path) -> None:
        path = path.resolve()  # the directory check_pickles scanned (checkpoint.checkpoint_files), not a link to it
        soap = self.cfg.optim.name == "soap"
        # torch's load_state_dict restores each param group's settings as saved; the config decides them
        fresh = [{k: v for k, v in g.items() if k in CONFIG_GROUP_KEYS} for g in self.optimizer.param_groups]
        load_path, _ = self.engine.load_checkpoint(str(path), tag=ckpt.DS_TAG, load_optimizer_states=not soap,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"DeepSpeed could not load {path / ckpt.DS_TAG}; the checkpoint is incomplete")
        rank_state = ckpt.load_rank_state(path, self.trust)
        if soap:
            self.optimizer.load_state_dict(rank_state["optimizer"])
        self.loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)
        run_state = ckpt.read_run_state(path)
        self.step = int(run_state["step"])
        self.bytes_seen = int(run_state["bytes_seen"])
        self.last_eval = run_state.get("eval") or {}
        dist.print0(f"resumed from {path} at step {self.step}")
        saved, now = run_state.get("config") or {}, self.cfg.to_dict()
        changed = [f"optim.{k}" for k in now["optim"] if (saved.get("optim") or {}).get(k, now["optim"][k]) != now["optim"][k]]
        changed += [f"train.{k}" for k in ("steps",) if (saved.get("train") or {}).get(k, now["train"][k]) != now["train"][k]]
        if changed:
            dist.print0(f"--resume: {', '.join(changed)} changed since the checkpoint; the config's values apply from "
                        f"step {self.step} (the LR schedule too)")

    # ----------------------------------------------------------------------------- saving
    def save(self) -> Path:
        if self.cfg.train.zero_stage < 3 and dist.any_rank(
                not all(torch.isfinite(p).all() for p in self.engine.module.parameters())):
            latest = ckpt.latest_checkpoint(self.ckpt_dir)
            raise TrainingDiverged(f"weights became NaN or infinite by step {self.step}; not saving them. The last "
                                   f"good checkpoint is {latest}. Lower optim.lr, then rerun with --resume")
        self._sync_buffers()
        rank_state = {"loader": self.loader.state_dict(), "rng": ckpt.rng_state()}
        if self.cfg.optim.name == "soap":
            rank_state["optimizer"] = self.optimizer.state_dict()
        run_state = {"step": self.step, "bytes_seen": self.bytes_seen, "world_size": self.world,
                     "zero_stage": self.cfg.train.zero_stage, "optimizer": self.cfg.optim.name,
                     "n_params": self.n_params, "flops_per_byte": self.flops_per_byte,
                     "eval": self.last_eval, "config": self.cfg.to_dict(), "time": time.time()}
        path = ckpt.save(self.engine, self.ckpt_dir, self.step, rank_state, run_state, self.cfg.checkpoint.keep_last)
        dist.print0(f"checkpoint: {path}")
        return path

    # ----------------------------------------------------------------------------- eval
    def _val_batches(self, max_batches: int | None, shards: list[str] | None = None):
        from pico.pipeline.data.loader import eval_sequences

        cfg = self.cfg
        batches = eval_sequences(self.val_shards if shards is None else shards, seq_len=cfg.data.seq_len, extra=cfg.model.n_predict,
                                 batch_size=cfg.data.batch_size, rank=self.rank, world_size=self.world,
                                 max_batches=max_batches)
        if cfg.train.zero_stage == 3 and self.world > 1:
            # Every rank must join every ZeRO-3 forward, even when it has no batch of its own.
            batches = _lockstep(batches, (cfg.data.batch_size, cfg.data.seq_len + cfg.model.n_predict))
        return batches

    def _sync_buffers(self) -> None:
        """Average floating-point persistent buffers (e.g. the router's running top-k cut-off) over
        ranks, as DDP keeps buffers in step, so eval and checkpoints see one value on every rank."""
        if self.world == 1:
            return
        module = self.engine.module
        persistent = set(module.state_dict().keys())
        for name, buf in module.named_buffers():
            if name in persistent and buf.is_floating_point():
                buf.copy_(dist.all_reduce_mean(buf).to(buf.device, buf.dtype))

    def _report_corrupt(self) -> int:
        """Collective: corrupt samples or shards skipped so far on all ranks (data.skip_corrupt); says so
        on stderr, with the shard names, whenever the count grows, so that skipping is never silent."""
        stats = self.loader.stats
        total = int(dist.all_reduce_sum(torch.tensor(float(stats["corrupt_skipped"]), device=self.device)))
        if total > self._corrupt_seen:
            self._corrupt_seen = total
            self._corrupt_named = stats["corrupt_shards"]
            names = ", ".join(self._corrupt_named) + (" (rank 0's)" if self.world > 1 else "")
            where = f" in {names}" if self._corrupt_named else ""
            dist.print0(f"data: skipped {total} corrupt sample(s) or shard(s) so far (data.skip_corrupt=true)"
                        f"{where}")
        return total

    @staticmethod
    def _count_sources(logits: torch.Tensor, targets: torch.Tensor, rows: list[int] | None, sums: torch.Tensor) -> None:
        """Add each row's next-byte cross-entropy (nats) and target count to its source's column of `sums`."""
        if logits is None or rows is None:
            return
        with torch.no_grad():
            t = targets[..., 0]
            ce = torch.nn.functional.cross_entropy(logits.detach().float().transpose(1, 2), t, reduction="none",
                                                   ignore_index=-100)
            valid = (t != -100).sum(1).double().cpu()
            nats = ce.sum(1).double().cpu()
        for r, src in enumerate(rows):
            sums[0, src] += nats[r]
            sums[1, src] += valid[r]

    def _source_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """Collective: per data.mix source, training bpb since the last log, bytes seen and epochs so far (all ranks)."""
        sums = dist.all_reduce_sum(sums.to(self.device)).cpu()
        stats = self.loader.stats["sources"]
        seen = dist.all_reduce_sum(torch.tensor([float(stats[n]["bytes"]) for n, _, _ in self.mix],
                                                device=self.device)).cpu()
        out = {}
        for i, (name, _, _) in enumerate(self.mix):
            if sums[1, i] > 0:
                out[f"bpb_train/{name}"] = float(sums[0, i] / sums[1, i]) / math.log(2)
            out[f"data/bytes_seen/{name}"] = float(seen[i])
            out[f"data/epoch/{name}"] = stats[name]["epoch"]
        return out

    def evaluate(self) -> dict[str, float]:
        """Validation bits per byte with causal routing (and top-k routing on a few batches)."""
        from pico.pipeline.eval.evaluate import evaluate

        self._sync_buffers()

        n = self.cfg.train.eval_batches or None
        result = evaluate(self.engine.module, self._val_batches(n), self.device, routing="causal",
                          autocast_dtype=self.autocast_dtype)
        if getattr(self.engine.module.router, "lookahead", False):  # top-k reads the future: score it too
            topk = evaluate(self.engine.module, self._val_batches(min(4, n or 4)), self.device, routing="topk",
                            autocast_dtype=self.autocast_dtype)
            result["bpb_topk_4batches"] = topk["bpb"]
        for name, shards in (self.val_sources.items() if self.mix else ()):
            one = evaluate(self.engine.module, self._val_batches(n, shards), self.device, routing="causal",
                           autocast_dtype=self.autocast_dtype)
            result[f"bpb/{name}"] = one["bpb"]
        self.last_eval = result
        self._routing_picture()
        return result

    def _routing_picture(self) -> None:
        if self.engine.module.router is None:
            return
        from pico.pipeline.data.loader import eval_sequences
        from pico.pipeline.train.pictures import write_picture

        if not hasattr(self, "_picture_sample"):
            first = next(iter(eval_sequences(self.val_shards, seq_len=self.cfg.data.seq_len, extra=0, batch_size=1,
                                             rank=0, world_size=1, max_batches=1)))
            self._picture_sample = (first[0] if isinstance(first, (tuple, list)) else first)[0][:384]
        sample = self._picture_sample.to(self.device)
        module = self.engine.module
        module.eval()
        with torch.no_grad():
            out = module(sample[None], routing="causal")
        module.train()
        if not dist.is_main() or out.routed is None:
            return
        title = f"pico routing at step {self.step} ({self.cfg.model.router} router, causal decisions)"
        png, html = write_picture(sample.tolist(), out.routed[0].tolist(), self.out_dir / "routing",
                                  f"step_{self.step:06d}", title)
        self.logger.log_media(self.step, png, html)

    # ----------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`; returns a summary. Raises TrainingDiverged on NaN/inf loss."""
        from pico.model import make_targets
        from pico.pipeline.optim.build import lr_at, set_lr

        cfg = self.cfg
        peak, peak_kind = _peak_flops(self.device)
        bytes_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum * self.world
        it = iter(self.loader)
        source_sums = None  # data.mix: next-byte nats and targets per source since the last log
        window_t, window_steps, rates = time.perf_counter(), 0, []
        bar = _progress(self.progress, cfg.train.steps, self.step)
        exit_reason = "completed"
        if self.step < cfg.train.steps and dist.any_rank(self.preemption.requested):  # stopped while building
            exit_reason = "preempted"
            dist.print0(f"received {self.preemption.signal_name or 'a stop signal'} before the first step: nothing "
                        "new to save; rerun with --resume")
        dist.print0(f"training {self.n_params / 1e6:.2f}M parameters, {self.flops_per_byte / 1e6:.2f} MFLOP/byte, "
                    f"{self.world} rank(s) on {self.device.type}, ZeRO-{cfg.train.zero_stage}, {cfg.optim.name}")
        while self.step < cfg.train.steps and exit_reason != "preempted":
            lr = lr_at(self.step, cfg.optim, cfg.train.steps)
            set_lr(self.optimizer, lr)  # times each param group's stage scale (optim.lr_scale_*)
            losses, heads, stats, grad_norm, bad = [], [], {}, None, False
            if self.mix and source_sums is None:
                source_sums = torch.zeros(2, len(self.mix), dtype=torch.float64)  # (nats, targets) per source
            for micro in range(cfg.train.grad_accum):
                batch = next(it).to(self.device, non_blocking=True)
                idx, targets = make_targets(batch, cfg.model.n_predict)
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    out = self.engine(idx, targets)
                if not torch.isfinite(out.loss.detach()):
                    bad = True
                self.engine.backward(out.loss)
                if self.engine.is_gradient_accumulation_boundary() and cfg.train.zero_stage == 0:
                    grad_norm = _grad_norm(self.engine.module)
                self.engine.step()
                losses.append(float(out.loss.detach()))
                heads.append(out.head_losses.detach().float().cpu())
                if self.mix:
                    self._count_sources(out.logits, targets, self.loader.row_sources, source_sums)
                for k, v in (out.stats or {}).items():
                    stats[k] = stats.get(k, 0.0) + float(v) / cfg.train.grad_accum
            self.step += 1
            self.bytes_seen += bytes_per_step
            window_steps += 1
            bad_any = dist.any_rank(bad)
            if bad_any:
                latest = ckpt.latest_checkpoint(self.ckpt_dir)
                kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been written yet"
                raise TrainingDiverged(
                    f"loss is NaN or infinite at step {self.step} (batch {self.loader.state_dict().get('batches')} "
                    f"of this rank's loader); {kept}. Lower optim.lr or raise optim.warmup_steps, then rerun "
                    "with --resume")
            if grad_norm is None:
                grad_norm = self.engine.get_global_grad_norm()
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                elapsed = time.perf_counter() - window_t
                bps = window_steps * bytes_per_step / elapsed
                rates.append(bps)
                head = dist.all_reduce_mean(torch.stack(heads).mean(0))
                loss = float(dist.all_reduce_mean(torch.tensor(sum(losses) / len(losses))))
                metrics = {"loss": loss, "bpb_train": float(head[0]) / math.log(2), "lr": lr,
                           "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                           "bytes_per_s": bps, "bytes_seen": self.bytes_seen, "memory_mb": _memory_mb(self.device),
                           "flops_per_s": bps * self.flops_per_byte,
                           # peak is one rank's (its GPU, or its threads' measured matmul): the job's is world x that
                           "mfu": bps * self.flops_per_byte / (peak * self.world)}
                metrics.update({f"loss_head{h + 1}": float(v) for h, v in enumerate(head)})
                metrics["data/corrupt_skipped"] = self._report_corrupt()
                if self.mix:
                    metrics.update(self._source_metrics(source_sums))
                    source_sums = None
                metrics.update({f"router/{k}": v for k, v in stats.items()})
                self.logger.log(self.step, metrics)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{metrics['bpb_train']:.3f}", kBps=f"{bps / 1e3:.1f}")
                else:  # batch logs (Slurm, --no-progress): one plain line per log interval
                    dist.print0(f"step {self.step}/{cfg.train.steps} loss {loss:.4f} bpb {metrics['bpb_train']:.4f} "
                                f"lr {lr:.2e} {bps:,.0f} B/s")
                window_t, window_steps = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            last = self.step == cfg.train.steps
            preempted = dist.any_rank(self.preemption.requested) and not last  # the last step: just finish
            if (self.step % cfg.train.eval_every == 0 and not preempted) or last:  # the warning's time is the save's
                t0 = time.perf_counter()
                result = self.evaluate()
                self.logger.log(self.step, {f"val/{k}": v for k, v in result.items()})
                dist.print0(f"step {self.step}: val bpb {result['bpb']:.4f}")
                window_t += time.perf_counter() - t0  # eval time does not count against throughput
            if self.step % cfg.checkpoint.every == 0 or last or preempted:
                t0 = time.perf_counter()
                self.save()
                window_t += time.perf_counter() - t0
                # a stop that arrived during the save: this checkpoint is the current step, stop on it
                preempted = preempted or (not last and dist.any_rank(self.preemption.requested))
            if preempted:
                exit_reason = "preempted"
                dist.print0(f"received {self.preemption.signal_name or 'a stop signal'}: checkpoint saved at step "
                            f"{self.step}; rerun with --resume")
                break
        if bar is not None:
            bar.close()
        summary = {"status": exit_reason, "step": self.step, "bytes_seen": self.bytes_seen,
                   "corrupt_skipped": self._report_corrupt(), "corrupt_shards": self._corrupt_named,
                   "n_params": self.n_params, "flops_per_byte": self.flops_per_byte,
                   "bytes_per_s_median": statistics.median(rates) if rates else None,
                   "peak_flops": peak, "peak_kind": peak_kind,
                   "eval": self.last_eval, "out_dir": str(self.out_dir),
                   **({"data_sources": self.loader.stats["sources"]} if self.mix else {}),
                   "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_dir) or ""),
                   "wandb_dir": self.logger.wandb_dir, "routing_picture": str(self.out_dir / "routing" / "latest.png")}
        if summary["bytes_per_s_median"]:
            summary["mfu_median"] = summary["bytes_per_s_median"] * self.flops_per_byte / (peak * self.world)
        self.logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        self.logger.close()
        return summary


def _grad_norm(module: torch.nn.Module) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum().cpu()
    return float(total.sqrt())


def _lockstep(batches, shape):
    """Yield this rank's batches, then all-PAD batches until every rank is done (ZeRO-3 forwards are collective)."""
    from pico.model.config import PAD

    it = iter(batches)
    while True:
        item = next(it, None)
        if not dist.any_rank(item is not None):
            return
        yield item if item is not None else torch.full(shape, PAD, dtype=torch.long)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def train(cfg: Config, resume: bool = False, progress: bool = True, trust: bool = False) -> dict[str, Any]:
    """Build a Trainer and run it; the Python entry point of `pico train`."""
    trainer = Trainer(cfg, resume=resume, progress=progress, trust=trust)
    with trainer.run_lock:
        return trainer.fit()


def _lock_run_dir(out_dir: Path, ckpt_dir: Path) -> contextlib.ExitStack:
    """Global rank 0 holds train.out_dir's lock for the job (configs/lock.py: one job's ranks are one
    writer), and checkpoint.dir's where it lies outside it (a save clears `.tmp-step_*` debris there,
    which another run's in-flight save would be); every rank stops when it cannot, rather than wait in a
    collective for a rank that left."""
    stack, refused = contextlib.ExitStack(), None
    if dist.is_main():
        try:
            stack.enter_context(hold(out_dir, "pico train"))
            if not ckpt_dir.resolve().is_relative_to(out_dir.resolve()):
                stack.enter_context(hold(ckpt_dir, "pico train"))
        except UserError as e:
            stack.close()
            refused = e
    if dist.any_rank(refused is not None):
        raise refused or UserError(f"{out_dir} is in use by another pico train (rank 0 names it)")
    return stack


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="quickstart",
                   help="YAML config file, or the name of a packaged one (quickstart, pico-125m, pico-1b, ...)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in the run's checkpoint directory "
                        "(starts fresh when there is none, so the same command serves first start and requeue)")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout at the end (rank 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its meaning and exit")


def run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(describe_config())
        return 0
    cfg = load_config(args.config, args.overrides)
    from pico.pipeline.release.load import check_model_config

    check_model_config(cfg.model)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress, trust=args.trust_checkpoint)
    dist.shutdown()
    if args.json and dist.is_main():
        print(strict_json(summary))
    return EXIT_PREEMPTED if summary["status"] == "preempted" else 0
