"""Paired tensor-parallel collectives: forward values and gradients against the math, on 2 gloo ranks."""
import torch
import torch.distributed as dist

from megalite.tensor_parallel import mappings as M

WORLD = 2


def _t(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _run(fn, x, upstream):
    """out = fn(x); backward of sum(out * upstream); returns (out, x.grad)."""
    x = x.clone().requires_grad_(True)
    out = fn(x, dist.group.WORLD)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


def _check_all():
    r = dist.get_rank()
    full = _t(0, 4, 3, 6)  # the same tensor on every rank
    mine = _t(10 + r, 4, 3, 6)  # a different tensor per rank
    others = [_t(10 + i, 4, 3, 6) for i in range(WORLD)]
    upstream = [_t(20 + i, 4, 3, 6) for i in range(WORLD)]
    total, up_total = sum(others), sum(upstream)
    results = {}

    out, g = _run(M.copy_to_tp_region, full, upstream[r])
    results["copy"] = torch.equal(out, full) and torch.allclose(g, up_total)

    out, g = _run(M.reduce_from_tp_region, mine, upstream[0])  # upstream of a replicated output is replicated
    results["reduce"] = torch.allclose(out, total) and torch.equal(g, upstream[0])

    up_half = [u[..., :3] for u in upstream]
    out, g = _run(M.scatter_to_tp_region, full, up_half[r])
    results["scatter_last"] = torch.equal(out, full.chunk(WORLD, -1)[r]) and torch.equal(g, torch.cat(up_half, -1))

    out, g = _run(M.gather_from_tp_region, mine[..., :3], upstream[0])
    results["gather_last"] = (torch.equal(out, torch.cat([o[..., :3] for o in others], -1))
                              and torch.equal(g, upstream[0].chunk(WORLD, -1)[r]))

    up_seq = [u[:2] for u in upstream]
    out, g = _run(M.scatter_to_sequence_parallel_region, full, up_seq[r])
    results["scatter_seq"] = torch.equal(out, full.chunk(WORLD, 0)[r]) and torch.equal(g, torch.cat(up_seq, 0))

    out, g = _run(M.gather_from_sequence_parallel_region, mine[:2], upstream[r])
    results["gather_seq"] = (torch.equal(out, torch.cat([o[:2] for o in others], 0))
                             and torch.allclose(g, up_total.chunk(WORLD, 0)[r]))

    out, g = _run(M.reduce_scatter_to_sequence_parallel_region, mine, up_seq[r])
    results["reduce_scatter_seq"] = (torch.allclose(out, total.chunk(WORLD, 0)[r])
                                     and torch.equal(g, torch.cat(up_seq, 0)))
    return results


def test_every_mapping_matches_the_math_on_two_ranks(spawn):
    for rank, results in enumerate(spawn(_check_all, WORLD)):
        failed = [name for name, ok in results.items() if not ok]
        assert not failed, f"rank {rank}: {failed}"


def _sizes():
    return M.group_size(dist.group.WORLD), M.group_rank(dist.group.WORLD), M.group_size(None)


def test_group_size_and_rank(spawn):
    assert spawn(_sizes, WORLD) == [(2, 0, 1), (2, 1, 1)]


def _bad_split():
    try:
        M.scatter_to_sequence_parallel_region(torch.zeros(3, 2), dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return None


def test_uneven_split_names_the_sizes(spawn):
    for msg in spawn(_bad_split, WORLD):
        assert msg is not None and "size 3" in msg and "multiple of 2" in msg


def test_group_of_none_is_a_no_op_forward_and_backward():
    fns = [M.copy_to_tp_region, M.reduce_from_tp_region, M.scatter_to_tp_region, M.gather_from_tp_region,
           M.scatter_to_sequence_parallel_region, M.gather_from_sequence_parallel_region,
           M.reduce_scatter_to_sequence_parallel_region]
    for fn in fns:
        x = torch.randn(4, 2, 3, requires_grad=True)
        up = torch.randn(4, 2, 3)
        out = fn(x, None)
        (out * up).sum().backward()
        assert torch.equal(out, x) and torch.equal(x.grad, up), fn.__name__
