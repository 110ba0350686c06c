"""The gloo test harness of ``dist_utils``: results in rank order, a rank's exception
reported with its traceback, no process left behind."""

import multiprocessing

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed


def _sum_ranks(rank, world_size, base):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return base + rank, t


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 gives up")
    dist.barrier()  # rank 0 waits here for a rank that never comes: the harness kills it


def test_results_come_back_in_rank_order():
    results = run_distributed(_sum_ranks, 3, 10)
    assert [r for r, _ in results] == [10, 11, 12]
    for _, t in results:  # the collective ran over the group, and tensors come back
        torch.testing.assert_close(t, torch.tensor([3.0]))


def test_exception_in_a_rank_fails_with_its_traceback():
    with pytest.raises(pytest.fail.Exception, match=r"(?s)raised in rank 1 of 2.*ValueError: rank 1 gives up"):
        run_distributed(_fail_on_rank_1, 2)
    assert multiprocessing.active_children() == []
