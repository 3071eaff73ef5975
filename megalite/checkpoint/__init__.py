"""Checkpoints: one contract (schema), atomic rank-aware save/load (io) of nested state flattened to
tensors + JSON (state), one reader of any layout (reader), resume checks (resume), and the offline
converters (reshard, hf)."""
from megalite.checkpoint.io import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    step_dir_name,
    step_directory,
)
from megalite.checkpoint.schema import Layout, Progress, RankState
from megalite.checkpoint.state import flatten, unflatten

__all__ = ["CheckpointError", "Layout", "Progress", "RankState", "flatten", "latest_checkpoint", "load_checkpoint",
           "read_manifest", "save_checkpoint", "step_dir_name", "step_directory", "unflatten"]
