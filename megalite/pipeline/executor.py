"""The executor: runs one rank's action list (any schedule) against a stage and a P2P link.

It knows nothing about transformers. A `StageHooks` tells it how to run a
chunk forward, where the first virtual stage's input comes from, and how the
last virtual stage turns its output into a loss; the executor keeps the
activations each F stashes until its B, and counts them, so the schedule's
memory bound can be checked against what really happened.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from megalite.pipeline.schedules import Action, Step


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
    """Runs one rank's steps (`schedules.schedule_steps`) for rank `stage` of `pp` with `v` chunks per rank.

    `p2p` is a `P2P` (anything with `launch(sends, receives, stage)` returning
    a handle with `take(action)` and `finish()`); None when pp == 1, where
    chunks hand their tensors over inside the rank. Each step's group is
    launched without waiting, in the order the steps give (the order the
    deadlock check proves); a compute waits only for the receive it needs, so
    a receive posted early (the steady state of interleaved) overlaps the
    compute before it. Sends are waited at the end of the run (their buffers
    live until then).
    """

    def __init__(self, hooks: StageHooks, p2p, stage: int, pp: int, v: int = 1):
        self.hooks, self.p2p, self.stage, self.pp, self.v = hooks, p2p, stage, pp, v

    def _vstage(self, a: Action) -> int:
        return a.chunk * self.pp + self.stage

    def _is_last(self, a: Action) -> bool:
        return self._vstage(a) == self.pp * self.v - 1

    def run(self, steps: list[Step], forward_only: bool = False) -> RunStats:
        """Execute `steps` in order; returns losses and the stash peak. All groups are waited at the end."""
        if steps and not isinstance(steps[0], Step):
            raise TypeError("Executor.run takes steps, not actions: use schedules.schedule_steps(kind, p, stage, m, v)")
        stats, self._links = RunStats(), _Links(self.p2p, self.stage, self.pp)
        inputs: dict[tuple, torch.Tensor] = {}   # (mb, chunk) -> received activation (needs its grad)
        stash: dict[tuple, torch.Tensor] = {}    # (mb, chunk) -> output (or loss) awaiting backward
        grads: dict[tuple, torch.Tensor] = {}    # (mb, chunk) -> output grad received / input grad to send
        outgoing: dict[tuple, torch.Tensor] = {}  # (mb, chunk) -> activation to send forward
        for step in steps:
            sends = [(c, (outgoing if c.op == "SEND_F" else grads).pop((c.mb, c.chunk)))
                     for c in step.comm if c.op.startswith("SEND")]
            self._links.launch(sends, [c for c in step.comm if c.op.startswith("RECV")])
            a = step.compute
            if a is None:
                continue
            key = (a.mb, a.chunk)
            if a.op == "F":
                if self._vstage(a) > 0:
                    inputs[key] = self._links.take(Action("RECV_F", *key)).requires_grad_(not forward_only)
                out = self._forward(a, inputs.get(key), stats, forward_only)
                if not self._is_last(a):
                    outgoing[key] = out
                if not forward_only:
                    stash[key] = out
                    stats.peak_stashed = max(stats.peak_stashed, len(stash))
                else:
                    inputs.pop(key, None)
            else:
                grad = None if self._is_last(a) else self._links.take(Action("RECV_B", *key))
                self._backward(a, stash.pop(key), grad)
                x = inputs.pop(key, None)
                if x is not None:
                    grads[key] = x.grad
        self._links.flush()
        left = {k for d in (inputs, stash, grads, outgoing) for k in d} | self._links.unclaimed()
        if left:
            raise RuntimeError(f"schedule left (mb, chunk) {sorted(left)} unfinished on stage {self.stage}")
        return stats

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
            torch.autograd.backward(out, grad_tensors=grad.to(out.dtype))


class _Links:
    """The launched groups of one run; pp == 1: hand-overs inside the rank."""

    def __init__(self, p2p, stage: int, pp: int):
        self.p2p, self.stage, self.pp = p2p, stage, pp
        self.launched: list = []                            # every group's handle, finished at flush
        self.holder: dict[Action, object] = {}              # RECV action -> the handle of its group
        self.local: dict[Action, torch.Tensor] = {}         # pp == 1: RECV action -> tensor

    def launch(self, sends: list[tuple[Action, torch.Tensor]], receives: list[Action]) -> None:
        if self.pp == 1:  # chunk c's output is chunk c+1's input (and back): no process to talk to
            for c, tensor in sends:
                op, chunk = ("RECV_F", c.chunk + 1) if c.op == "SEND_F" else ("RECV_B", c.chunk - 1)
                self.local[Action(op, c.mb, chunk)] = tensor.detach().clone()
            return
        if sends or receives:
            handle = self.p2p.launch(sends, receives, self.stage)
            self.launched.append(handle)
            self.holder.update({a: handle for a in receives})

    def take(self, a: Action) -> torch.Tensor:
        """The tensor receive `a` brought (waits for it; groups were launched in the proven order)."""
        if a in self.local:
            return self.local.pop(a)
        if a not in self.holder:
            raise RuntimeError(f"{a} on stage {self.stage} was never received; the schedule lacks it")
        return self.holder.pop(a).take(a)

    def flush(self) -> None:
        for handle in self.launched:
            handle.finish()
        self.launched = []

    def unclaimed(self) -> set:
        return {(a.mb, a.chunk) for a in (*self.holder, *self.local)}
