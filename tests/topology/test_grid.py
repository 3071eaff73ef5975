"""Rank grid math, checked exhaustively without processes."""
import pytest

from megalite.topology import ORDERS, Coords, Topology

KINDS = ("tp", "pp", "dp", "mp", "embedding")


def factorizations(n):
    return [(tp, pp, n // (tp * pp)) for tp in range(1, n + 1) if n % tp == 0
            for pp in range(1, n // tp + 1) if (n // tp) % pp == 0]


def _check_layout(t: Topology):
    world = range(t.world_size)
    coords = [t.coords(r) for r in world]
    assert len(set(coords)) == t.world_size  # bijection
    for r, c in enumerate(coords):
        assert t.rank(tp=c.tp, pp=c.pp, dp=c.dp) == r
        assert 0 <= c.tp < t.tp and 0 <= c.pp < t.pp and 0 <= c.dp < t.dp
        fastest = t.order.split("-")[0]
        assert getattr(c, fastest) == r % getattr(t, fastest)
    groups = {k: t.groups(k) for k in KINDS}
    for kind, gs in groups.items():
        assert sorted(r for g in gs for r in g) == list(world), kind  # a partition
        assert all(list(g) == sorted(g) for g in gs)
    sizes = {"tp": t.tp, "pp": t.pp, "dp": t.dp, "mp": t.tp * t.pp}
    for kind, size in sizes.items():
        assert {len(g) for g in groups[kind]} == {size}, kind
    for r, c in enumerate(coords):
        mine = {k: t.group_of(r, k) for k in KINDS}
        for kind, fixed in (("tp", "pp dp"), ("pp", "tp dp"), ("dp", "tp pp"), ("mp", "dp")):
            for other in mine[kind]:  # members differ only in the group's own coordinates
                assert all(getattr(t.coords(other), f) == getattr(c, f) for f in fixed.split())
        for a, b in (("tp", "pp"), ("tp", "dp"), ("pp", "dp"), ("mp", "dp"), ("embedding", "dp")):
            assert set(mine[a]) & set(mine[b]) == {r}, (a, b)
        assert set(mine["tp"]) | set(mine["pp"]) <= set(mine["mp"])
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
        for order in ORDERS:
            t = Topology(tp=tp, pp=pp, dp=dp, order=order)
            assert t.world_size == world
            _check_layout(t)


def test_six_orders():
    assert sorted(ORDERS) == sorted(["tp-dp-pp", "tp-pp-dp", "dp-tp-pp", "dp-pp-tp", "pp-tp-dp", "pp-dp-tp"])


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
    (dict(world_size=6, tp=4), "not divisible by tp\\*pp"),
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
    (dict(order="tp-tp-pp"), "order='tp-tp-pp' must list tp, dp and pp"),
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
    with pytest.raises(ValueError, match="group kind 'cp' is unknown"):
        t.groups("cp")


def test_topology_is_a_frozen_value():
    t = Topology(tp=2)
    with pytest.raises(AttributeError):
        t.tp = 4
    assert t == Topology(tp=2) and hash(t) == hash(Topology(tp=2))
