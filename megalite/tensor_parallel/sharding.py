"""One record per parameter: how it is laid out over the parallel ranks and what its gradient needs.

The layer that creates a parameter marks it (`mark`); the gradient policy of both engines
(megalite.engine.gradients), the DeepSpeed adapter and checkpoint/ read it (`sharding_of`), and
`shard_metadata` turns a model's records into the JSON a checkpoint keeps, so that full tensors
can be rebuilt without building the model. No other parallel-layout attribute lives on a
parameter (DeepSpeed's own names are set from this record in megalite/engine/deepspeed.py).

A plain concatenation along `partition_dim` rebuilds every full weight megalite makes, because
each rank's shard is a contiguous chunk (`init.init_shard_` takes `full.chunk(tp)[rank]`),
including the fused layouts in model/blocks.py: QKV rows are whole kv-group slabs and a rank owns
consecutive slabs; SwiGLU's fc1 rows alternate (gate_i, up_i), so a contiguous chunk holds whole
pairs; row-parallel weights split their input columns, this rank's heads or ffn channels.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

_ATTRIBUTE = "megalite_sharding"


@dataclass(frozen=True)
class Sharding:
    """The layout of one parameter.

    partition_dim: the dim split over the tp group (each rank a contiguous chunk); None: every tp
        rank holds the whole tensor.
    sequence_parallel: under sequence parallelism each tp rank sees its own chunk of the sequence,
        so this replicated parameter's gradient is a partial sum, summed over tp before the step.
    valid_rows: vocabulary tables are padded to a tp-dependent row count; rows past this are padding.
    pipeline_copy: the last pipeline stage's copy of a tied token table; its gradient is summed with
        the first stage's, and the global grad norm counts only the first stage's copy.
    expert_parallel: an MoE layer's experts, sharded along dim 0 over the expert-parallel group: the
        gradient is averaged over the ranks holding the same experts (not dp x cp), and the grad norm
        sums its square over the ep group.
    """

    partition_dim: int | None = None
    sequence_parallel: bool = False
    valid_rows: int | None = None
    pipeline_copy: bool = False
    expert_parallel: bool = False


REPLICATED = Sharding()


def sharding_of(tensor) -> Sharding:
    """The record `mark` left on `tensor` (REPLICATED when there is none)."""
    return getattr(tensor, _ATTRIBUTE, REPLICATED)


def mark(tensor, **fields) -> None:
    """Set fields of `tensor`'s record (the others keep their values)."""
    setattr(tensor, _ATTRIBUTE, replace(sharding_of(tensor), **fields))


def in_grad_norm(tensor, tp_rank: int) -> bool:
    """Whether this rank's copy of `tensor` counts in the global gradient norm: shards on every tp rank,
    replicated tensors on tp rank 0 only, a pipeline copy of a tied table never (its twin counts)."""
    s = sharding_of(tensor)
    return (tp_rank == 0 or s.partition_dim is not None) and not s.pipeline_copy


def shard_metadata(model: nn.Module, tp_size: int) -> dict:
    """name -> {"partition_dim": int | None, "full_shape": [...], "tp_size": n[, "valid_rows": v]
    [, "expert_parallel": True]}.

    Covers every entry of `model.state_dict()` (tied weights appear under each of their names, as
    in the state dict); plain JSON-able data, so it goes into the checkpoint state as is.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size={tp_size} must be >= 1")
    meta = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        s = sharding_of(tensor)
        shape = list(tensor.shape)
        if s.partition_dim is not None:
            shape[s.partition_dim] *= tp_size
        entry = {"partition_dim": s.partition_dim, "full_shape": shape, "tp_size": tp_size}
        if s.valid_rows is not None:
            entry["valid_rows"] = int(s.valid_rows)
        if s.expert_parallel:  # full_shape[0] is this rank's experts; the ep ranks' join along dim 0
            entry["expert_parallel"] = True
        meta[name] = entry
    return meta
