"""Which samples each data-parallel rank reads, in which micro-batches.

The run's sample order is fixed: sample k of the run is dataset[k], whatever
the dp degree or micro-batch size. Global batch g is samples
[g*GB, (g+1)*GB); dp rank r reads the contiguous slice
[g*GB + r*GB/dp, g*GB + (r+1)*GB/dp) of it, in micro-batches of `mbs` samples.
So changing dp or mbs regroups the same samples, and a resumed run continues
from `consumed_samples` with nothing repeated and nothing skipped.
"""
from __future__ import annotations

import numbers


class DistributedBatchSampler:
    """Yields one list of sample indices per micro-batch for data-parallel rank `dp_rank`.

    `consumed_samples` (all ranks together) says where a resumed run starts; it
    must fall on a micro-step boundary, i.e. be a multiple of
    micro_batch_size * dp_size. A trailing partial global batch is never read.
    """

    def __init__(self, total_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0, first_sample: int = 0):
        for name, value, low in (("total_samples", total_samples, 0), ("global_batch_size", global_batch_size, 1),
                                 ("micro_batch_size", micro_batch_size, 1), ("dp_size", dp_size, 1),
                                 ("dp_rank", dp_rank, 0), ("consumed_samples", consumed_samples, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if not dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be < dp_size={dp_size}")
        step = micro_batch_size * dp_size
        if global_batch_size % step:
            raise ValueError(f"global_batch_size={global_batch_size} must be divisible by micro_batch_size * "
                             f"dp_size = {micro_batch_size}*{dp_size} = {step}; pick a global batch that is a "
                             f"multiple of {step}")
        if consumed_samples % step:
            raise ValueError(f"consumed_samples={consumed_samples} must be a multiple of micro_batch_size * "
                             f"dp_size = {step} (whole micro-steps); it should come from a checkpoint of a run "
                             "with the same batch sizes")
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} exceeds the dataset's {total_samples} samples; "
                             "the dataset was built for a shorter run")
        if not 0 <= first_sample <= total_samples:
            raise ValueError(f"first_sample={first_sample} must lie in [0, total_samples={total_samples}]")
        # first_sample: global batches are counted from there (a batch-size ramp changes size mid-run)
        self.first_sample = int(first_sample)
        total_samples -= self.first_sample
        self.total_samples, self.consumed_samples = int(total_samples), int(consumed_samples)
        self.global_batch_size, self.micro_batch_size = int(global_batch_size), int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.per_rank = global_batch_size // dp_size
        self.micro_per_rank = self.per_rank // micro_batch_size
        self.num_global_batches = total_samples // global_batch_size

    def _start(self) -> tuple[int, int]:
        """(global batch, micro-batch inside it) where this rank resumes."""
        g, within = divmod(self.consumed_samples, self.global_batch_size)
        return g, within // (self.micro_batch_size * self.dp_size)

    def __len__(self) -> int:
        g, j = self._start()
        return max(0, (self.num_global_batches - g) * self.micro_per_rank - j)

    def __iter__(self):
        g0, j0 = self._start()
        mbs = self.micro_batch_size
        for g in range(g0, self.num_global_batches):
            base = self.first_sample + g * self.global_batch_size + self.dp_rank * self.per_rank
            for j in range(j0 if g == g0 else 0, self.micro_per_rank):
                yield list(range(base + j * mbs, base + (j + 1) * mbs))
