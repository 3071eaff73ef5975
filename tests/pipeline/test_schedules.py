"""Every schedule, checked without processes, for many (pp, micro-batches, virtual stages).

The proof of ordering is causal, not an accident of one interleaving: all
ranks' lists are run by `simulate` (non-blocking sends, blocking in-order
receives), vector clocks are carried along every message, and "F of stage k
before F of stage k+1" is checked as happens-before.
"""
from collections import Counter, deque

import pytest

from megalite.pipeline.schedules import Action, all_schedules, build_schedule, max_in_flight, simulate


def cases():
    for p in range(1, 6):
        for m in range(1, 10):
            yield "afab", p, m, 1
            yield "1f1b", p, m, 1
            for v in (2, 3):
                yield "afab", p, m, v
                if p > 1 and m % p == 0:
                    yield "interleaved", p, m, v


CASES = list(cases())


def vector_clocks(scheds, v):
    """(rank, action) -> vector clock at completion, replaying `simulate`'s order with message clocks."""
    p = len(scheds)
    clock = [[0] * p for _ in range(p)]
    in_flight, out = {}, {}
    for rank, a in simulate(scheds, v):
        clock[rank][rank] += 1
        vs = a.chunk * p + rank
        if a.op.startswith("SEND"):
            in_flight.setdefault((a.op[-1], a.mb, vs), deque()).append(list(clock[rank]))
        elif a.op.startswith("RECV"):
            src = vs - 1 if a.op == "RECV_F" else vs + 1
            sent = in_flight[(a.op[-1], a.mb, src)].popleft()
            clock[rank] = [max(x, y) for x, y in zip(clock[rank], sent)]
        out[(rank, a)] = list(clock[rank])
    return out


def before(clocks, x, y) -> bool:
    cx, cy = clocks[x], clocks[y]
    return all(a <= b for a, b in zip(cx, cy)) and cx != cy


def event(p, op, mb, vstage):
    """The (rank, action) of op on micro-batch mb at virtual stage vstage."""
    return vstage % p, Action(op, mb, vstage // p)


@pytest.mark.parametrize("kind,p,m,v", CASES)
def test_schedule_is_deadlock_free_and_causally_ordered(kind, p, m, v):
    scheds = all_schedules(kind, p, m, v)
    clocks = vector_clocks(scheds, v)  # raises on deadlock or a mismatched send/receive pair
    last = p * v - 1
    for mb in range(m):
        for k in range(last):
            assert before(clocks, event(p, "F", mb, k), event(p, "F", mb, k + 1))
            assert before(clocks, event(p, "B", mb, k + 1), event(p, "B", mb, k))
        assert before(clocks, event(p, "F", mb, last), event(p, "B", mb, last))


@pytest.mark.parametrize("kind,p,m,v", CASES)
def test_every_gradient_is_produced_exactly_once(kind, p, m, v):
    scheds = all_schedules(kind, p, m, v)
    for rank, actions in enumerate(scheds):
        counts = Counter((a.op, a.mb, a.chunk) for a in actions if a.op in ("F", "B"))
        expected = {(op, mb, c): 1 for op in ("F", "B") for mb in range(m) for c in range(v)}
        assert counts == expected, f"rank {rank}"
        sends = Counter((a.mb, a.chunk) for a in actions if a.op == "SEND_B")
        firsts = 1 if rank == 0 else 0  # virtual stage 0 (rank 0, chunk 0) has no one to send to
        assert sum(sends.values()) == m * v - firsts * m


@pytest.mark.parametrize("kind,p,m,v", CASES)
def test_activations_in_flight_stay_within_the_bound(kind, p, m, v):
    for rank, actions in enumerate(all_schedules(kind, p, m, v)):
        live = peak = 0
        for a in actions:
            live += (a.op == "F") - (a.op == "B")
            peak = max(peak, live)
        assert peak == max_in_flight(kind, p, rank, m, v)
        if kind == "1f1b":
            assert peak <= p - rank  # the 1F1B memory promise
        if kind == "interleaved":
            assert peak <= 2 * (p - rank - 1) + (v - 1) * p + 1


@pytest.mark.parametrize("kind,p,m,v", [c for c in CASES if c[1] > 1 and c[2] > 2])
def test_forward_only_schedules_run(kind, p, m, v):
    scheds = all_schedules(kind, p, m, v, forward_only=True)
    assert all(a.op != "B" and not a.op.endswith("_B") for s in scheds for a in s)
    simulate(scheds, v)


def test_1f1b_shape_on_a_four_stage_pipeline():
    ops = [f"{a.op}{a.mb}" for a in build_schedule("1f1b", 4, 1, 6) if a.op in ("F", "B")]
    assert ops == ["F0", "F1", "F2", "B0", "F3", "B1", "F4", "B2", "F5", "B3", "B4", "B5"]


def test_simulate_catches_a_deadlock_and_a_mismatch():
    recv_first = [[Action("RECV_B", 0), Action("F", 0), Action("SEND_F", 0), Action("B", 0)],
                  [Action("RECV_F", 0), Action("F", 0), Action("B", 0), Action("SEND_B", 0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(recv_first)
    swapped = all_schedules("afab", 2, 2)
    swapped[1] = [Action(a.op, 1 - a.mb) if a.op == "RECV_F" else a for a in swapped[1]]
    with pytest.raises(RuntimeError, match="expects"):
        simulate(swapped)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="divisible by pp"):
        build_schedule("interleaved", 4, 0, 6, 2)
    with pytest.raises(ValueError, match="use schedule 'interleaved'"):
        build_schedule("1f1b", 2, 0, 4, 2)
    with pytest.raises(ValueError, match="unknown"):
        build_schedule("gpipe", 2, 0, 4)
    with pytest.raises(ValueError, match="outside"):
        build_schedule("1f1b", 2, 2, 4)
