"""Muon for the blocks' matrices, AdamW for everything else (`optim.optimizer=muon`).

Muon (Jordan et al. 2024) steps a 2-D weight W with gradient G along the orthogonalized momentum:

    B = μ B + G;   U = G + μ B (Nesterov) or B;   O = NS(U);   W = W (1 − lr λ) − lr · s · O

NS is five Newton-Schulz iterations of the quintic X ← a X + (b A + c A²) X, A = X Xᵀ, with
(a, b, c) = (3.4445, −4.7750, 2.0315), from X = U / ‖U‖_F (on the wide orientation), which drives
every singular value of U towards 1: O ≈ the nearest semi-orthogonal matrix U V ᵀ of U's SVD. The
scale s = 0.2 · sqrt(max(rows, cols)) is Moonlight's (Liu et al. 2025): it gives the update the RMS
of a typical AdamW step, so one learning-rate schedule (optim.lr) serves both kinds of parameter.
Muon takes the 2-D weights of the transformer blocks; the embedding table, the output head, every
1-D gain and bias and the MoE experts' stacked [E, ., .] weights step with AdamW (torch's update,
written out over the same param groups). Momentum μ = optim.muon_momentum; the AdamW parameters
keep optim.beta1/beta2/eps.

Tensor parallelism. A tp rank holds a contiguous block of rows (column-parallel) or columns
(row-parallel) of W. NS is not applied to the block: the momentum-corrected U is all-gathered over
tp along the split dimension, every rank orthogonalizes the whole matrix (the same bits everywhere)
and keeps its own block. The gathered matrix is the one-process matrix (a plain concatenation along
partition_dim rebuilds every full weight megalite makes, tensor_parallel.sharding), so the update
is the unsharded one exactly; it costs one all-gather of each matrix per step and tp-fold repeated
NS work (ZeRO-style distributed Muon would spread that instead; not done).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megalite.tensor_parallel import group_rank, group_size, sharding_of
from megalite.tensor_parallel.mappings import all_gather_dim

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def newton_schulz(u: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The semi-orthogonal approximation of matrix `u` (fp32), see the module docstring."""
    a, b, c = NS_COEFFICIENTS
    x = u.float() / (u.float().norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.t()
    for _ in range(steps):
        gram = x @ x.t()
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.t() if tall else x


def orthogonalized_update(u: torch.Tensor, partition_dim: int | None, tp_group=None) -> torch.Tensor:
    """s · NS(U) for this rank's block `u` of the whole matrix U (split along `partition_dim` over tp)."""
    split = partition_dim is not None and group_size(tp_group) > 1
    whole = all_gather_dim(u, partition_dim, tp_group) if split else u
    out = newton_schulz(whole) * (0.2 * math.sqrt(max(whole.shape)))
    return out.chunk(group_size(tp_group), partition_dim)[group_rank(tp_group)] if split else out


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Groups flagged 'muon': the blocks' 2-D weights (Muon), and decayed / undecayed AdamW groups."""
    from megalite.tensor_parallel import VocabParallelEmbedding

    skip = {id(p) for m in model.modules() if isinstance(m, VocabParallelEmbedding) for p in m.parameters()}
    head = [m for name, m in model.named_modules() if name.endswith(".output")]
    skip |= {id(p) for m in head for p in m.parameters()}
    muon, decay, no_decay = [], [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            kind = muon if p.ndim == 2 and id(p) not in skip else decay if p.ndim >= 2 else no_decay
            kind.append(p)
    groups = [{"name": "muon", "params": muon, "weight_decay": weight_decay, "muon": True},
              {"name": "decay", "params": decay, "weight_decay": weight_decay, "muon": False},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "muon": False}]
    return [g for g in groups if g["params"]]


class Muon(torch.optim.Optimizer):
    """Muon over the groups flagged 'muon', AdamW over the others (state: momentum_buffer; step, exp_avg,
    exp_avg_sq). `tp_group`: the tensor-parallel group sharded matrices are gathered over."""

    def __init__(self, groups: list[dict], lr: float, momentum: float = 0.95, nesterov: bool = True,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, tp_group=None):
        if not 0.0 <= momentum < 1.0 or lr < 0:
            raise ValueError(f"Muon needs 0 <= momentum < 1 and lr >= 0; got momentum={momentum}, lr={lr}")
        self.tp_group = tp_group
        super().__init__(groups, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "betas": tuple(betas),
                                  "eps": eps, "weight_decay": 0.0, "muon": False})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state, g, mu = self.state[p], p.grad, group["momentum"]
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(mu).add_(g)
        u = g.add(buf, alpha=mu) if group["nesterov"] else buf
        p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.add_(orthogonalized_update(u, sharding_of(p).partition_dim, self.tp_group).to(p.dtype),
               alpha=-group["lr"])

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        """torch.optim.AdamW's update (no amsgrad), one parameter at a time."""
        state, g, (beta1, beta2), lr = self.state[p], p.grad, group["betas"], group["lr"]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        step = float(state["step"])
        p.mul_(1.0 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(g, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1.0 - beta2 ** step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - beta1 ** step))
