"""Loss and grad-norm spikes: detection, agreement between ranks, and the data ranges a run skips.

A spike is a value far above the recent ones: with m the median and MAD the median absolute
deviation of the last `train.stability_window` accepted values of a metric, a value v is a spike
when v > m + threshold * 1.4826 * MAD (1.4826 * MAD estimates a normal distribution's sigma, so the
threshold reads as a z-score that outliers do not inflate, as a mean and standard deviation would).
A non-finite value is always one. Only rises count: a falling loss is progress. Detection starts
once `train.stability_min_history` values are in the window, and a spiking value does not enter it.

Every rank sees the same loss (averaged over dp, broadcast over pp) and the same global grad norm,
so the detectors agree by construction; `agree` still takes the world-wide maximum of the verdict
(one all-reduce of one float per step) so that no rank can act alone on a value that differs in its
last bit.

The response (`train.stability_action`): 'log' prints the spike; 'skip' drops the step's update
(loss spikes, seen before the optimizer step; a grad-norm spike is seen inside it, so it is logged);
'rollback' reloads the latest checkpoint, records the samples read since it as skipped and
continues after them (megalite.train). The skipped ranges are sample indices [start, end) of the
training order, multiples of the global batch: they do not depend on dp, and a checkpoint carries
them so a resumed run skips them too.
"""
from __future__ import annotations

import math
import statistics
from collections import deque

import torch
import torch.distributed as dist

from megalite.config.skip_samples import parse_skip_samples

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD * this estimates sigma for normal data


class SpikeDetector:
    """Rolling median / MAD test of each metric against its last `window` accepted values."""

    def __init__(self, window: int, threshold: float, min_history: int):
        self.threshold, self.min_history = threshold, min_history
        self.window = window
        self.history: dict[str, deque] = {}

    def is_spike(self, name: str, value: float) -> bool:
        """Whether `value` of metric `name` is a spike against the window (see the module docstring)."""
        if not math.isfinite(value):
            return True
        past = [v for _, v in self.history.get(name, ())]
        if len(past) < self.min_history:
            return False
        median = statistics.median(past)
        spread = MAD_TO_SIGMA * statistics.median(abs(v - median) for v in past)
        # a flat window (MAD 0) would call any rise a spike: the spread is at least 1% of the median
        spread = max(spread, 0.01 * abs(median))
        return value > median + self.threshold * spread

    def accept(self, step: int, name: str, value: float) -> None:
        """Add a value that was not a spike to its metric's window."""
        self.history.setdefault(name, deque(maxlen=self.window)).append((step, value))

    def forget_after(self, step: int) -> None:
        """Drop the values of steps after `step` (a rollback to that step's checkpoint re-runs them)."""
        for name, past in self.history.items():
            self.history[name] = deque(((s, v) for s, v in past if s <= step), maxlen=self.window)


def agree(flag: bool, device: torch.device) -> bool:
    """`flag` or-ed over every rank of the world (one all-reduce of one float)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def skip_ahead(position: int, ranges: list[tuple[int, int]]) -> int:
    """The first sample position at or after `position` outside every skipped range."""
    for start, end in sorted(ranges):
        if start <= position < end:
            position = end
    return position


def skipped_total(ranges: list[tuple[int, int]]) -> int:
    """Samples the ranges cover (overlaps counted once)."""
    total, reach = 0, 0
    for start, end in sorted(ranges):
        start = max(start, reach)
        if end > start:
            total += end - start
        reach = max(reach, end)
    return total


ACTIONS = ("off", "log", "skip", "rollback")


class Stability:
    """A run's spike policy (train.stability_*) and the sample ranges it skips (train.skip_samples and
    those its rollbacks recorded)."""

    def __init__(self, train_cfg, log=print):
        t = train_cfg
        self.action, self.max_rollbacks, self.log = t.stability_action, t.stability_max_rollbacks, log
        self.detector = SpikeDetector(t.stability_window, t.stability_threshold, t.stability_min_history)
        self.ranges = parse_skip_samples(t.skip_samples, t.global_batch_size)
        self.rollbacks = 0

    def loss_before_update(self, step: int, loss: float, device) -> bool:
        """'skip': whether step `step`'s update must be dropped for its loss (every rank agrees)."""
        spike = agree(self.detector.is_spike("loss", loss), device)
        if spike:
            self.log(f"step {step}: loss {loss:.4g} is a spike against the last "
                     f"{len(self.detector.history.get('loss', ()))} steps; its update is skipped")
        else:
            self.detector.accept(step, "loss", loss)
        return spike

    def after_update(self, step: int, values: dict[str, float], device, world: bool = True) -> str | None:
        """What spiked at step `step` among `values` ('loss 9.1 (median 3.2)'), or None; with `world`, only
        when every rank's verdict agrees (one all-reduce). The values that did not spike join the windows."""
        spiked = {k: v for k, v in values.items() if self.detector.is_spike(k, v)}
        if not (agree(bool(spiked), device) if world else spiked):
            for name, value in values.items():
                self.detector.accept(step, name, value)
            return None
        return ", ".join(f"{k} {v:.4g} (median {_median(self.detector, k)})" for k, v in spiked.items()) or \
            "a value on another rank"

    def record_skip(self, start: int, end: int) -> None:
        if end > start:
            self.ranges = sorted([*self.ranges, (start, end)])


def _median(detector: SpikeDetector, name: str) -> str:
    past = [v for _, v in detector.history.get(name, ())]
    return f"{statistics.median(past):.4g}" if past else "none yet"
