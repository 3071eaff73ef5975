"""Pipeline schedules as data: pure functions from (stages, stage, micro-batches, chunks) to actions.

A rank's schedule is an ordered list of `Action(op, mb, chunk)`:

    F       forward of micro-batch `mb` through model chunk `chunk`
    B       backward of the same
    RECV_F  receive the activation entering (mb, chunk) from the previous stage
    SEND_F  send the activation leaving (mb, chunk) to the next stage
    RECV_B  receive the gradient of (mb, chunk)'s output from the next stage
    SEND_B  send the gradient of (mb, chunk)'s input to the previous stage

With p ranks and v chunks per rank there are p*v virtual stages; chunk c of
rank r is virtual stage c*p + r (Megatron's assignment), so activations go
r -> r+1 inside a chunk and wrap from rank p-1 chunk c to rank 0 chunk c+1.
Peers are implied: *_F goes forward (prev -> next), *_B backward.

How communication runs: `comm_steps` cuts a rank's list into steps, each
one batched group of sends and receives (the sends the previous compute owes
and the receives the next one needs, Megatron's send_forward_recv_backward
and kin) followed by that compute. The executor issues exactly these groups,
and `megalite.pipeline.deadlock.check_groups` proves them deadlock-free under
NCCL's rules (p2p between two ranks runs in issue order; a group finishes only
when every op in it has met its peer's), so the proof and the run cannot
drift apart. `simulate` checks the looser rules of buffered sends (a send
never blocks, receives match in order): causal order and pairing.

Every schedule is one compute order: forwards in a fixed order, backwards in
a fixed order, `warmup` forwards first, then one-forward-one-backward, then
the remaining backwards. The schedules differ only in that order and warmup:
  afab         warmup = everything (all forwards, then all backwards)
  1f1b         warmup = p - r - 1: at most p - r micro-batches in flight
  interleaved  forwards in groups of p micro-batches per chunk (Megatron),
               warmup = 2(p - r - 1) + (v - 1)p
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

from megalite.config import choices

SCHEDULES = choices("parallel.schedule")
OPS = ("F", "B", "RECV_F", "SEND_F", "RECV_B", "SEND_B")


class Action(NamedTuple):
    """One step of a rank's schedule (see module docstring for the ops)."""

    op: str
    mb: int
    chunk: int = 0


