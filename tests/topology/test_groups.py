"""ProcessGroups on real gloo ranks: each group sums exactly the ranks the grid says."""
import pytest
import torch
import torch.distributed as dist

from megalite.topology import ProcessGroups, Topology

LAYOUTS = [dict(tp=2, dp=2), dict(pp=2, dp=2), dict(tp=2, pp=2), dict(tp=2, pp=2, order="pp-dp-tp")]


def _members_by_allreduce(layouts):
    """For every layout: each group's all_reduce of 2**rank, decoded to the set of ranks summed."""
    rank, out = dist.get_rank(), []
    for kwargs in layouts:
        groups = ProcessGroups.build(Topology(**kwargs))
        seen = {}
        for kind in ("tp", "pp", "dp", "mp", "embedding"):
            group = getattr(groups, f"{kind}_group")
            t = torch.tensor([2 ** rank], dtype=torch.int64)
            dist.all_reduce(t, group=group)
            seen[kind] = tuple(r for r in range(dist.get_world_size()) if t.item() >> r & 1)
            seen[kind + "_rank"] = dist.get_rank(group)
        seen["attrs"] = (groups.tp_rank, groups.pp_rank, groups.dp_rank, groups.mp_rank,
                         groups.is_first_stage, groups.is_last_stage, groups.prev_rank, groups.next_rank)
        seen["mpu"] = (groups.get_data_parallel_world_size(), groups.get_data_parallel_rank(),
                       groups.get_model_parallel_world_size(), groups.get_model_parallel_rank(),
                       groups.get_tensor_model_parallel_world_size(), groups.get_tensor_model_parallel_rank(),
                       groups.get_pipeline_model_parallel_world_size(), groups.get_pipeline_model_parallel_rank(),
                       groups.get_data_parallel_group() is groups.dp_group,
                       groups.get_model_parallel_group() is groups.mp_group,
                       groups.get_tensor_model_parallel_group() is groups.tp_group,
                       groups.get_pipeline_model_parallel_group() is groups.pp_group)
        out.append(seen)
    return out


def test_each_group_reduces_exactly_its_ranks(spawn):
    results = spawn(_members_by_allreduce, 4, LAYOUTS)
    for i, kwargs in enumerate(LAYOUTS):
        topo = Topology(**kwargs)
        for rank in range(4):
            seen, c = results[rank][i], topo.coords(rank)
            for kind in ("tp", "pp", "dp", "mp", "embedding"):
                group = topo.group_of(rank, kind)
                assert seen[kind] == group, (kwargs, rank, kind)
                assert seen[kind + "_rank"] == group.index(rank)
            prev = topo.rank(tp=c.tp, pp=(c.pp - 1) % topo.pp, dp=c.dp)
            nxt = topo.rank(tp=c.tp, pp=(c.pp + 1) % topo.pp, dp=c.dp)
            mp_rank = topo.group_of(rank, "mp").index(rank)
            assert seen["attrs"] == (c.tp, c.pp, c.dp, mp_rank, c.pp == 0, c.pp == topo.pp - 1, prev, nxt)
            assert seen["mpu"] == (topo.dp, c.dp, topo.tp * topo.pp, mp_rank, topo.tp, c.tp, topo.pp, c.pp,
                                   True, True, True, True)


def _build_wrong_world():
    ProcessGroups.build(Topology(tp=2, dp=2))


def test_build_rejects_a_topology_of_another_size(spawn):
    with pytest.raises(RuntimeError, match="world size 2 != topology world size 4"):
        spawn(_build_wrong_world, 2)


def test_build_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_distributed"):
        ProcessGroups.build(Topology())


def test_single_process_groups():
    g = ProcessGroups.single()
    assert g.tp_group is g.pp_group is g.dp_group is g.mp_group is g.embedding_group is None
    assert (g.tp_size, g.pp_size, g.dp_size, g.mp_size) == (1, 1, 1, 1)
    assert (g.rank, g.tp_rank, g.pp_rank, g.dp_rank, g.mp_rank) == (0, 0, 0, 0, 0)
    assert g.is_first_stage and g.is_last_stage and g.prev_rank == g.next_rank == 0
    assert g.get_data_parallel_world_size() == g.get_model_parallel_world_size() == 1
    assert g.get_data_parallel_group() is None and g.members("embedding") == (0,)
    with pytest.raises(ValueError, match="group kind 'xx'"):
        g.members("xx")
