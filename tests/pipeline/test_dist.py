"""pico.pipeline.dist's agreement helpers on two real gloo ranks."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
                dist.any_rank(rank == 1), dist.rank_max(2 if rank == 1 else 1)]
        torch.save(seen, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_on_a_value_only_when_every_rank_holds_it(tmp_path):
    """What --resume uses to refuse ranks that found different checkpoints (a stale shared listing)."""
    out = str(tmp_path / "seen")
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(f"{out}.{rank}") == [True, False, True, False, True, 2]


def _resume_worker(rank: int, port: int, root: str) -> None:
    from pico.configs.errors import UserError
    from pico.pipeline.train.trainer import resume_point

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mine = Path(root) / f"rank{rank}"
        try:
            seen = resume_point(mine, rank, 2, trust=False)
        except UserError as e:
            seen = str(e)
        # one more collective: a rank left behind in the search would pair it with the wrong call
        (mine / "seen").write_text(f"{seen}|{dist.rank_max(rank)}")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_that_see_different_checkpoints_all_refuse_to_resume_and_none_hangs(tmp_path):
    """A stale listing on one node: rank 0 sees a (damaged) step_000002, rank 1 none. Both refuse with the
    same one-line reason, after the same collective calls (a search that paired them unevenly would hang)."""
    (tmp_path / "rank0" / "step_000002").mkdir(parents=True)
    (tmp_path / "rank0" / "step_000002" / "pico_state.json").write_text("{}")
    (tmp_path / "rank1").mkdir()
    ctx = mp.spawn(_resume_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "the ranks hung in the resume search"
    for rank in range(2):
        seen, last = (tmp_path / f"rank{rank}" / "seen").read_text().split("|")
        assert "the ranks found different checkpoints" in seen and last == "1"
    assert "step_000002" in (tmp_path / "rank0" / "seen").read_text()
