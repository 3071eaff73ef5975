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
from megalite.lion import Lion
from megalite.muon import Muon, muon_param_groups

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


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str, tp_group=None) -> torch.optim.Optimizer:
    """`optim.optimizer` over `param_groups`. AdamW: torch's fused kernel on CUDA and on the CPU (one pass
    per tensor; on a CPU about ten times faster than the foreach path, which runs each of AdamW's ops
    over every tensor in turn: 5 ms against 58 for a 5M-parameter model on two cores), foreach
    elsewhere. Lion: megalite.lion. Muon: megalite.muon (its sharded matrices gathered over `tp_group`)."""
    if cfg.optimizer == "muon":
        return Muon(muon_param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.muon_momentum,
                    betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, tp_group=tp_group)
    if cfg.optimizer == "lion":
        return Lion(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    fused = device_type == "cpu" or (device_type == "cuda" and torch.cuda.is_available())
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


class LRSchedule:
    """Linear warmup, then the decay of `optim.decay` down to min_lr (Megatron's --lr-decay-style).

    Steps count from 1 (the first optimizer step is step 1), so with warmup step 1 already has a small
    positive rate: lr * step / warmup_steps. After warmup, with E = warmup_steps + decay_steps the
    step the decay ends at (decay_steps None: E = total_steps) and r the fraction of the decay done:

    - 'cosine': min_lr + (lr - min_lr) * (1 + cos(pi r)) / 2 over steps warmup..E, then min_lr;
    - 'linear': the same with 1 - r; 'constant': lr;
    - 'wsd' (warmup-stable-decay): lr up to `wsd_start`, then `wsd_decay_style` over the next
      `wsd_steps` steps to min_lr, then min_lr; by default the decay is the last wsd_decay_steps
      (or wsd_decay_fraction of the steps after warmup) before E; `wsd_decay_start_step` sets where
      it starts instead, e.g. at the step of a stable-phase checkpoint a cooldown branches from;
    - 'inverse-square-root': lr * sqrt(max(warmup_steps, 1) / step), floored at min_lr (no end).

    The schedule is a pure function of the step and the config; `last_step` counts the optimizer
    steps actually taken (skipped fp16 steps do not advance it) and is all a checkpoint keeps, so a
    resumed run follows its own config's curve from the saved step on.
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
        self.wsd_style = cfg.wsd_decay_style
        self.wsd_start, self.wsd_steps = wsd_window(cfg, self.warmup_steps, self.decay_steps)
        self.last_step = 0
        self.damping: tuple[int, float] | None = None  # (last step, factor) after a rollback

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * max(step, 0) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        if self.kind == "inverse-square-root":
            return max(self.min_lr, self.lr * math.sqrt(max(self.warmup_steps, 1) / max(step, 1)))
        if self.kind == "wsd":
            progress = min(max(step - self.wsd_start, 0) / self.wsd_steps, 1.0)
            factor = DECAY_SHAPES[self.wsd_style](progress)
        else:
            progress = min((step - self.warmup_steps) / self.decay_steps, 1.0)
            factor = DECAY_SHAPES[self.kind](progress)
        return self.min_lr + (self.lr - self.min_lr) * factor

    def milestones(self, total_steps: int) -> list[int]:
        """The steps that show this curve's shape in a run of `total_steps`: the first, the end of
        warmup, where the decay starts, its middle and its end, and the last (each once, in order)."""
        w = self.warmup_steps
        if self.kind == "wsd":
            start, n = self.wsd_start, self.wsd_steps
            steps = [1, w, start, start + n // 2, start + n]
        elif self.kind in ("constant", "inverse-square-root"):
            steps = [1, w, w + (total_steps - w) // 2]
        else:
            steps = [1, w, w + self.decay_steps // 2, w + self.decay_steps]
        return sorted({s for s in [*steps, total_steps] if 1 <= s <= total_steps})

    def describe(self) -> str:
        """The curve in words, e.g. 'wsd: warmup 20 steps, stable to step 240, exponential decay over 60'."""
        head = f"{self.kind}: warmup {self.warmup_steps} steps"
        if self.kind == "wsd":
            return (f"{head}, stable to step {self.wsd_start}, {self.wsd_style} decay over {self.wsd_steps} "
                    f"steps to {self.min_lr:g}")
        if self.kind == "constant":
            return f"{head}, then {self.lr:g}"
        if self.kind == "inverse-square-root":
            return f"{head}, then {self.lr:g} * sqrt({max(self.warmup_steps, 1)} / step), at least {self.min_lr:g}"
        return f"{head}, then to {self.min_lr:g} at step {self.warmup_steps + self.decay_steps}"

    def rate(self, step: int) -> float:
        """The rate optimizer step `step` uses: lr_at, times a damping factor while one is in force."""
        damped = self.damping is not None and step <= self.damping[0]
        return self.lr_at(step) * (self.damping[1] if damped else 1.0)

    def damp(self, until: int, factor: float) -> None:
        """Scale the rate of the steps up to `until` by `factor` (after a rollback: train.stability_*)."""
        self.damping = (int(until), float(factor))

    def advance(self) -> float:
        """Count one more optimizer step and return its learning rate."""
        self.last_step += 1
        return self.rate(self.last_step)

    @property
    def current_lr(self) -> float:
        """The rate of the last step taken (0 before the first with warmup)."""
        return self.rate(self.last_step)

    def state_dict(self) -> dict:
        """Progress (and a damping in force); the curve's shape comes from the config of the resumed run (a
        cooldown resumed from a stable-phase checkpoint decays as its own config says)."""
        return {"last_step": self.last_step, **({"damping": list(self.damping)} if self.damping else {})}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count (and damping) saved by `state_dict`."""
        if "last_step" not in state:
            raise KeyError(f"LR schedule state has no 'last_step' (keys: {sorted(state)})")
        self.last_step = int(state["last_step"])
        self.damping = (int(state["damping"][0]), float(state["damping"][1])) if "damping" in state else None


