"""What each tensor-parallel rank's checkpoint shard is a piece of, and how to put the pieces together.

Every rank saves its own model state (io.save_checkpoint). `shard_metadata`
records, per state_dict entry, the dim it is split along and its full shape,
so the full tensors can be rebuilt without building the model:
`assemble_full_state` concatenates the tp ranks' shards along that dim.

A plain concatenation is exact for every layer megalite builds because each
rank's shard is a contiguous chunk of the full weight (`init.init_shard_`
takes `full.chunk(tp)[rank]`), including the fused layouts in model/blocks.py:
QKV rows are whole kv-group slabs [q heads of the group, k, v] and a rank owns
consecutive slabs; SwiGLU's fc1 rows alternate (gate_i, up_i), so any
contiguous chunk holds whole pairs; row-parallel weights split their input
columns, which are this rank's consecutive heads / ffn channels.

Vocabulary tables are padded to a multiple of pad_vocab_to * tp, so the
padding depends on tp; their metadata carries `valid_rows` (the real
vocabulary) and `assemble_full_state(..., strip_padding=True)` drops the rest.
"""
from __future__ import annotations

import torch
from torch import nn

from megalite.tensor_parallel.mappings import group_size


def shard_metadata(model: nn.Module, tp_size: int | None = None) -> dict:
    """name -> {"partition_dim": int | None, "full_shape": [...], "tp_size": n[, "valid_rows": v]}.

    Covers every entry of `model.state_dict()` (tied weights appear under
    each of their names, as in the state dict). `tp_size` defaults to the
    size of `model.tp_group`. The result is plain JSON-able data, so it can
    go into the checkpoint state as is.
    """
    if tp_size is None:
        tp_size = group_size(getattr(model, "tp_group", None))
    if tp_size < 1:
        raise ValueError(f"tp_size={tp_size} must be >= 1")
    meta = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        dim = getattr(tensor, "partition_dim", None) if getattr(tensor, "tensor_model_parallel", False) else None
        shape = list(tensor.shape)
        if dim is not None:
            shape[dim] *= tp_size
        entry = {"partition_dim": dim, "full_shape": shape, "tp_size": tp_size}
        if getattr(tensor, "valid_rows", None) is not None:
            entry["valid_rows"] = int(tensor.valid_rows)
        meta[name] = entry
    return meta


def _assemble_one(name: str, shards: list[torch.Tensor], entry: dict) -> torch.Tensor:
    dim, full_shape = entry["partition_dim"], list(entry["full_shape"])
    if dim is None:
        for rank, shard in enumerate(shards[1:], start=1):
            if not torch.equal(shard, shards[0]):
                raise ValueError(f"'{name}' is replicated across tp ranks but rank {rank} differs from rank 0; "
                                 "the checkpoint's replicas diverged (were sequence-parallel grads reduced?)")
        full = shards[0]
    else:
        full = torch.cat(shards, dim=dim)
    if list(full.shape) != full_shape:
        raise ValueError(f"'{name}': assembled shape {list(full.shape)} != recorded full shape {full_shape}; "
                         "are the rank states in tp-rank order and from the same checkpoint?")
    return full


def assemble_full_state(rank_states: list[dict], metadata: dict, strip_padding: bool = False) -> dict:
    """Full (unsharded) tensors, name -> tensor, from the model states of every tp rank.

    `rank_states[r]` is tp rank r's model state_dict (one pipeline stage and
    one data-parallel replica); `metadata` is `shard_metadata` of that model.
    Sharded entries are concatenated along their partition dim; replicated
    ones are checked equal on every rank and taken once. With
    `strip_padding`, vocabulary tables keep only their `valid_rows` real
    rows, which makes the result independent of the tp size.
    """
    if not rank_states:
        raise ValueError("rank_states is empty; pass the model state of every tp rank, in tp-rank order")
    sizes = {entry["tp_size"] for entry in metadata.values()}
    if sizes and sizes != {len(rank_states)}:
        raise ValueError(f"metadata says tp_size={sorted(sizes)} but {len(rank_states)} rank states were given")
    names = set(metadata)
    for rank, state in enumerate(rank_states):
        if set(state) != names:
            diff = sorted(set(state) ^ names)
            raise KeyError(f"rank {rank}'s state and the metadata disagree on entries {diff[:5]}")
    full = {}
    for name, entry in metadata.items():
        tensor = _assemble_one(name, [state[name] for state in rank_states], entry)
        if strip_padding and "valid_rows" in entry:
            tensor = tensor[: entry["valid_rows"]]
        full[name] = tensor
    return full
