"""Checkpoints: atomic rank-aware save/load (io) of nested state flattened to tensors + JSON (state)."""
from megalite.checkpoint.io import (CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint,
                                    step_dir_name)
from megalite.checkpoint.state import flatten, unflatten

__all__ = ["CheckpointError", "flatten", "latest_checkpoint", "load_checkpoint", "save_checkpoint",
           "step_dir_name", "unflatten"]