# factor of (lr - min_lr) above min_lr at fraction r of a decay (Megatron's coefficients)
DECAY_SHAPES = {
    "linear": lambda r: 1.0 - r,
    "cosine": lambda r: 0.5 * (1.0 + math.cos(math.pi * r)),
    "exponential": lambda r: 2.0 * 0.5 ** r - 1.0,
    "minus_sqrt": lambda r: 1.0 - math.sqrt(r),
}


def wsd_window(cfg: OptimConfig, warmup_steps: int, decay_steps: int) -> tuple[int, int]:
    """(last step at peak lr, steps of decay after it) of a 'wsd' schedule; ValueError naming the fix.

    The decay ends at warmup_steps + decay_steps unless `wsd_decay_start_step` and `wsd_decay_steps`
    both say otherwise. Other kinds get (warmup_steps, decay_steps), unused."""
    if cfg.decay != "wsd":
        return warmup_steps, decay_steps
    end = warmup_steps + decay_steps
    if not 0 < cfg.wsd_decay_fraction <= 1:
        raise ValueError(f"optim.wsd_decay_fraction={cfg.wsd_decay_fraction} must be in (0, 1]")
    if cfg.wsd_decay_steps is not None and cfg.wsd_decay_steps < 1:
        raise ValueError(f"optim.wsd_decay_steps={cfg.wsd_decay_steps} must be >= 1 (or None for "
                         "optim.wsd_decay_fraction of the steps after warmup)")
    if cfg.wsd_decay_start_step is None:
        steps = cfg.wsd_decay_steps or max(1, round(cfg.wsd_decay_fraction * decay_steps))
        start = end - steps
    else:
        start = cfg.wsd_decay_start_step
        steps = cfg.wsd_decay_steps or end - start
    if start < warmup_steps:
        fix = ("raise optim.wsd_decay_start_step" if cfg.wsd_decay_start_step is not None
               else "lower optim.wsd_decay_steps (or optim.wsd_decay_fraction) or raise train.steps")
        raise ValueError(f"optim.decay='wsd' would start its decay after step {start}, inside the warmup of "
                         f"{warmup_steps} steps; {fix}")
    if steps < 1:
        raise ValueError(f"optim.wsd_decay_start_step={start} leaves no step to decay in before step {end}; "
                         "set optim.wsd_decay_steps or raise train.steps")
    return start, steps
