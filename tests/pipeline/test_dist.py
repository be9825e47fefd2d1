"""pico.pipeline.dist's agreement helpers on two real gloo ranks."""

from __future__ import annotations

import os

import torch
import torch.distributed
import torch.multiprocessing as mp

from pico.pipeline import dist
from tests.conftest import free_port


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        seen = [dist.same_on_all_ranks(6), dist.same_on_all_ranks(6 if rank == 0 else 4),
                dist.same_on_all_ranks(-1), dist.same_on_all_ranks(-1 if rank == 0 else 2),
                dist.any_rank(rank == 1)]
        torch.save(seen, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_on_a_value_only_when_every_rank_holds_it(tmp_path):
    """What --resume uses to refuse ranks that found different checkpoints (a stale shared listing)."""
    out = str(tmp_path / "seen")
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(f"{out}.{rank}") == [True, False, True, False, True]
