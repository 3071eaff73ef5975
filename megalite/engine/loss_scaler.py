"""Loss scaling for fp16, and the same non-finite check for every precision.

fp16 gradients underflow unless the loss is multiplied up before backward;
the scale is then divided out of the gradients before clipping and the
optimizer step. `DynamicLossScaler` searches for the largest safe scale the
way Megatron and DeepSpeed do: an overflow (inf/nan in any gradient on any
rank) skips the step and, once `hysteresis` overflows have been seen, halves
the scale; `window` consecutive clean steps double it.

`ConstantScaler` (fp32/bf16) never scales but still reports non-finite
gradients so the engine can skip a poisoned step instead of applying it.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def _groups(group) -> list:
    """None, one process group, or several -> the groups that need a collective."""
    if group is None:
        return []
    groups = list(group) if isinstance(group, (list, tuple)) else [group]
    return [g for g in groups if g is not None and dist.get_world_size(g) > 1]


def any_non_finite(params: Iterable[torch.Tensor], group=None) -> bool:
    """True when any gradient of `params` holds inf or nan on this rank or any rank of `group`.

    `group` is None (this rank only), a ProcessGroup, or a list of them; the
    flag is all-reduced with MAX over each so every rank takes the same
    decision (a rank that skipped alone would desynchronise the replicas).
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    if grads and all(g.dtype == torch.float32 for g in grads):
        # an inf or nan anywhere makes the norm inf or nan: one foreach pass over every gradient
        # instead of an isfinite + any per tensor (fp32 only: a 16-bit norm could overflow on
        # finite gradients)
        flag = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()
    else:  # one flag per tensor, reduced on device: a single host sync instead of one per tensor
        flags = [(~torch.isfinite(g)).any() for g in grads]
        flag = torch.stack(flags).any().float() if flags else torch.zeros((), device=device)
    for g in _groups(group):
        if flag.device.type == "cpu" and dist.get_backend(g) == "nccl":
            flag = flag.cuda()
        flag = flag.reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=g)
    return bool(flag.item())


class ConstantScaler:
    """No scaling (scale 1) for fp32 and bf16; still detects non-finite gradients."""

    loss_scale = 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss unchanged."""
        return loss

    def found_inf(self, params: Iterable[torch.Tensor], group=None) -> bool:
        """True when any gradient is inf/nan on any rank of `group` (see `any_non_finite`)."""
        return any_non_finite(params, group)

    def unscale(self, params: Iterable[torch.Tensor]) -> None:
        """Nothing to undo at scale 1."""

    def update(self, found_inf: bool) -> bool:
        """Returns True when the step must be skipped (non-finite gradients)."""
        return bool(found_inf)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore; an fp16 run's scale is dropped when resuming in fp32/bf16."""


class DynamicLossScaler(ConstantScaler):
    """fp16 dynamic loss scale: halve on overflow (after `hysteresis` of them), double after `window` clean steps."""

    def __init__(self, initial_scale: float = 2.0**16, window: int = 1000, min_scale: float = 1.0,
                 hysteresis: int = 2):
        if initial_scale <= 0 or min_scale <= 0 or initial_scale < min_scale:
            raise ValueError(f"loss scales must be positive with initial_scale >= min_scale; got "
                             f"initial_scale={initial_scale}, min_scale={min_scale}")
        if window < 1 or hysteresis < 1:
            raise ValueError(f"loss_scale_window={window} and hysteresis={hysteresis} must both be >= 1")
        self.loss_scale = float(initial_scale)
        self.window, self.min_scale, self.hysteresis = window, float(min_scale), hysteresis
        self.clean_steps = 0  # consecutive steps without overflow
        self.hysteresis_left = hysteresis  # overflows still tolerated before the scale drops

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """loss * current scale (call backward on the result)."""
        return loss * self.loss_scale

    def unscale(self, params: Iterable[torch.Tensor]) -> None:
        """Divide the scale out of every gradient, in place."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.loss_scale)

    def update(self, found_inf: bool) -> bool:
        """Adjust the scale after a step; returns True when the step must be skipped."""
        if found_inf:
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.loss_scale = max(self.loss_scale / 2.0, self.min_scale)
            return True
        self.clean_steps += 1
        if self.clean_steps >= self.window:
            # a full clean window: the scale is safely below overflow, try twice as large
            self.clean_steps = 0
            self.hysteresis_left = self.hysteresis
            self.loss_scale *= 2.0
        return False

    def state_dict(self) -> dict:
        return {"loss_scale": self.loss_scale, "clean_steps": self.clean_steps,
                "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        """Restore scale and counters; window/min/hysteresis come from the current config.

        An empty state (a run resumed in fp16 from an fp32/bf16 checkpoint) keeps the initial scale.
        """
        if not state:
            return
        missing = {"loss_scale", "clean_steps", "hysteresis_left"} - set(state)
        if missing:
            raise KeyError(f"dynamic loss scaler state lacks {sorted(missing)}; was the checkpoint "
                           "written with a precision other than fp16?")
        self.loss_scale = float(state["loss_scale"])
        self.clean_steps = int(state["clean_steps"])
        self.hysteresis_left = int(state["hysteresis_left"])


def build_scaler(precision: str, initial_scale: float, window: int, min_scale: float,
                 hysteresis: int = 2) -> ConstantScaler:
    """DynamicLossScaler for 'fp16', ConstantScaler for 'fp32'/'bf16'."""
    if precision == "fp16":
        return DynamicLossScaler(initial_scale, window, min_scale, hysteresis)
    if precision in ("fp32", "bf16"):
        return ConstantScaler()
    raise ValueError(f"train.precision={precision!r} is not one of 'fp32', 'bf16', 'fp16'")
