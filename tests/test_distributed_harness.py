"""The gloo test harness itself: collectives work and failures surface with the rank's traceback."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from engram_pretrain.testing.distributed import run_distributed


def _sum_ranks(rank: int, world_size: int, scale: float) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return float(t.item()) * scale


def _fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_all_reduce_on_two_ranks() -> None:
    assert run_distributed(_sum_ranks, 2, args=(2.0,)) == [2.0, 2.0]


def test_rank_failure_is_reraised() -> None:
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)
