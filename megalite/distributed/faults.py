"""Faults on purpose, for the failure tests: an explicit hook the launch and the Trainer call.

    MEGALITE_FAULT_INJECT="rank=3,step=3,mode=raise|exit|kill|hang|term"
    MEGALITE_FAULT_INJECT="rank=0,step=4,phase=renamed,mode=kill"

makes rank 3 fail at the start of step 3 (step=setup: while the Trainer is built), or rank 0 fail
inside the checkpoint save of step 4 at one of the phases checkpoint.io.save_checkpoint reports
(SAVE_PHASES: "tensors" once this rank's tensors are written, "renamed" once the step directory is
published but before `latest` moves, "pruning" once an old checkpoint is renamed for deletion).
`train_main` asks `fault_from_env(rank)` once; it is None unless the variable targets this rank,
and then `at_setup()` runs inside the failure guard, `before_step` is one of the Trainer's step
hooks and `during_save` one of its save hooks. Nothing here replaces a method: without the
variable no code path changes.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Mapping

FAULT_ENV = "MEGALITE_FAULT_INJECT"
FAULT_MODES = ("raise", "exit", "kill", "hang", "term")
SAVE_PHASES = ("tensors", "renamed", "pruning")


class InjectedFault(RuntimeError):
    """Raised by an injected fault of mode 'raise'."""


def parse_fault(spec: str) -> dict:
    """'rank=3,step=3,mode=raise' -> {'rank': 3, 'step': 3, 'mode': 'raise'}; step=setup stays 'setup'."""
    try:
        fields = dict(item.split("=", 1) for item in spec.split(",") if item.strip())
        step = fields.pop("step").strip()
        out = {"rank": int(fields.pop("rank")), "step": step if step == "setup" else int(step),
               "mode": fields.pop("mode", "raise"), "phase": fields.pop("phase", None)}
    except (KeyError, ValueError):
        raise ValueError(f"{FAULT_ENV}={spec!r} must look like 'rank=3,step=3,mode=raise' "
                         "(step=setup: while the Trainer is built; phase=P: inside step 3's save)") from None
    if fields or out["mode"] not in FAULT_MODES or out["phase"] not in (None, *SAVE_PHASES):
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown keys {sorted(fields)}, mode not in {FAULT_MODES} or "
                         f"phase not in {SAVE_PHASES}")
    return out


@dataclass(frozen=True)
class Fault:
    """One rank's planned failure: at `step` (an int, or 'setup'), or inside that step's save at `phase`,
    in `mode` (see `strike`)."""

    step: int | str
    mode: str
    spec: str
    phase: str | None = None

    def at_setup(self) -> None:
        """Fail now if the fault is planned for setup (call it where the Trainer is built)."""
        if self.step == "setup":
            strike(self.mode, f"injected fault during setup ({FAULT_ENV}={self.spec})")

    def before_step(self, step: int) -> None:
        """A Trainer step hook: fail at the start of the planned step."""
        if self.step == step and self.phase is None:
            strike(self.mode, f"injected fault at step {step} ({FAULT_ENV}={self.spec})")

    def during_save(self, step: int, phase: str) -> None:
        """A Trainer save hook: fail at the planned phase of the planned step's save."""
        if self.step == step and self.phase == phase:
            strike(self.mode, f"injected fault while saving step {step}, phase {phase} ({FAULT_ENV}={self.spec})")


def fault_from_env(rank: int, environ: Mapping[str, str] | None = None) -> Fault | None:
    """The fault MEGALITE_FAULT_INJECT plans for `rank`, or None."""
    spec = (os.environ if environ is None else environ).get(FAULT_ENV)
    if not spec:
        return None
    fault = parse_fault(spec)
    return Fault(fault["step"], fault["mode"], spec, fault["phase"]) if fault["rank"] == rank else None


def strike(mode: str, message: str) -> None:
    """raise: an exception (a record is written); exit: os._exit(1) at once (no record);
    kill: SIGKILL to itself; hang: sleep forever (exercises timeouts and stack dumps);
    term: SIGTERM to itself, as a scheduler's preemption would send, and carry on (the run stops cleanly)."""
    if mode == "raise":
        raise InjectedFault(message)
    if mode == "exit":
        os._exit(1)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    while True:
        time.sleep(1)
