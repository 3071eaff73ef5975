"""Point-to-point transfer of activations and gradients between neighbouring pipeline stages.

Every tensor that crosses a stage boundary has one shape, known before the
first step: [s, micro_b, h] (under sequence parallelism [s/tp, micro_b, h]),
so receivers allocate their buffer up front and no shape handshake is
needed per micro-batch.

The communication between two computes goes out as ONE batched group
(`torch.distributed.batch_isend_irecv`, coalesced into one NCCL group;
on gloo the same ops, posted back to back), Megatron's
send_forward_recv_backward and kin. Which ops form a group, and in what
order groups go, is decided by `schedules.schedule_steps` alone, and
`megalite.pipeline.deadlock` proves that order deadlock-free under NCCL's
rules (p2p between two ranks runs in issue order, a send may wait for its
receive). Messages between two ranks match in posting order (what NCCL
guarantees); on gloo a tag naming the micro-batch, the virtual stage and the
direction also guards the pairing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.distributed import comm
from megalite.pipeline.schedules import Action


class P2P:
    """Sends and receives one rank's boundary tensors to its pipeline neighbours.

    `prev_rank`/`next_rank` are global ranks (the ring wraps: the first stage's
    prev is the last stage, which interleaved schedules use between chunks).
    `shape`/`dtype` describe every boundary tensor; `device` where it lives.
    """

    def __init__(self, prev_rank: int, next_rank: int, shape: tuple, dtype: torch.dtype,
                 device: torch.device, pp: int, group=None):
        self.prev_rank, self.next_rank, self.group = prev_rank, next_rank, group
        self.shape, self.dtype, self.device, self.pp = tuple(shape), dtype, torch.device(device), pp
        self.use_tags = dist.get_backend(group) == "gloo"  # NCCL ignores tags; gloo matches on them

    def _tag(self, a: Action, stage: int) -> int:
        # the virtual stage the tensor LEAVES, so the sender's and receiver's actions agree
        vstage = a.chunk * self.pp + stage
        src_v = vstage - 1 if a.op == "RECV_F" else vstage + 1 if a.op == "RECV_B" else vstage
        direction = 0 if a.op.endswith("_F") else 1
        return 0 if not self.use_tags else (a.mb * 4096 + src_v) * 2 + direction

    def _send_op(self, tensor: torch.Tensor, a: Action, stage: int) -> dist.P2POp:
        if tuple(tensor.shape) != self.shape:
            raise ValueError(f"{a}: boundary tensor has shape {tuple(tensor.shape)}, the pipeline was set up "
                             f"for {self.shape}; every micro-batch must have the same [s, b, h]")
        dst = self.next_rank if a.op == "SEND_F" else self.prev_rank
        buf = tensor.detach().to(self.dtype).contiguous()
        comm.record("send", buf, "pp")
        return dist.P2POp(dist.isend, buf, dst, self.group, self._tag(a, stage))

    def launch(self, sends: list[tuple[Action, torch.Tensor]], receives: list[Action], stage: int) -> "Batch":
        """Post one group: the SEND_* actions with their tensors and the RECV_* actions; no waiting."""
        ops = [self._send_op(t, a, stage) for a, t in sends]
        buffers = {}
        for a in receives:
            src = self.prev_rank if a.op == "RECV_F" else self.next_rank
            buffers[a] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buffers[a], src, self.group, self._tag(a, stage)))
        works = dist.batch_isend_irecv(ops) if ops else []
        return Batch(works, len(sends), buffers, [op.tensor for op in ops])


class Batch:
    """A launched group. `take(a)` blocks until receive `a` of it is done and returns its tensor;
    `finish()` until every op is (send buffers stay alive until then).

    Waiting less never changes the posting order the deadlock check proves, only
    when this rank blocks: on gloo (one work per op) a compute waits for its own
    receive alone, not for its group's sends or other receive (the fused steady
    state posts the backward's receive before the forward); under NCCL the group
    is one coalesced work, so take() waits for all of it, as the check assumes.
    """

    def __init__(self, works: list, n_sends: int, received: dict[Action, torch.Tensor], keep: list[torch.Tensor]):
        self.received, self.keep, self.waited = received, keep, set()
        if len(works) == n_sends + len(received):  # one work per op, in op order: sends, then receives
            self.pending = {a: [w] for a, w in zip(received, works[n_sends:])}
            self.sends = works[:n_sends]
        else:
            self.pending = {a: works for a in received}
            self.sends = works if not received else []

    def _wait(self, works: list) -> None:
        for work in works:
            if id(work) not in self.waited:  # gloo: waiting a finished receive again waits for another message
                comm.wait(work)
                self.waited.add(id(work))

    def take(self, a: Action) -> torch.Tensor:
        self._wait(self.pending.pop(a))
        return self.received.pop(a)

    def finish(self) -> None:
        """Wait for the sends (and any receive not taken)."""
        for a in list(self.pending):
            self.take(a)
        self._wait(self.sends)
        self.sends, self.keep = [], []
