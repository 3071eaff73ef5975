"""The spawn helper itself: ranks, collectives, results, errors, reuse."""
import os

import pytest
import torch
import torch.distributed as dist


def _rank_and_sum(offset):
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item(), os.getpid()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    return "fine"


def test_ranks_see_one_group_and_return_results(spawn):
    out = spawn(_rank_and_sum, 2, 10)
    assert [o[:3] for o in out] == [(0, 2, 21.0), (1, 2, 21.0)]


def test_workers_are_reused_between_calls(spawn):
    first = [o[3] for o in spawn(_rank_and_sum, 2, 0)]
    second = [o[3] for o in spawn(_rank_and_sum, 2, 0)]
    assert first == second


def test_a_failing_rank_raises_with_its_traceback(spawn):
    with pytest.raises(RuntimeError, match="boom on purpose"):
        spawn(_fail_on_rank_one, 2)
    assert [o[:2] for o in spawn(_rank_and_sum, 2, 0)] == [(0, 2), (1, 2)]
