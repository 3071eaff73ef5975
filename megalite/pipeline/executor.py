"""The executor: runs one rank's action list (any schedule) against a stage and a P2P link.

It knows nothing about transformers. A `StageHooks` tells it how to run a
chunk forward, where the first virtual stage's input comes from, and how the
last virtual stage turns its output into a loss; the executor keeps the
activations each F stashes until its B, and counts them, so the schedule's
memory bound can be checked against what really happened.
"""
from __future__ import annotations

from bisect import bisect_left
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from megalite.pipeline.schedules import Action


@dataclass
class StageHooks:
    """What the executor needs from the model side.

    forward(chunk, x) -> output of that chunk; first_input(mb) -> the input of
    virtual stage 0 (tokens); loss(mb, output) -> the scalar loss to
    backpropagate for micro-batch mb (already divided by the number of
    micro-batches); backward_loss(loss) runs its backward (the engine scales
    it under fp16). `context` wraps every forward (autocast).
    forward_kwargs(mb) -> extra keyword arguments of every chunk's forward of
    micro-batch mb (the document ids of packed samples, which every stage
    derives from the batch it reads rather than receiving them over p2p).
    """

    forward: Callable[[int, torch.Tensor], torch.Tensor]
    first_input: Callable[[int], torch.Tensor]
    loss: Callable[[int, torch.Tensor], torch.Tensor]
    backward_loss: Callable[[torch.Tensor], None] = lambda loss: loss.backward()
    context: Callable[[], object] = nullcontext
    forward_kwargs: Callable[[int], dict] = lambda mb: {}


@dataclass
class RunStats:
    """What one run of a schedule produced: the detached per-micro-batch losses (last stage only)
    and the peak number of (mb, chunk) activations stashed between their F and B."""

    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    peak_stashed: int = 0


class Executor:
    """Runs action lists for rank `stage` of `pp` with `v` chunks per rank.

    `p2p` is a `P2P` (or anything with send/recv/flush, and optionally post);
    it may be None when pp == 1 and v == 1, where no action communicates.
    `lookahead` receives are posted ahead of the action that waits on them,
    so their transfer overlaps the compute before it.
    """

    def __init__(self, hooks: StageHooks, p2p, stage: int, pp: int, v: int = 1, lookahead: int = 2):
        self.hooks, self.p2p, self.stage, self.pp, self.v = hooks, p2p, stage, pp, v
        self.lookahead = lookahead

    def _vstage(self, a: Action) -> int:
        return a.chunk * self.pp + self.stage

    def _is_last(self, a: Action) -> bool:
        return self._vstage(a) == self.pp * self.v - 1

    def run(self, actions: list[Action], forward_only: bool = False) -> RunStats:
        """Execute `actions` in order; returns losses and the stash peak. Sends are flushed at the end."""
        stats = RunStats()
        inputs: dict[tuple, torch.Tensor] = {}   # (mb, chunk) -> received activation (needs its grad)
        stash: dict[tuple, torch.Tensor] = {}    # (mb, chunk) -> output (or loss) awaiting backward
        grads: dict[tuple, torch.Tensor] = {}    # (mb, chunk) -> received output grad / input grad to send
        outgoing: dict[tuple, torch.Tensor] = {}  # (mb, chunk) -> activation to send forward
        receives = [i for i, a in enumerate(actions) if a.op.startswith("RECV")]
        for i, a in enumerate(actions):
            self._prefetch(actions, receives, i)
            key = (a.mb, a.chunk)
            if a.op == "RECV_F":
                inputs[key] = self.p2p.recv(a, self.stage).requires_grad_(not forward_only)
            elif a.op == "F":
                out = self._forward(a, inputs.get(key), stats, forward_only)
                if not self._is_last(a):
                    outgoing[key] = out
                if not forward_only:
                    stash[key] = out
                    stats.peak_stashed = max(stats.peak_stashed, len(stash))
                else:
                    inputs.pop(key, None)
            elif a.op == "SEND_F":
                self.p2p.send(outgoing.pop(key), a, self.stage)
            elif a.op == "RECV_B":
                grads[key] = self.p2p.recv(a, self.stage)
            elif a.op == "B":
                self._backward(a, stash.pop(key), grads.pop(key, None))
                x = inputs.pop(key, None)
                if x is not None:
                    grads[key] = x.grad
            elif a.op == "SEND_B":
                self.p2p.send(grads.pop(key), a, self.stage)
            else:
                raise ValueError(f"unknown pipeline action {a}")
        if self.p2p is not None:
            self.p2p.flush()
        left = {k for d in (inputs, stash, grads, outgoing) for k in d}
        if left:
            raise RuntimeError(f"schedule left (mb, chunk) {sorted(left)} unfinished on stage {self.stage}")
        return stats

    def _prefetch(self, actions: list[Action], receives: list[int], i: int) -> None:
        """Post the next `lookahead` receives at or after position i (a posted receive never blocks)."""
        post = getattr(self.p2p, "post", None)
        if post is None or not self.lookahead:
            return
        for j in receives[bisect_left(receives, i):][: self.lookahead]:
            post(actions[j], self.stage)

    def _forward(self, a: Action, x, stats: RunStats, forward_only: bool) -> torch.Tensor:
        if self._vstage(a) == 0:
            x = self.hooks.first_input(a.mb)
        elif x is None:
            raise RuntimeError(f"{a} on stage {self.stage} has no received input; the schedule lacks a RECV_F")
        with torch.set_grad_enabled(not forward_only), self.hooks.context():
            out = self.hooks.forward(a.chunk, x, **self.hooks.forward_kwargs(a.mb))
            if self._is_last(a):
                out = self.hooks.loss(a.mb, out)
                stats.losses[a.mb] = out.detach()
        return out

    def _backward(self, a: Action, out: torch.Tensor, grad) -> None:
        if self._is_last(a):
            self.hooks.backward_loss(out)
        else:
            if grad is None:
                raise RuntimeError(f"{a} on stage {self.stage} has no output gradient; the schedule lacks a RECV_B")
            torch.autograd.backward(out, grad_tensors=grad.to(out.dtype))
