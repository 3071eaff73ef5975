"""train.skip_samples: the sample ranges of the training order a run never trains on (megalite.stability)."""
from __future__ import annotations


def parse_skip_samples(texts: list[str], global_batch_size: int) -> list[tuple[int, int]]:
    """train.skip_samples ['START:END', ...] as sorted (start, end) sample ranges; ValueError names a bad one."""
    out = []
    for text in texts:
        start, colon, end = str(text).partition(":")
        try:
            a, b = int(start), int(end)
        except ValueError:
            a = b = -1
        if not colon or a < 0 or b <= a:
            raise ValueError(f"train.skip_samples entry {text!r} must be 'START:END' sample indices with "
                             "0 <= START < END, e.g. '4096:8192'")
        if a % global_batch_size or b % global_batch_size:
            raise ValueError(f"train.skip_samples entry {text!r}: START and END must be multiples of "
                             f"train.global_batch_size={global_batch_size} (a step reads whole global batches)")
        out.append((a, b))
    return sorted(out)