def _check(kind: str, p: int, stage: int, m: int, v: int) -> None:
    if kind not in SCHEDULES:
        raise ValueError(f"pipeline schedule {kind!r} is unknown; use one of {SCHEDULES}")
    for name, value in (("pp", p), ("micro-batches", m), ("virtual_stages", v)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if not 0 <= stage < p:
        raise ValueError(f"stage={stage} is outside 0..{p - 1}")
    if kind == "1f1b" and v != 1:
        raise ValueError(f"schedule '1f1b' runs one chunk per rank but virtual_stages={v}; "
                         "use schedule 'interleaved' (or 'afab') with virtual stages")
    if kind == "interleaved" and m % p:
        raise ValueError(f"interleaved schedule needs micro-batches ({m}) divisible by pp ({p}); "
                         "change train.global_batch_size or train.micro_batch_size")


def forward_order(p: int, m: int, v: int) -> list[tuple[int, int]]:
    """(mb, chunk) in forward order: per group of p micro-batches, chunk by chunk (v=1: mb order)."""
    if v == 1:
        return [(mb, 0) for mb in range(m)]
    return [(g + i, c) for g in range(0, m, p) for c in range(v) for i in range(min(p, m - g))]


def backward_order(p: int, m: int, v: int) -> list[tuple[int, int]]:
    """(mb, chunk) in backward order: as forward, chunks reversed (the last chunk starts backward)."""
    return [(mb, v - 1 - c) for mb, c in forward_order(p, m, v)]


def warmup_forwards(kind: str, p: int, stage: int, m: int, v: int) -> int:
    """Forwards a rank runs before its first backward."""
    total = m * v
    if kind == "afab":
        return total
    if kind == "1f1b":
        return min(p - stage - 1, total)
    return min(2 * (p - stage - 1) + (v - 1) * p, total)


def max_in_flight(kind: str, p: int, stage: int, m: int, v: int) -> int:
    """The bound on (mb, chunk) activations stashed at once on `stage`: warmup + 1, at most m*v."""
    return min(warmup_forwards(kind, p, stage, m, v) + 1, m * v)


def compute_order(kind: str, p: int, stage: int, m: int, v: int = 1) -> list[Action]:
    """The F/B actions of one rank, without communication."""
    _check(kind, p, stage, m, v)
    fwd = [Action("F", mb, c) for mb, c in forward_order(p, m, v)]
    bwd = [Action("B", mb, c) for mb, c in backward_order(p, m, v)]
    warm = warmup_forwards(kind, p, stage, m, v)
    out = fwd[:warm]
    for f, b in zip(fwd[warm:], bwd):  # steady state: one forward, one backward
        out += [f, b]
    out += bwd[len(fwd) - warm:]
    return out


def with_communication(compute: list[Action], p: int, stage: int, v: int) -> list[Action]:
    """Wrap each F/B with the receive it needs before and the send it owes after."""
    last_virtual = p * v - 1
    out = []
    for a in compute:
        vstage = a.chunk * p + stage
        if a.op == "F":
            pre = [Action("RECV_F", a.mb, a.chunk)] if vstage > 0 else []
            post = [Action("SEND_F", a.mb, a.chunk)] if vstage < last_virtual else []
        elif a.op == "B":
            pre = [Action("RECV_B", a.mb, a.chunk)] if vstage < last_virtual else []
            post = [Action("SEND_B", a.mb, a.chunk)] if vstage > 0 else []
        else:
            raise ValueError(f"compute order holds {a}; only F and B are expected")
        out += [*pre, a, *post]
    return out


def build_schedule(kind: str, p: int, stage: int, m: int, v: int = 1, forward_only: bool = False) -> list[Action]:
    """Rank `stage`'s full action list for `m` micro-batches (forward_only: evaluation, no B)."""
    if forward_only:
        _check(kind, p, stage, m, v)
        compute = [Action("F", mb, c) for mb, c in forward_order(p, m, v)]
    else:
        compute = compute_order(kind, p, stage, m, v)
    return with_communication(compute, p, stage, v)


def all_schedules(kind: str, p: int, m: int, v: int = 1, forward_only: bool = False) -> list[list[Action]]:
    """Every rank's action list, rank order."""
    return [build_schedule(kind, p, r, m, v, forward_only) for r in range(p)]


class Step(NamedTuple):
    """One batched communication group, then the compute it feeds (None: the sends after the last one)."""

    comm: tuple[Action, ...]
    compute: Action | None


def comm_steps(actions: list[Action], fuse_from: int | None = None) -> list[Step]:
    """Group the communication between consecutive F/B actions into one batch each.

    The group before compute k holds the sends compute k-1 owes, then the
    receives compute k needs; a trailing group the last compute's sends.
    Sends come first so that a rank-local hand-over (pp=1 with chunks) is
    sent before it is received.

    fuse_from=w (interleaved): every F-then-B pair after the first w forwards
    (the steady state) gets no group in between, as in Megatron's interleaved
    schedule: the B's receive joins the group before the F, the F's send the
    group after the B. Without that, per-compute groups deadlock under NCCL
    rules once m > p (see megalite.pipeline.deadlock).
    """
    steps = [[list(comm), a] for comm, a in _plain_steps(actions)]
    forwards, i = 0, 0
    while i + 1 < len(steps):
        a, b = steps[i][1], steps[i + 1][1]
        forwards += a.op == "F"
        if fuse_from is not None and forwards > fuse_from and a.op == "F" and b is not None and b.op == "B":
            between, steps[i + 1][0] = steps[i + 1][0], []
            steps[i][0] += [c for c in between if c.op.startswith("RECV")]
            sends = [c for c in between if c.op.startswith("SEND")]
            if i + 2 < len(steps):
                steps[i + 2][0][:0] = sends
            elif sends:
                steps.append([sends, None])
            i += 2
        else:
            i += 1
    return [Step(tuple(comm), a) for comm, a in steps]


def _plain_steps(actions: list[Action]) -> list[Step]:
    """One group between every two consecutive computes (sends owed, then receives needed)."""
    steps, pending = [], []
    for a in actions:
        if a.op in ("F", "B"):
            sends = [c for c in pending if c.op.startswith("SEND")]
            steps.append(Step(tuple(sends + [c for c in pending if c.op.startswith("RECV")]), a))
            pending = []
        elif a.op in OPS:
            pending.append(a)
        else:
            raise ValueError(f"unknown pipeline action {a}")
    if pending:
        steps.append(Step(tuple(pending), None))
    return steps


def schedule_steps(kind: str, p: int, stage: int, m: int, v: int = 1, forward_only: bool = False) -> list[Step]:
    """Rank `stage`'s schedule as the executor runs it: batched groups, each followed by one compute.

    The one place groups are decided; `megalite.pipeline.deadlock` proves
    exactly these deadlock-free under NCCL rules.
    """
    actions = build_schedule(kind, p, stage, m, v, forward_only)
    steady = kind == "interleaved" and not forward_only
    return comm_steps(actions, warmup_forwards(kind, p, stage, m, v) if steady else None)


def message(a: Action, p: int, stage: int, v: int) -> tuple[int, int, tuple]:
    """(src rank, dst rank, payload id) of a send or receive; the id names what travels."""
    vstage = a.chunk * p + stage
    if a.op in ("SEND_F", "RECV_F"):
        src_v = vstage if a.op == "SEND_F" else vstage - 1
        return src_v % p, (src_v + 1) % p, ("act", a.mb, src_v)
    src_v = vstage if a.op == "SEND_B" else vstage + 1  # gradient leaving virtual stage src_v
    return src_v % p, (src_v - 1) % p, ("grad", a.mb, src_v)


def simulate(schedules: list[list[Action]], v: int = 1) -> list[tuple[int, Action]]:
    """Run every rank's list with non-blocking sends and blocking, in-order receives.

    Returns the global order in which (rank, action) completed. Raises
    RuntimeError naming the stuck ranks on a deadlock, and on a receive that
    would match a different message than the one it expects.
    """
    p = len(schedules)
    channels: dict[tuple[int, int], deque] = {}
    pos, done = [0] * p, []
    while True:
        progressed = False
        for r in range(p):
            while pos[r] < len(schedules[r]):
                a = schedules[r][pos[r]]
                if a.op in ("SEND_F", "SEND_B"):
                    src, dst, msg = message(a, p, r, v)
                    channels.setdefault((src, dst), deque()).append(msg)
                elif a.op in ("RECV_F", "RECV_B"):
                    src, dst, msg = message(a, p, r, v)
                    queue = channels.get((src, dst))
                    if not queue:
                        break  # blocked: wait for the sender
                    got = queue.popleft()
                    if got != msg:
                        raise RuntimeError(f"rank {r} {a} expects {msg} from rank {src} but the next "
                                           f"message on that link is {got}")
                done.append((r, a))
                pos[r] += 1
                progressed = True
        if all(pos[r] == len(schedules[r]) for r in range(p)):
            leftover = {k: list(q) for k, q in channels.items() if q}
            if leftover:
                raise RuntimeError(f"messages sent but never received: {leftover}")
            return done
        if not progressed:
            stuck = {r: schedules[r][pos[r]] for r in range(p) if pos[r] < len(schedules[r])}
            raise RuntimeError(f"deadlock: ranks blocked at {stuck}")
