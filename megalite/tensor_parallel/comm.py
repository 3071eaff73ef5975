"""Communication accounting: bytes handed to each kind of tensor-parallel collective.

Every collective in `mappings` calls `record(kind, tensor)` when its group
has more than one rank; `take_comm_bytes()` returns the totals since the last
call and resets them, so the trainer reports one step's traffic per row.

What "bytes" means here: the PAYLOAD of the collective on this rank, i.e.
the size (numel * element size) of the full, unsharded tensor it operates on:

    all_reduce       the tensor being summed                   e.g. [s, b, h]
    all_gather       the gathered OUTPUT (all ranks' chunks)   e.g. [s, b, h] from [s/tp, b, h]
    reduce_scatter   the INPUT before scattering               e.g. [s, b, h] to [s/tp, b, h]

So for one transformer layer without sequence parallelism the count is
4 * s*b*h*elem_size of all_reduce (two forward, two backward); with
sequence parallelism it is 4 * s*b*h*elem_size of all_gather plus the same
of reduce_scatter. Payload is not what crosses the wire: `wire_bytes`
converts it to what a ring algorithm sends per rank (an all-reduce is a
reduce-scatter followed by an all-gather, so both layouts move the same
volume). Counting is per process and not thread-safe; a backend that
emulates a collective (gloo's reduce-scatter as all-reduce + split) is still
counted as the collective it stands for.
"""
from __future__ import annotations

import torch

KINDS = ("all_reduce", "all_gather", "reduce_scatter")

_bytes: dict[str, int] = dict.fromkeys(KINDS, 0)


def record(kind: str, tensor: torch.Tensor) -> None:
    """Add `tensor`'s payload (numel * element size) to the counter of `kind`."""
    if kind not in _bytes:
        raise ValueError(f"unknown collective kind {kind!r}; use one of {KINDS}")
    _bytes[kind] += tensor.numel() * tensor.element_size()


def take_comm_bytes() -> dict[str, int]:
    """Payload bytes per collective kind since the previous call (every kind present), then reset."""
    out = dict(_bytes)
    for kind in _bytes:
        _bytes[kind] = 0
    return out


def wire_bytes(kind: str, payload: int, world: int) -> float:
    """Bytes a ring implementation sends per rank for `payload` bytes of `kind` over `world` ranks.

    all_reduce: 2 (n-1)/n * payload; all_gather and reduce_scatter: (n-1)/n * payload.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; use one of {KINDS}")
    if world < 1:
        raise ValueError(f"world={world} must be >= 1")
    share = (world - 1) / world * payload
    return 2 * share if kind == "all_reduce" else share
