"""AdamW with Megatron's weight-decay rule, and the learning-rate schedule.

Weight decay follows the ndim rule: every parameter with two or more
dimensions (linear weights and embeddings alike) decays; one-dimensional ones
(norm gains, biases) do not, since shrinking a gain or bias towards zero only
fights the normalization it belongs to.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megalite.config import OptimConfig, choices

DECAY_KINDS = choices("optim.decay")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group (ndim >= 2) and an undecayed one.

    Each group carries a "name" ("decay" / "no_decay"); empty groups are left
    out. Tied parameters appear once (named_parameters deduplicates them).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} is negative; use 0 to disable decay")
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over `param_groups`: torch's fused kernel on CUDA and on the CPU (one pass per tensor; on a
    CPU about ten times faster than the foreach path, which runs each of AdamW's ops over every
    tensor in turn: 5 ms against 58 for a 5M-parameter model on two cores), foreach elsewhere."""
    fused = device_type == "cpu" or (device_type == "cuda" and torch.cuda.is_available())
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


class LRSchedule:
    """Linear warmup, then cosine/linear decay to min_lr, then constant.

    Steps count from 1 (the first optimizer step is step 1), so with warmup
    step 1 already has a small positive rate: lr * step / warmup_steps.
    `decay='constant'` keeps the peak rate after warmup. The schedule itself
    is a pure function of the step; `last_step` counts the optimizer steps
    actually taken (skipped fp16 steps do not advance it).
    """

    def __init__(self, cfg: OptimConfig, total_steps: int):
        if cfg.decay not in DECAY_KINDS:
            raise ValueError(f"optim.decay={cfg.decay!r} is not one of {DECAY_KINDS}")
        if cfg.warmup_steps < 0 or total_steps < 0:
            raise ValueError(f"warmup_steps={cfg.warmup_steps} and total_steps={total_steps} "
                             "must both be >= 0")
        if cfg.min_lr > cfg.lr:
            raise ValueError(f"optim.min_lr={cfg.min_lr} is above optim.lr={cfg.lr}; lower min_lr")
        decay_steps = cfg.decay_steps if cfg.decay_steps is not None else total_steps - cfg.warmup_steps
        if cfg.decay_steps is not None and cfg.decay_steps < 1:
            raise ValueError(f"optim.decay_steps={cfg.decay_steps} must be >= 1 (or None for "
                             "train.steps - warmup_steps)")
        self.lr, self.min_lr, self.kind = cfg.lr, cfg.min_lr, cfg.decay
        self.warmup_steps = cfg.warmup_steps
        self.decay_steps = max(decay_steps, 1)  # warmup covering the whole run leaves one decay step
        self.last_step = 0

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * max(step, 0) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        progress = min((step - self.warmup_steps) / self.decay_steps, 1.0)
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return self.min_lr + (self.lr - self.min_lr) * factor

    def advance(self) -> float:
        """Count one more optimizer step and return its learning rate."""
        self.last_step += 1
        return self.lr_at(self.last_step)

    @property
    def current_lr(self) -> float:
        """The rate of the last step taken (0 before the first with warmup)."""
        return self.lr_at(self.last_step)

    def state_dict(self) -> dict:
        """Progress only; the curve's shape comes from the config of the resumed run."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count saved by `state_dict`."""
        if "last_step" not in state:
            raise KeyError(f"LR schedule state has no 'last_step' (keys: {sorted(state)})")
        self.last_step = int(state["last_step"])
