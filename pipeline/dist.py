"""Distributed boilerplate in one place: rank from the environment, one init, print on rank 0.

The same entry point runs as one process or under torchrun/deepspeed/srun: the launcher sets
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a bare process gets a world of one
on a free loopback port (DeepSpeed insists on a process group even then).
"""

from __future__ import annotations

import os
import socket
import sys

import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only, to stderr (stdout is reserved for --json output)."""
    if is_main():
        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, what: str = "train.device") -> torch.device:
    """'auto' -> this rank's CUDA device when there is one, else CPU; 'cuda' -> this rank's, 'cuda:N' -> that
    one, 'cpu'. Anything else, or CUDA where none is visible, is a UserError naming `what`."""
    from pico.configs.errors import UserError

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"{what}={requested!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"{what}={requested!r}: pico runs on cpu or cuda")
    if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"{what}={requested}: no such CUDA device is visible ({torch.cuda.device_count()} are); "
                        "use cpu or auto")
    if device.index is None:
        device = torch.device("cuda", local_rank())
    torch.cuda.set_device(device)
    return device


def init(device: torch.device) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); idempotent."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    if device.type == "cpu":
        # Must be set before deepspeed is imported, or it probes for (and may pick) a GPU.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)


def shutdown() -> None:
    """Tear the process group down before the interpreter exits: left to exit-time destruction, gloo's
    threads sometimes abort a rank ("terminate called without an active exception", exit -6) after a
    run that finished cleanly. Call on the success path only: the barrier waits for every rank."""
    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a float tensor over ranks (a copy; the input is untouched)."""
    out = values.detach().clone().float()
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.all_reduce(out)
        out /= world_size()
    return out


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    out = values.detach().clone()
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (used to agree on stopping together)."""
    return rank_max(int(flag)) > 0


def rank_max(value: int) -> int:
    """The largest of the ranks' integers (e.g. the worst verdict on a checkpoint); exact below 2**53."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    if torch.distributed.is_initialized() and world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def same_on_all_ranks(value: int) -> bool:
    """Whether every rank holds the same integer (e.g. the checkpoint step each resumes from)."""
    t = torch.tensor([float(value), -float(value)], dtype=torch.float64)
    if torch.distributed.is_initialized() and world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t[0].item() == -t[1].item())
