"""Rank grid math, checked exhaustively without processes."""
import pytest

from megalite.topology import ORDERS, Coords, Topology

KINDS = ("tp", "cp", "pp", "dp", "dp_cp", "mp", "embedding", "ep", "edp")


def factorizations(n):
    return [(tp, pp, n // (tp * pp)) for tp in range(1, n + 1) if n % tp == 0
            for pp in range(1, n // tp + 1) if (n // tp) % pp == 0]


def factorizations4(n):
    """Every (tp, cp, pp, dp) with product n."""
    return [(tp, cp, pp, dp) for tp in range(1, n + 1) if n % tp == 0 for cp, pp, dp in factorizations(n // tp)]


def _check_layout(t: Topology):
    world = range(t.world_size)
    coords = [t.coords(r) for r in world]
    assert len(set(coords)) == t.world_size  # bijection
    for r, c in enumerate(coords):
        assert t.rank(tp=c.tp, pp=c.pp, dp=c.dp, cp=c.cp) == r
        assert 0 <= c.tp < t.tp and 0 <= c.pp < t.pp and 0 <= c.dp < t.dp and 0 <= c.cp < t.cp
        fastest = t.order.split("-")[0]
        assert getattr(c, fastest) == r % getattr(t, fastest)
    groups = {k: t.groups(k) for k in KINDS}
    for kind, gs in groups.items():
        assert sorted(r for g in gs for r in g) == list(world), kind  # a partition
        assert all(list(g) == sorted(g) for g in gs)
    sizes = {"tp": t.tp, "cp": t.cp, "pp": t.pp, "dp": t.dp, "dp_cp": t.dp * t.cp, "mp": t.tp * t.pp}
    for kind, size in sizes.items():
        assert {len(g) for g in groups[kind]} == {size}, kind
    for r, c in enumerate(coords):
        mine = {k: t.group_of(r, k) for k in KINDS}
        for kind, fixed in (("tp", "cp pp dp"), ("cp", "tp pp dp"), ("pp", "tp cp dp"), ("dp", "tp cp pp"),
                            ("dp_cp", "tp pp"), ("mp", "cp dp")):
            for other in mine[kind]:  # members differ only in the group's own coordinates
                assert all(getattr(t.coords(other), f) == getattr(c, f) for f in fixed.split())
        for a, b in (("tp", "pp"), ("tp", "dp"), ("pp", "dp"), ("mp", "dp"), ("embedding", "dp"), ("cp", "tp"),
                     ("cp", "pp"), ("cp", "dp"), ("mp", "dp_cp"), ("embedding", "dp_cp")):
            assert set(mine[a]) & set(mine[b]) == {r}, (a, b)
        assert set(mine["tp"]) | set(mine["pp"]) <= set(mine["mp"])
        assert set(mine["cp"]) | set(mine["dp"]) <= set(mine["dp_cp"])
        assert [t.coords(x).cp for x in mine["cp"]] == list(range(t.cp))
        assert [t.coords(x).tp for x in mine["tp"]] == list(range(t.tp))
        assert [t.coords(x).pp for x in mine["pp"]] == list(range(t.pp))
        emb = mine["embedding"]
        if c.pp in (0, t.pp - 1):
            assert emb == ((r,) if t.pp == 1 else (mine["pp"][0], mine["pp"][-1]))
        else:
            assert emb == (r,)


@pytest.mark.parametrize("world", range(1, 17))
def test_every_factorization_and_order_is_a_consistent_grid(world):
    for tp, pp, dp in factorizations(world):
        for order in ORDERS[:6]:  # the three-dimension orders (cp = 1); the four-dim test covers the rest
            t = Topology(tp=tp, pp=pp, dp=dp, order=order)
            assert t.world_size == world
            _check_layout(t)


@pytest.mark.parametrize("world", [1, 2, 4, 6, 8, 12, 16])
def test_every_four_way_factorization_and_order_is_a_consistent_grid(world):
    for tp, cp, pp, dp in factorizations4(world):
        for order in ORDERS:
            t = Topology(tp=tp, pp=pp, dp=dp, cp=cp, order=order)
            assert t.world_size == world
            _check_layout(t)


def test_orders_are_the_six_of_three_dims_and_the_24_of_four():
    three = ["tp-dp-pp", "tp-pp-dp", "dp-tp-pp", "dp-pp-tp", "pp-tp-dp", "pp-dp-tp"]
    assert ORDERS[:6] == tuple(three) and len(ORDERS) == 30 and len(set(ORDERS)) == 30
    assert all(sorted(o.split("-")) == ["cp", "dp", "pp", "tp"] for o in ORDERS[6:])


def test_a_three_dim_order_puts_cp_right_after_tp_so_cp1_layouts_keep_their_ranks():
    for order in ("tp-dp-pp", "dp-pp-tp", "pp-tp-dp"):
        four = order.replace("tp", "tp-cp")
        for tp, cp, pp, dp in factorizations4(8):
            a, b = Topology(tp=tp, pp=pp, dp=dp, cp=cp, order=order), Topology(tp=tp, pp=pp, dp=dp, cp=cp, order=four)
            assert [a.coords(r) for r in range(8)] == [b.coords(r) for r in range(8)]
            if cp == 1:  # the old 3-D grid, rank for rank
                old = Topology(tp=tp, pp=pp, dp=dp, order=order)
                assert [a.coords(r)[:3] for r in range(8)] == [old.coords(r)[:3] for r in range(8)]


def test_megatron_layout_with_cp_world16_tp2_cp2_pp2_dp2():
    t = Topology(tp=2, cp=2, pp=2, dp=2, order="tp-cp-dp-pp")
    for r in range(16):
        c = t.coords(r)
        assert r == c.tp + 2 * (c.cp + 2 * (c.dp + 2 * c.pp))  # Megatron's tp-cp-dp-pp
    assert t.groups("cp")[:2] == [(0, 2), (1, 3)]
    assert t.groups("dp_cp")[:2] == [(0, 2, 4, 6), (1, 3, 5, 7)]  # gradients: dp x cp
    assert t.groups("mp")[:2] == [(0, 1, 8, 9), (2, 3, 10, 11)]  # each cp rank holds its own replica's part
    with pytest.raises(ValueError, match="must list tp, cp, dp and pp once each"):
        Topology(tp=2, order="tp-cp-cp-pp")
    with pytest.raises(ValueError, match=r"not divisible by tp\*cp\*pp=2\*3\*1=6"):
        Topology.from_world(8, tp=2, cp=3)


def test_megatron_default_layout_world8_tp2_pp2_dp2():
    t = Topology(tp=2, pp=2, dp=2)
    assert t.groups("tp") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert t.groups("dp") == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert t.groups("pp") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert t.groups("mp") == [(0, 1, 4, 5), (2, 3, 6, 7)]
    assert t.groups("embedding") == t.groups("pp")
    assert t.coords(5) == Coords(tp=1, pp=1, dp=0)
    assert t.rank(tp=1, pp=1, dp=1) == 7


def test_rank_formula_for_default_order():
    t = Topology(tp=2, pp=3, dp=4)
    for r in range(t.world_size):
        c = t.coords(r)
        assert r == c.tp + t.tp * (c.dp + t.dp * c.pp)


def test_embedding_groups_with_middle_stages():
    t = Topology(tp=1, pp=4, dp=2)
    assert t.groups("embedding") == [(0, 6), (1, 7), (2,), (3,), (4,), (5,)]
    assert t.group_of(2, "embedding") == (2,)
    assert Topology(tp=2, pp=1, dp=2).groups("embedding") == [(0,), (1,), (2,), (3,)]


def test_from_world_infers_dp():
    t = Topology.from_world(16, tp=2, pp=4, virtual_stages=2)
    assert (t.tp, t.pp, t.dp, t.virtual_stages) == (2, 4, 2, 2)
    assert Topology.from_world(8, tp=2, pp=2, dp=2).dp == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=6, tp=4), "not divisible by tp\\*cp\\*pp"),
    (dict(world_size=8, tp=2, dp=3), "dp=3 does not match .* = 4"),
    (dict(world_size=0), "world_size=0"),
    (dict(world_size=4, tp=0), "tp=0"),
])
def test_from_world_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Topology.from_world(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tp=0), "tp=0 must be a positive integer"),
    (dict(dp=2.0), "dp=2.0"),
    (dict(pp=True), "pp=True"),
    (dict(order="tp-tp-pp"), "order='tp-tp-pp' must list tp, cp, dp and pp"),
    (dict(order="tp-dp"), "order='tp-dp'"),
    (dict(virtual_stages=2), "virtual_stages=2 needs pp > 1"),
    (dict(virtual_stages=0, pp=2), "virtual_stages=0"),
])
def test_invalid_topologies(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Topology(**kwargs)


def test_bad_queries():
    t = Topology(tp=2, dp=2)
    with pytest.raises(ValueError, match="rank=4 is outside 0..3"):
        t.coords(4)
    with pytest.raises(ValueError, match="tp=2 is outside 0..1"):
        t.rank(tp=2)
    with pytest.raises(ValueError, match="group kind 'xp' is unknown"):
        t.groups("xp")


def test_topology_is_a_frozen_value():
    t = Topology(tp=2)
    with pytest.raises(AttributeError):
        t.tp = 4
    assert t == Topology(tp=2) and hash(t) == hash(Topology(tp=2))


@pytest.mark.parametrize("world", [4, 8, 12])
def test_expert_groups_cut_every_dp_cp_group_into_blocks_and_strides(world):
    for tp, cp, pp, dp in factorizations4(world):
        for ep in [e for e in range(1, dp * cp + 1) if (dp * cp) % e == 0]:
            for order in ("tp-cp-dp-pp", "dp-pp-cp-tp"):
                t = Topology(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, order=order)
                for g in t.groups("dp_cp"):
                    blocks = [b for b in t.groups("ep") if set(b) <= set(g)]
                    assert sorted(blocks) == [g[i:i + ep] for i in range(0, len(g), ep)]  # consecutive ranks
                    strides = [e for e in t.groups("edp") if set(e) <= set(g)]
                    assert sorted(strides) == sorted(g[j::ep] for j in range(ep))
                for r in range(world):
                    ep_g, edp_g = t.group_of(r, "ep"), t.group_of(r, "edp")
                    assert set(ep_g) & set(edp_g) == {r} and len(ep_g) * len(edp_g) == dp * cp
    with pytest.raises(ValueError, match=r"ep=3 must divide dp \* cp = 2\*2"):
        Topology(dp=2, cp=2, ep=3)
