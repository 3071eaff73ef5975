"""Sequence-length warm-up: data.seq_len_schedule, a curriculum on the training sequence length.

Each entry is "STEP:LEN": from step STEP (counted from 1) on, training sequences are LEN tokens
long, until the next entry's step; steps before the first entry and every step without a
schedule use data.seq_len. LEN must divide data.seq_len and grow (or stay) from entry to entry.

Tokens per step stay constant and the sample order is untouched: each sample of data.seq_len
tokens is cut into data.seq_len / LEN consecutive sequences of LEN tokens (each predicting its
own next tokens), so a micro-batch of b samples becomes b * data.seq_len / LEN sequences. The
order is therefore that of the run without warm-up: deterministic, resumable at any step and
independent of dp (megalite.data.seq_warmup cuts the batches).
"""
from __future__ import annotations


def parse_seq_len_schedule(entries: list[str], seq_len: int) -> list[tuple[int, int]]:
    """[(step, length)] of data.seq_len_schedule, checked; ValueError naming the entry and the fix."""
    out: list[tuple[int, int]] = []
    for entry in entries:
        step, sep, length = str(entry).partition(":")
        if not sep or not step.strip().isdigit() or not length.strip().isdigit():
            hint = (" (YAML 1.1 reads an unquoted 1:512 as the base-60 number 572: quote each entry)"
                    if str(entry).strip().isdigit() else "")
            raise ValueError(f"data.seq_len_schedule entry {entry!r} is not STEP:LEN (e.g. '1:512'){hint}")
        step, length = int(step), int(length)
        if step < 1 or length < 1 or seq_len % length:
            raise ValueError(f"data.seq_len_schedule entry {entry!r}: the step must be >= 1 and the length a "
                             f"divisor of data.seq_len={seq_len} (samples are cut into whole sequences)")
        if out and (step <= out[-1][0] or length < out[-1][1]):
            raise ValueError(f"data.seq_len_schedule entry {entry!r} follows {out[-1][0]}:{out[-1][1]}: steps must "
                             "increase and lengths must not shrink")
        out.append((step, length))
    return out


def seq_len_at(entries: list[str], seq_len: int, step: int) -> int:
    """The training sequence length of step `step` (from 1) under data.seq_len_schedule `entries`."""
    length = seq_len
    for start, value in parse_seq_len_schedule(entries, seq_len):
        if step >= start:
            length = value
    return length
