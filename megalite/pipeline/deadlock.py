"""Deadlock check of batched point-to-point groups under NCCL's rules, as pure functions.

NCCL gives weaker guarantees than buffered sends (what `schedules.simulate`
assumes): all p2p between two ranks runs in issue order on one stream, and a
send may not finish until its receive is posted. The model checked here:

* each rank runs its communication groups in order, one at a time;
* a group completes only when every op in it has its matching op posted by
  the peer (in the peer's current group, or in one already completed);
* ops match per (src, dst) pair and direction, first-in first-out: the k-th
  send from a to b meets the k-th receive at b from a;
* compute never blocks (it only runs between groups).

`check_schedule` derives every rank's groups from `schedules.schedule_steps`,
the very steps the executor issues, so what is proven is what runs. `early_posting_groups`
reproduces the old executor's order (receives posted two ahead, each send its
own op) so a test can show the checker catches a real deadlock.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import NamedTuple

from megalite.pipeline.schedules import Action, Step, message, schedule_steps


class Op(NamedTuple):
    """One send or receive: the endpoints and the payload id it carries."""

    kind: str   # "send" | "recv"
    src: int
    dst: int
    payload: tuple


def _op(a: Action, p: int, stage: int, v: int) -> Op | None:
    src, dst, payload = message(a, p, stage, v)
    if src == dst:
        return None  # pp=1 with chunks: handed over inside the rank, never blocks
    return Op("send" if a.op.startswith("SEND") else "recv", src, dst, payload)


def _step_ops(step: Step, p: int, stage: int, v: int) -> list[Op]:
    """The ops of one step's batched group (none when everything stays inside the rank)."""
    return [o for o in (_op(a, p, stage, v) for a in step.comm) if o is not None]


def comm_groups(steps: list[Step], p: int, stage: int, v: int) -> list[list[Op]]:
    """The non-empty batched groups rank `stage` issues for `steps`, in order (exactly the executor's)."""
    return [ops for ops in (_step_ops(step, p, stage, v) for step in steps) if ops]


def early_posting_groups(actions: list[Action], p: int, stage: int, v: int, lookahead: int = 2) -> list[list[Op]]:
    """The old executor's order: before each action the next `lookahead` receives are posted, and every
    send and receive is its own op. Deadlocks under NCCL rules (kept to show the checker can fail)."""
    receives = [i for i, a in enumerate(actions) if a.op.startswith("RECV")]
    posted, groups = set(), []
    for i, a in enumerate(actions):
        for j in receives[bisect_left(receives, i):][:lookahead]:
            if j not in posted:
                posted.add(j)
                groups.append([_op(actions[j], p, stage, v)])
        if a.op.startswith("SEND"):
            groups.append([_op(a, p, stage, v)])
    return [g for g in groups if g[0] is not None]


def _partners(groups: list[list[list[Op]]]) -> dict[tuple[int, int, int], tuple[int, int]]:
    """(rank, group, op index) -> (peer rank, peer's group index) of its FIFO-matched op; raises on a
    mismatched payload or an op without a partner."""
    queues: dict[tuple, list] = {}  # (src, dst, kind) -> [(rank, group, index, payload)] in issue order
    for rank, rank_groups in enumerate(groups):
        for g, ops in enumerate(rank_groups):
            for i, o in enumerate(ops):
                owner = o.src if o.kind == "send" else o.dst
                if owner != rank:
                    raise ValueError(f"rank {rank} group {g} holds {o}, which rank {owner} must issue")
                queues.setdefault((o.src, o.dst, o.kind), []).append((rank, g, i, o.payload))
    out = {}
    for (src, dst, kind), ops in queues.items():
        if kind == "recv":
            continue
        recvs = queues.get((src, dst, "recv"), [])
        if len(recvs) != len(ops):
            raise RuntimeError(f"{len(ops)} sends from rank {src} to {dst} but {len(recvs)} receives")
        for (sr, sg, si, sent), (rr, rg, ri, wanted) in zip(ops, recvs):
            if sent != wanted:
                raise RuntimeError(f"rank {dst} group {rg} expects {wanted} from rank {src}, but the send it "
                                   f"meets in FIFO order (rank {src} group {sg}) carries {sent}")
            out[(sr, sg, si)], out[(rr, rg, ri)] = (rr, rg), (sr, sg)
    if any(len(q) for k, q in queues.items() if k[2] == "recv" and (k[0], k[1], "send") not in queues):
        raise RuntimeError(f"receives without any send: {[k for k in queues if k[2] == 'recv']}")
    return out


def check_groups(groups: list[list[list[Op]]]) -> int:
    """Run every rank's groups under the NCCL model; return the number of rounds, raise on a deadlock.

    `groups[r]` is rank r's list of groups (lists of `Op`). A rank's current
    group completes when each op's partner sits in a group of its peer that
    is current or already done.
    """
    partner = _partners(groups)
    current, rounds = [0] * len(groups), 0
    while any(current[r] < len(gs) for r, gs in enumerate(groups)):
        rounds += 1
        progressed = False
        for r, gs in enumerate(groups):
            g = current[r]
            if g < len(gs) and all(partner[(r, g, i)][1] <= current[partner[(r, g, i)][0]]
                                   for i in range(len(gs[g]))):
                current[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: groups[r][current[r]] for r in range(len(groups)) if current[r] < len(groups[r])}
            raise RuntimeError(f"deadlock under NCCL p2p rules: ranks blocked in groups {stuck}")
    return rounds


def check_schedule(kind: str, p: int, m: int, v: int = 1, forward_only: bool = False) -> int:
    """check_groups over the groups every rank's executor issues for this schedule."""
    return check_groups([comm_groups(schedule_steps(kind, p, r, m, v, forward_only), p, r, v) for r in range(p)])


def simulate_makespan(kind: str, p: int, m: int, v: int, tf: float, tb: float, latency: float = 0.0) -> float:
    """Makespan of the executor's groups and computes under the same NCCL model, with times.

    A whole stage's forward takes tf, its backward tb (a chunk: /v). A group
    starts when posted (after the compute before it) and its predecessor is
    done; an op finishes `latency` after both ends' groups have started; a
    compute starts when the one before it ends and the group bringing its
    input is done. With latency 0 this is the schedule's own bubble.
    """
    steps = [schedule_steps(kind, p, r, m, v) for r in range(p)]
    groups = [[_step_ops(s, p, r, v) for s in rank_steps] for r, rank_steps in enumerate(steps)]  # one per step
    partner = _partners(groups)
    start, done, end = {}, {}, {}   # (rank, step) -> group start, group done, compute end
    pos = [0] * p
    while any(pos[r] < len(steps[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while pos[r] < len(steps[r]):
                i = pos[r]
                posted = end[(r, i - 1)] if i else 0.0
                start[(r, i)] = max(posted, done[(r, i - 1)] if i else 0.0)
                peers = [partner[(r, i, k)] for k in range(len(groups[r][i]))]
                if any(q not in start for q in peers):
                    break
                done[(r, i)] = max([start[(r, i)]] + [max(start[(r, i)], start[q]) + latency for q in peers])
                a = steps[r][i].compute
                if a is None:
                    end[(r, i)] = posted
                else:
                    need = Action("RECV_F" if a.op == "F" else "RECV_B", a.mb, a.chunk)
                    ready = max((done[(r, j)] for j in range(i + 1) if need in steps[r][j].comm), default=0.0)
                    end[(r, i)] = max(posted, ready) + (tf if a.op == "F" else tb) / v
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"deadlock under NCCL p2p rules at steps {pos}")
    return max(max(end.values()), max(done.values()))
