"""The interface every engine offers the training loop.

An engine owns everything between "the loss of one micro-batch" and "the
weights have moved": loss scaling, backward, data-parallel gradient
reduction, clipping, the learning-rate schedule and the optimizer step. The
trainer divides each micro-batch loss by the number of accumulation steps,
calls `backward` once per micro-batch and `step` once per global batch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from megalite.tensor_parallel import group_size, shard_metadata


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports.

    grad_norm is the global norm before clipping (nan when the step was
    skipped for non-finite gradients); lr the rate the step used (the current
    rate when skipped); loss_scale the scale the gradients were computed with.
    """

    grad_norm: float
    skipped: bool
    lr: float
    loss_scale: float


class Engine(ABC):
    """Abstract engine; `NativeEngine` (plain PyTorch) and the DeepSpeed engine implement it."""

    model: nn.Module

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss (already divided by the accumulation steps)."""

    @abstractmethod
    def step(self) -> StepResult:
        """Reduce, check, clip and apply the accumulated gradients, then clear them."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop accumulated gradients."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Optimizer, schedule and scaler state as a nested dict (checkpoint.state flattens it)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def shard_metadata(self) -> dict:
        """How this rank's tensors join into full ones (see megalite.tensor_parallel.sharding).

        Engines that repartition parameters (ZeRO-3) record it before they do."""
        return shard_metadata(self.model, group_size(self.model.tp_group))

    def train(self) -> None:
        """Put the model in training mode."""
        self.model.train()

    def eval(self) -> None:
        """Put the model in evaluation mode."""
        self.model.eval()
