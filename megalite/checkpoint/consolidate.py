"""The full fp32 model from a checkpoint, without the cluster (or DeepSpeed) that wrote it.

A ZeRO checkpoint holds, on every rank, only that rank's slice of each parameter's fp32 master,
and with tensor parallelism each parameter is itself a tp shard; a native-engine checkpoint holds
whole local weights. `consolidate_fp32` reads every tensor through the one checkpoint reader
(checkpoint.reader.CheckpointReader), which joins the dp slices and the tp shards and verifies
every file on the way (safetensors + JSON; nothing is unpickled).
"""
from __future__ import annotations

import torch

from megalite.checkpoint.reader import CheckpointReader


def consolidate_fp32(checkpoint_dir, strip_padding: bool = False) -> dict[str, torch.Tensor]:
    """name -> full fp32 tensor of the model in a megalite checkpoint (root or step directory).

    Works for the native engine and DeepSpeed ZeRO-0..3, any tp, pp and dp; names are the whole
    model's (a pipeline stage's blocks keep their global names). `strip_padding` drops the
    padded vocabulary rows. Holds the whole model: export_hf streams instead.
    """
    reader = CheckpointReader(checkpoint_dir)
    return {name: reader.read(name, strip_padding=strip_padding) for name in reader.names()}
