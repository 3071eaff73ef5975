"""Kernel entry points the model calls: norms, rotary embeddings, attention.

`_select_backend` below is the single dispatch point. Today the only backend
is `reference` (pure PyTorch, megalite/kernels/reference.py): it is the
working path on every device and the oracle the fused kernels are tested
against. When the compiled csrc extension arrives, it is chosen here (and
MEGALITE_KERNELS=reference forces the twin); nothing else changes.
`backend()` reports which one was chosen.
"""
from __future__ import annotations

from types import ModuleType

import torch

from megalite.kernels import reference
from megalite.kernels.attention import attention
from megalite.kernels.reference import rope_cos_sin


def _select_backend() -> tuple[str, ModuleType]:
    """(name, module providing rms_norm / layer_norm / apply_rotary). The one place backends are chosen."""
    return "reference", reference


_BACKEND_NAME, _impl = _select_backend()


def backend() -> str:
    """Name of the kernel backend in use ('reference')."""
    return _BACKEND_NAME


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 math, x's dtype out); see reference.rms_norm."""
    return _impl.rms_norm(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim (fp32 math, x's dtype out); see reference.layer_norm."""
    return _impl.layer_norm(x, weight, bias, eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                 rot_dim: int | None = None) -> torch.Tensor:
    """Rotary embedding of x [s, b, heads, head_dim]; see reference.apply_rotary."""
    return _impl.apply_rotary(x, cos, sin, interleaved=interleaved, rot_dim=rot_dim)


__all__ = ["attention", "apply_rotary", "backend", "layer_norm", "rms_norm", "rope_cos_sin"]
