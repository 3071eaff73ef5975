"""Kernel entry points the model calls: norms, rotary embeddings, attention.

`_select_backend` below is the single dispatch point, per op call and by
the device of the tensors: CUDA tensors use the fused csrc kernels
(megalite/kernels/fused.py) when the extension loads, everything else uses
the pure-PyTorch twins (megalite/kernels/reference.py), which are also the
oracle the fused kernels are tested against. MEGALITE_KERNELS picks:
`auto` (default), `reference` (force the twins everywhere) or `fused`
(CUDA tensors must get the fused kernels: fail loudly instead of falling
back). The choice, and why, is logged once per device type on the
"megalite.kernels" logger. layer_norm always runs the twin (no fused kernel).
"""
from __future__ import annotations

import logging
import os
import sys
from types import ModuleType

import torch

from megalite.kernels import fused, reference
from megalite.kernels.attention import attention, mark_backend_choice_constant
from megalite.kernels.reference import rope_cos_sin, rope_inv_freq

_LOG = logging.getLogger("megalite.kernels")
ENV_VAR = "MEGALITE_KERNELS"
MODES = ("auto", "reference", "fused")

# device type -> (backend name, module). Filled on first use per device type;
# plain dict lookups keep the hot path cheap and traceable by torch.compile.
_choice: dict[str, tuple[str, ModuleType]] = {}


def _select_backend(device_type: str = "cuda") -> tuple[str, ModuleType]:
    """(name, module providing rms_norm / layer_norm / apply_rotary) for tensors on `device_type`."""
    name = _backend_name(device_type)
    return name, (fused if name == "fused" else reference)


def _backend_name(device_type: str) -> str:
    hit = _choice.get(device_type)
    if hit is None:
        hit = _choice[device_type] = _decide(device_type)
    return hit[0]


def mark_choices_constant() -> None:
    """Let torch.compile run the kernel and attention backend choices at trace time and bake the answers
    in: the first decision (extension loading, logging) can then happen inside a compiled region without
    a graph break. model.compiled calls it before it compiles (train.compile); call it yourself before
    torch.compile of other code that calls these ops. Not done at import unless Dynamo is already
    loaded: importing it costs every process a second or more of start-up, in runs that never compile.
    assume_constant_result marks the function object itself (documented: it returns the same function)."""
    torch.compiler.assume_constant_result(_backend_name)
    mark_backend_choice_constant()


if "torch._dynamo" in sys.modules:  # already paid for: mark now, so any later torch.compile sees it
    mark_choices_constant()


def _decide(device_type: str) -> tuple[str, ModuleType]:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {', '.join(MODES)}; unset it or pick one of those")
    if mode == "reference":
        name, module, why, level = "reference", reference, f"{ENV_VAR}=reference forces the PyTorch twins", logging.INFO
    elif device_type != "cuda":
        name, module, why, level = ("reference", reference,
                                    f"tensors are on {device_type} and the fused kernels are CUDA-only", logging.INFO)
    else:
        ok, why = fused.load()
        if not ok and mode == "fused":
            raise RuntimeError(f"{ENV_VAR}=fused but the fused kernels are unavailable: {why}")
        name, module, level = ("fused", fused, logging.INFO) if ok else ("reference", reference, logging.WARNING)
    _LOG.log(level, "using %s kernels (rms_norm, apply_rotary) for %s tensors: %s", name, device_type, why)
    return name, module


def _reset_backend_choice() -> None:
    """Forget the per-device choices so the next call decides (and logs) again; for tests."""
    _choice.clear()


def backend(device: torch.device | str | None = None) -> str:
    """'fused' or 'reference': the backend used for tensors on `device`.

    The default device is cuda when a CUDA device is available, else cpu.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _select_backend(torch.device(device).type)[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 math, x's dtype out); see reference.rms_norm."""
    return (fused if _backend_name(x.device.type) == "fused" else reference).rms_norm(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim (fp32 math, x's dtype out); see reference.layer_norm."""
    return reference.layer_norm(x, weight, bias, eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                 rot_dim: int | None = None) -> torch.Tensor:
    """Rotary embedding of x [s, b, heads, head_dim]; see reference.apply_rotary."""
    impl = fused if _backend_name(x.device.type) == "fused" else reference
    return impl.apply_rotary(x, cos, sin, interleaved=interleaved, rot_dim=rot_dim)


__all__ = ["attention", "apply_rotary", "backend", "layer_norm", "mark_choices_constant", "rms_norm", "rope_cos_sin",
           "rope_inv_freq"]
