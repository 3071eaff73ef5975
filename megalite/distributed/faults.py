"""Faults on purpose, for the failure tests: an explicit hook the launch and the Trainer call.

    MEGALITE_FAULT_INJECT="rank=3,step=3,mode=raise|exit|kill|hang"

makes rank 3 fail at the start of step 3 (step=setup: while the Trainer is built). `train_main`
asks `fault_from_env(rank)` once; it is None unless the variable targets this rank, and then
`at_setup()` runs inside the failure guard and `before_step` is one of the Trainer's step hooks.
Nothing here replaces a method: without the variable no code path changes.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Mapping

FAULT_ENV = "MEGALITE_FAULT_INJECT"
FAULT_MODES = ("raise", "exit", "kill", "hang")


class InjectedFault(RuntimeError):
    """Raised by an injected fault of mode 'raise'."""


def parse_fault(spec: str) -> dict:
    """'rank=3,step=3,mode=raise' -> {'rank': 3, 'step': 3, 'mode': 'raise'}; step=setup stays 'setup'."""
    try:
        fields = dict(item.split("=", 1) for item in spec.split(",") if item.strip())
        step = fields.pop("step").strip()
        out = {"rank": int(fields.pop("rank")), "step": step if step == "setup" else int(step),
               "mode": fields.pop("mode", "raise")}
    except (KeyError, ValueError):
        raise ValueError(f"{FAULT_ENV}={spec!r} must look like 'rank=3,step=3,mode=raise' "
                         "(step=setup: while the Trainer is built)") from None
    if fields or out["mode"] not in FAULT_MODES:
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown keys {sorted(fields)} or mode not in {FAULT_MODES}")
    return out


@dataclass(frozen=True)
class Fault:
    """One rank's planned failure: at `step` (an int, or 'setup'), in `mode` (see `strike`)."""

    step: int | str
    mode: str
    spec: str

    def at_setup(self) -> None:
        """Fail now if the fault is planned for setup (call it where the Trainer is built)."""
        if self.step == "setup":
            strike(self.mode, f"injected fault during setup ({FAULT_ENV}={self.spec})")

    def before_step(self, step: int) -> None:
        """A Trainer step hook: fail at the start of the planned step."""
        if self.step == step:
            strike(self.mode, f"injected fault at step {step} ({FAULT_ENV}={self.spec})")


def fault_from_env(rank: int, environ: Mapping[str, str] | None = None) -> Fault | None:
    """The fault MEGALITE_FAULT_INJECT plans for `rank`, or None."""
    spec = (os.environ if environ is None else environ).get(FAULT_ENV)
    if not spec:
        return None
    fault = parse_fault(spec)
    return Fault(fault["step"], fault["mode"], spec) if fault["rank"] == rank else None


def strike(mode: str, message: str) -> None:
    """raise: an exception (a record is written); exit: os._exit(1) at once (no record);
    kill: SIGKILL to itself; hang: sleep forever (exercises timeouts and stack dumps)."""
    if mode == "raise":
        raise InjectedFault(message)
    if mode == "exit":
        os._exit(1)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(1)
