"""Every schedule, checked without processes, for many (pp, micro-batches, virtual stages).

The proof of ordering is causal, not an accident of one interleaving: all
ranks' lists are run by `simulate` (non-blocking sends, blocking in-order
receives), vector clocks are carried along every message, and "F of stage k
before F of stage k+1" is checked as happens-before.

Deadlock freedom under NCCL's stricter rules (p2p between two ranks in issue
order, a group done only when all its ops met their peers') is checked on the
batched groups the executor really issues (`schedule_steps`), and the old
early-posting order is shown to deadlock there, so that check can fail.
"""
from collections import Counter, deque

import pytest

from megalite.pipeline.deadlock import (
    Op,
    check_groups,
    check_schedule,
    comm_groups,
    early_posting_groups,
    simulate_makespan,
)
from megalite.pipeline.schedules import (
    Action,
    all_schedules,
    build_schedule,
    comm_steps,
    max_in_flight,
    schedule_steps,
    simulate,
)


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


def nccl_cases():
    """(kind, p, v, micro-batch counts) for p = 1..8: m < p where the schedule allows it."""
    for p in range(1, 9):
        small = sorted({1, 2, 3, max(1, p - 1), p, p + 1, 2 * p + 1, 3 * p})
        yield "afab", p, 1, small
        yield "1f1b", p, 1, small
        for v in (2, 3, 4):
            yield "afab", p, v, small[:4]
            if p > 1:  # interleaved needs m divisible by p (checked by build_schedule)
                yield "interleaved", p, v, [p, 2 * p, 3 * p, 4 * p]


@pytest.mark.parametrize("kind,p,v,ms", list(nccl_cases()), ids=lambda x: str(x))
def test_executor_groups_complete_under_nccl_rules(kind, p, v, ms):
    for m in ms:
        for forward_only in (False, True):
            check_schedule(kind, p, m, v, forward_only)  # raises on a deadlock or a FIFO mismatch


def old_executor_groups(kind, p, m, v=1):
    """What the executor issued before batching: receives posted two actions ahead, one op at a time."""
    return [early_posting_groups(actions, p, r, v) for r, actions in enumerate(all_schedules(kind, p, m, v))]


@pytest.mark.parametrize("kind,p,m,v", [("1f1b", 2, 4, 1), ("1f1b", 4, 8, 1), ("interleaved", 2, 4, 2),
                                        ("afab", 2, 4, 1)])
def test_old_early_posting_order_deadlocks_under_nccl_rules(kind, p, m, v):
    simulate(all_schedules(kind, p, m, v), v)  # fine when sends never block...
    with pytest.raises(RuntimeError, match="deadlock under NCCL"):
        check_groups(old_executor_groups(kind, p, m, v))  # ...not when they may


def test_per_compute_groups_deadlock_for_interleaved_so_the_steady_state_is_fused():
    plain = [comm_groups(comm_steps(build_schedule("interleaved", 2, r, 4, 2)), 2, r, 2) for r in range(2)]
    with pytest.raises(RuntimeError, match="deadlock under NCCL"):
        check_groups(plain)
    check_schedule("interleaved", 2, 4, 2)


def test_the_brief_example_recv_before_send_on_both_ends_deadlocks():
    act, grad = ("act", 1, 0), ("grad", 0, 1)
    recv_early = [[[Op("recv", 1, 0, grad)], [Op("send", 0, 1, act)]],   # stage 0: recv(B0) before send(F1)
                  [[Op("recv", 0, 1, act)], [Op("send", 1, 0, grad)]]]   # stage 1: recv(F1) before send(B0)
    with pytest.raises(RuntimeError, match="deadlock"):
        check_groups(recv_early)
    batched = [[[Op("recv", 1, 0, grad), Op("send", 0, 1, act)]], [[Op("recv", 0, 1, act), Op("send", 1, 0, grad)]]]
    assert check_groups(batched) == 1


def test_checker_catches_a_fifo_mismatch_and_a_lost_message():
    with pytest.raises(RuntimeError, match="expects"):
        check_groups([[[Op("send", 0, 1, ("act", 0, 0)), Op("send", 0, 1, ("act", 1, 0))]],
                      [[Op("recv", 0, 1, ("act", 1, 0))], [Op("recv", 0, 1, ("act", 0, 0))]]])
    with pytest.raises(RuntimeError, match="1 sends from rank 0 to 1 but 0 receives"):
        check_groups([[[Op("send", 0, 1, ("act", 0, 0))]], [[]]])


@pytest.mark.parametrize("kind,p,m,v", [c for c in CASES if c[1] > 1])
def test_steps_keep_the_action_order_and_feed_each_compute(kind, p, m, v):
    for r in range(p):
        actions = build_schedule(kind, p, r, m, v)
        steps = schedule_steps(kind, p, r, m, v)
        assert [s.compute for s in steps if s.compute] == [a for a in actions if a.op in ("F", "B")]
        assert sorted(c for s in steps for c in s.comm) == sorted(a for a in actions if a.op not in ("F", "B"))
        done, posted = set(), set()
        for s in steps:
            for c in s.comm:  # a send goes after its compute; a receive no later than its compute
                assert c.op.startswith("RECV") or ("F" if c.op == "SEND_F" else "B", c.mb, c.chunk) in done, c
                posted.add(c)
            if s.compute:
                need = {"F": "RECV_F", "B": "RECV_B"}[s.compute.op]
                wanted = Action(need, s.compute.mb, s.compute.chunk)
                assert wanted not in actions or wanted in posted, s.compute
                done.add(tuple(s.compute))


@pytest.mark.parametrize("kind,p,m,v", [("1f1b", 2, 4, 1), ("1f1b", 4, 8, 1), ("1f1b", 8, 3, 1), ("afab", 4, 6, 1),
                                        ("interleaved", 2, 4, 2), ("interleaved", 2, 4, 4), ("interleaved", 4, 8, 3),
                                        ("interleaved", 8, 16, 2)])
def test_the_executor_groups_add_no_bubble_at_zero_latency(kind, p, m, v):
    """Batched groups (and the fused steady state) cost nothing over the schedule: makespan (v*m + p - 1) chunk
    slots, i.e. bubble (p-1)/(v*m) of the ideal time for interleaved, (p-1)/m for 1F1B."""
    vm = v * m if kind == "interleaved" else m
    assert simulate_makespan(kind, p, m, v, 1.0, 2.0) == pytest.approx((vm + p - 1) * 3.0 / (vm // m))
    assert simulate_makespan(kind, p, m, v, 1.0, 2.0, latency=0.01) > simulate_makespan(kind, p, m, v, 1.0, 2.0)
