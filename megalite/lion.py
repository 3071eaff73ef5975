"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), `optim.optimizer=lion`.

Per parameter θ with gradient g and momentum m (one fp32 state, `exp_avg`, half of AdamW's):

    update = sign(β1 · m + (1 − β1) · g)
    θ      = θ · (1 − lr · λ) − lr · update         (decoupled weight decay, as AdamW's)
    m      = β2 · m + (1 − β2) · g

Every coordinate moves by exactly ±lr (or 0), so the paper's learning rates are 3-10x smaller than
AdamW's and its weight decay 3-10x larger; its betas are 0.9 and 0.99 (megalite's optim.beta1 and
optim.beta2). The sign makes the step invariant to the gradient's scale, so fp16 loss scaling and
clipping change only how m weights the history. A coordinate whose momentum sits within rounding of
zero can take either sign under another summation order: across layouts Lion agrees to those flips,
not to the last bit.
"""
from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    """Lion over param groups (lr, betas, weight_decay per group), state 'exp_avg' per parameter."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr < 0 or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0:
            raise ValueError(f"Lion needs lr >= 0, 0 <= betas < 1 and weight_decay >= 0; got lr={lr}, "
                             f"betas={betas}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            lr, (beta1, beta2), decay = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, g = state["exp_avg"], p.grad
                update = torch.lerp(g, m, beta1).sign_()  # β1·m + (1−β1)·g, then its sign
                if decay:
                    p.mul_(1.0 - lr * decay)
                p.add_(update, alpha=-lr)
                m.lerp_(g, 1.0 - beta2)  # β2·m + (1−β2)·g
        return loss
