"""train.rampup_batch_size: the global batch grows from START by INCR over the first SAMPLES samples.

Megatron-LM's `--rampup-batch-size START INCR SAMPLES`, with its rule: the ramp has
(global_batch_size - START) / INCR increments, each lasting SAMPLES / increments consumed samples;
while `consumed` samples have been read, a step's global batch is
    START + floor(consumed / (SAMPLES / increments)) * INCR,   global_batch_size once consumed > SAMPLES.
The batch depends on samples consumed alone, so the order of samples, which does not depend on
batch sizes (megalite.data.sampler), stays what it is, and a resumed run picks up the same sizes.
"""
from __future__ import annotations


def parse_rampup(values: list, global_batch_size: int) -> tuple[int, int, int] | None:
    """(START, INCR, SAMPLES) of train.rampup_batch_size, or None when empty; ValueError names a bad value."""
    if not values:
        return None
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"train.rampup_batch_size={values!r} must be three integers [START, INCR, SAMPLES] "
                         "(Megatron's --rampup-batch-size), e.g. [32, 32, 1000000]")
    start, incr, samples = values
    if not (0 < start < global_batch_size and incr > 0 and samples > 0):
        raise ValueError(f"train.rampup_batch_size={values!r}: need 0 < START < train.global_batch_size="
                         f"{global_batch_size}, INCR > 0 and SAMPLES > 0 (no ramp: leave it [])")
    if (global_batch_size - start) % incr:
        raise ValueError(f"train.rampup_batch_size={values!r}: train.global_batch_size - START = "
                         f"{global_batch_size - start} must be divisible by INCR={incr}")
    return start, incr, samples


def batch_size_at(consumed: int, rampup: tuple[int, int, int] | None, global_batch_size: int) -> int:
    """The global batch of the step that starts after `consumed` samples (see the module docstring)."""
    if rampup is None:
        return global_batch_size
    start, incr, samples = rampup
    if consumed > samples:
        return global_batch_size
    per_increment = samples / ((global_batch_size - start) // incr)
    return min(start + int(consumed / per_increment) * incr, global_batch_size)


def ramp_sizes(rampup: tuple[int, int, int] | None, global_batch_size: int) -> list[int]:
    """Every global batch the ramp can use, the full one last."""
    if rampup is None:
        return [global_batch_size]
    start, incr, _ = rampup
    return list(range(start, global_batch_size + 1, incr))
