"""The norms of the blocks: RMSNorm and LayerNorm with gains (and an optional LayerNorm bias), fp32 math
through the kernels entry point. Under sequence parallelism each tp rank normalises its own chunk of
the sequence, so the gains' gradients are partial sums: they are marked for the tp sum."""
from __future__ import annotations

import torch
from torch import nn

from megalite import kernels
from megalite.config import ModelConfig
from megalite.tensor_parallel import mark


class RMSNorm(nn.Module):
    """RMSNorm with a gain, through the kernels entry point (fp32 math)."""

    def __init__(self, dim: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        if sequence_parallel:  # each tp rank sees a different sequence chunk: partial grads
            mark(self.weight, sequence_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm with a gain and optional bias, through the kernels entry point (fp32 math)."""

    def __init__(self, dim: int, eps: float, bias: bool, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        for p in (self.weight, self.bias):
            if p is not None and sequence_parallel:
                mark(p, sequence_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"


def make_norm(cfg: ModelConfig, sequence_parallel: bool) -> nn.Module:
    """The norm cfg.norm names, over the hidden size."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps, sequence_parallel)
    return LayerNorm(cfg.hidden_size, cfg.norm_eps, cfg.bias, sequence_parallel)
