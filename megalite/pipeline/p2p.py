"""Point-to-point transfer of activations and gradients between neighbouring pipeline stages.

Every tensor that crosses a stage boundary has one shape, known before the
first step: [s, micro_b, h] (under sequence parallelism [s/tp, micro_b, h]),
so receivers allocate their buffer up front and no shape handshake is
needed per micro-batch. Sends are posted with `isend` and only waited on at
`flush` (or when too many are outstanding), receives block until their
tensor has arrived (a send is never waited on mid-schedule): exactly the semantics `schedules.simulate` proves the
schedules deadlock-free under. Messages between two ranks match in the
order they were posted (what NCCL guarantees); on gloo a tag naming the
micro-batch, the virtual stage and the direction also guards the pairing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.pipeline.schedules import Action


class P2P:
    """Sends and receives one rank's boundary tensors to its pipeline neighbours.

    `prev_rank`/`next_rank` are global ranks (the ring wraps: the first stage's
    prev is the last stage, which interleaved schedules use between chunks).
    `shape`/`dtype` describe every boundary tensor; `device` where it lives.
    """

    PRUNE_AT = 64  # outstanding sends before finished ones are dropped (their buffers freed)

    def __init__(self, prev_rank: int, next_rank: int, shape: tuple, dtype: torch.dtype,
                 device: torch.device, pp: int, group=None):
        self.prev_rank, self.next_rank, self.group = prev_rank, next_rank, group
        self.shape, self.dtype, self.device, self.pp = tuple(shape), dtype, torch.device(device), pp
        self.pending: list[tuple[object, torch.Tensor]] = []
        self.posted: dict[Action, tuple[object, torch.Tensor]] = {}
        self.use_tags = dist.get_backend(group) == "gloo"  # NCCL ignores tags; gloo matches on them

    def _tag(self, a: Action, stage: int) -> int:
        # the virtual stage the tensor LEAVES, so the sender's and receiver's actions agree
        vstage = a.chunk * self.pp + stage
        src_v = vstage - 1 if a.op == "RECV_F" else vstage + 1 if a.op == "RECV_B" else vstage
        direction = 0 if a.op.endswith("_F") else 1
        return 0 if not self.use_tags else (a.mb * 4096 + src_v) * 2 + direction

    def send(self, tensor: torch.Tensor, a: Action, stage: int) -> None:
        """Post the send for a SEND_F/SEND_B action; the buffer stays alive until `flush`."""
        if tuple(tensor.shape) != self.shape:
            raise ValueError(f"{a}: boundary tensor has shape {tuple(tensor.shape)}, the pipeline was set up "
                             f"for {self.shape}; every micro-batch must have the same [s, b, h]")
        dst = self.next_rank if a.op == "SEND_F" else self.prev_rank
        buf = tensor.detach().to(self.dtype).contiguous()
        work = dist.isend(buf, dst, group=self.group, tag=self._tag(a, stage))
        self.pending.append((work, buf))
        if len(self.pending) > self.PRUNE_AT:
            # drop finished sends only: waiting here would make sends blocking, which the
            # schedules are not proven deadlock-free under
            self.pending = [(w, b) for w, b in self.pending if not w.is_completed()]

    def post(self, a: Action, stage: int) -> None:
        """Post the receive of a RECV_F/RECV_B action ahead of time (no wait), so the transfer
        overlaps compute instead of starting when `recv` is reached."""
        if a not in self.posted:
            src = self.prev_rank if a.op == "RECV_F" else self.next_rank
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.posted[a] = (dist.irecv(buf, src, group=self.group, tag=self._tag(a, stage)), buf)

    def recv(self, a: Action, stage: int) -> torch.Tensor:
        """Block until the tensor a RECV_F/RECV_B action names has arrived, and return it."""
        self.post(a, stage)
        work, buf = self.posted.pop(a)
        work.wait()
        return buf

    def flush(self) -> None:
        """Wait for every posted send (their buffers may then be freed)."""
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
