"""A clean stop on request: SIGTERM or SIGINT (SLURM preemption, Ctrl-C) ends training at the end of
the current step, with a checkpoint, on every rank together."""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class StopSignal:
    """SIGTERM/SIGINT set a flag; every rank must agree, so `received()` all-reduces it before it is acted on."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, device: torch.device):
        self.flag, self.device, self.previous = False, device, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._set) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _set(self, signum, frame):
        self.flag = True

    def received(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it once per step)."""
        if not dist.is_initialized():
            return self.flag
        flag = torch.tensor([float(self.flag)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
