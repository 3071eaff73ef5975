"""How blocks are parallelised (`BlockSettings`, the one value every block constructor takes) and the
dropout-stream helpers the blocks share (see megalite.model.blocks for which dropout draws where)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from megalite.config import ModelConfig
from megalite.kernels.ring_attention import positions_of
from megalite.model.moe import MoEState
from megalite.tensor_parallel import group_rank, group_size
from megalite.tensor_parallel.random import TPRngTracker

RECOMPUTE_MODES = ("none", "selective", "full")


def recompute_mode(value: str | bool | None) -> str:
    """train.activation_checkpointing as one of RECOMPUTE_MODES (True/False, the old switch: 'full'/'none')."""
    if value is True or value is False or value is None:
        return "full" if value else "none"
    if value not in RECOMPUTE_MODES:
        raise ValueError(f"activation_checkpointing={value!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    return value


@dataclass(frozen=True)
class BlockSettings:
    """How blocks are parallelised: the one value every block constructor takes.

    tp_group: the tensor-parallel group (None: one process). sequence_parallel: activations
    between blocks are [s/tp, b, h] chunks (only meaningful with tp > 1). activation_checkpointing:
    what transformer blocks recompute in backward instead of keeping (see TransformerBlock;
    True/False mean 'full'/'none'). rng_tracker: the per-tp-rank dropout stream (needed with dropout
    under tp; Transformer makes one). rotary: the rotary tables every layer shares (Transformer
    makes one; model.rope.RotaryTables). cp_group: the context-parallel group (None: the whole
    sequence is here); under it a block sees this rank's two load-balanced chunks of every
    sequence (kernels.ring_attention), so rotary and learned positions look up their global
    positions and attention runs around the ring. moe_state: what the model's MoE layers share with
    the training loop (model.moe.MoEState; Transformer makes one). ep_group: the expert-parallel
    group MoE layers shard their experts over (None: every rank holds all experts).
    """

    tp_group: object = None
    sequence_parallel: bool = False
    activation_checkpointing: str | bool = "none"
    rng_tracker: TPRngTracker | None = None
    rotary: nn.Module | None = None  # rope.RotaryTables shared by the model's layers (None: each its own)
    cp_group: object = None
    moe_state: MoEState | None = None
    ep_group: object = None

    def __post_init__(self):
        object.__setattr__(self, "activation_checkpointing", recompute_mode(self.activation_checkpointing))

    @property
    def tp(self) -> int:
        return group_size(self.tp_group)

    @property
    def cp(self) -> int:
        return group_size(self.cp_group)

    def global_positions(self, local_len: int, device) -> torch.Tensor | None:
        """The global positions of this rank's `local_len` positions of a sequence; None without cp."""
        if self.cp == 1:
            return None
        return positions_of(local_len * self.cp, self.cp, group_rank(self.cp_group)).to(device)


def sharded_rng(tracker: TPRngTracker | None):
    """Context for dropout on activations that differ per tp rank: the tracker's stream, if any."""
    return tracker.fork() if tracker is not None else nullcontext()


def replay_tracker(tracker: TPRngTracker | None) -> dict:
    """checkpoint() kwargs that replay the tracker like the default generators, so recomputed dropout
    draws the same masks. Inside torch.compile (train.compile) none: Dynamo turns the checkpoint into
    a graph region whose backward AOTAutograd plans itself, it cannot trace this context_fn, and
    train.compile refuses dropout, so there is no mask to replay."""
    if tracker is None or torch.compiler.is_compiling():
        return {}
    return {"context_fn": tracker.checkpoint_context}


def need_tracker(cfg: ModelConfig, par: BlockSettings) -> None:
    if par.rng_tracker is None and cfg.dropout > 0 and par.tp > 1:
        raise ValueError(f"model.dropout={cfg.dropout} with tensor parallelism needs an rng_tracker "
                         "(TPRngTracker), or every tp rank draws the same attention-dropout mask; "
                         "build the model through Transformer, which passes one")
