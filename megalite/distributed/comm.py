"""Communication accounting: bytes handed to each kind of collective, per process group, per step.

Every collective megalite issues itself calls `record(kind, tensor, group)`
when its group has more than one rank; `take_comm_bytes()` returns the totals
since the last call and resets them, so the trainer reports one step's
traffic per row (metrics `comm_<group>_<kind>_bytes`). The groups:

    tp          tensor-parallel activations (mappings), the vocab-parallel loss's
                [s, b] all-reduces, sequence-parallel norm-gradient sums
    dp          the native engine's gradient all-reduce (DeepSpeed's ZeRO
                traffic happens inside DeepSpeed and is not counted)
    pp          pipeline point-to-point sends (activations forward, gradients backward)
    embedding   the tied-embedding gradient sum between the first and last stage
    cp          ring attention's k/v (and doc id) blocks and its dk/dv accumulators, sent to the
                next cp rank (kernels.ring_attention.training_bytes_per_rank per layer)
    ep          MoE token dispatch and combine (all_to_all), forward and backward

tp counters are always reported (zero without tp); the others appear once
this process has recorded them.

What "bytes" means here: the PAYLOAD of the collective on this rank, i.e.
the size (numel * element size) of the full, unsharded tensor it operates on:

    all_reduce       the tensor being summed                   e.g. [s, b, h]
    all_gather       the gathered OUTPUT (all ranks' chunks)   e.g. [s, b, h] from [s/tp, b, h]
    reduce_scatter   the INPUT before scattering               e.g. [s, b, h] to [s/tp, b, h]
    send             the tensor sent                           e.g. [s, b, h] to the next stage
    all_to_all       the INPUT (every rank's share, own included)  e.g. the routed tokens [m, h]

So for one transformer layer without sequence parallelism the tp count is
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

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "send", "all_to_all")
GROUPS = ("tp", "dp", "pp", "embedding", "cp", "ep")
ALWAYS = ("tp_all_reduce", "tp_all_gather", "tp_reduce_scatter")  # reported even when zero

_bytes: dict[str, int] = dict.fromkeys(ALWAYS, 0)


def record(kind: str, tensor: torch.Tensor, group: str = "tp") -> None:
    """Add `tensor`'s payload (numel * element size) to the counter of `group`'s `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; use one of {KINDS}")
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; use one of {GROUPS}")
    key = f"{group}_{kind}"
    _bytes[key] = _bytes.get(key, 0) + tensor.numel() * tensor.element_size()


def take_comm_bytes() -> dict[str, int]:
    """Payload bytes per '<group>_<kind>' since the previous call, then reset (keys stay, at zero)."""
    out = dict(_bytes)
    for key in _bytes:
        _bytes[key] = 0
    return out


def wire_bytes(kind: str, payload: int, world: int) -> float:
    """Bytes a ring implementation sends per rank for `payload` bytes of `kind` over `world` ranks.

    all_reduce: 2 (n-1)/n * payload; all_gather, reduce_scatter and (even) all_to_all: (n-1)/n * payload;
    send: payload.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; use one of {KINDS}")
    if world < 1:
        raise ValueError(f"world={world} must be >= 1")
    if kind == "send":
        return float(payload)
    if kind == "all_to_all":  # evenly split: all but one's own share leaves
        return (world - 1) / world * payload
    share = (world - 1) / world * payload
    return 2 * share if kind == "all_reduce" else share


def wait(*works) -> None:
    """Wait for asynchronous works (None entries skipped). Every wait megalite does on a collective or a
    point-to-point work goes through here, so a watchdog that sees this frame in a stalled thread's
    stack knows the rank is waiting on its peers, not stuck in its own compute."""
    for work in works:
        if work is not None:
            work.wait()
