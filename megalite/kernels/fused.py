"""Fused CUDA kernels from csrc/: RMSNorm and rotary, forward and backward.

`load()` makes the ops `torch.ops.megalite.*` available, once per process:
first the extension that `setup.py` built into the package (`megalite._C`),
else a just-in-time build of csrc/ with ninja into torch's extension cache
(or $MEGALITE_KERNELS_CACHE); MEGALITE_KERNELS_JIT=0 turns that off. It
never raises: it returns (ok, reason) and megalite.kernels falls back to
the PyTorch twins and logs the reason.

The ops are declared in C++ (csrc/bindings.cpp). Their fake implementations
(so torch.compile traces around them) and autograd formulas are registered
here with torch.library, the supported way to give C++ ops both. The public
functions take the same arguments as megalite.kernels.reference and return
the same dtypes; layer_norm has no fused kernel and is the reference one.
"""
from __future__ import annotations

import importlib.util
import os
import threading

import torch

from megalite.kernels import reference

# The op schemas; csrc/bindings.cpp declares the same strings (a test checks).
SCHEMAS = {
    "rms_norm_fwd": "rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)",
    "rms_norm_bwd": "rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)",
    "rotary": "rotary(Tensor x, Tensor cos, Tensor sin, bool interleaved, int rot_dim, bool conjugate) -> Tensor",
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
# sm_80 and sm_90a binaries plus sm_90 PTX (as setup.py builds): without the PTX a GPU newer than
# Hopper would load the extension and then fail every launch with "no kernel image".
NVCC_ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
                   "-gencode", "arch=compute_90,code=compute_90"]

_lock = threading.Lock()
_state: dict = {"result": None, "ops": None}

layer_norm = reference.layer_norm  # no fused LayerNorm: the twin is the implementation


def load() -> tuple[bool, str]:
    """Load the extension once; (True, where it came from) or (False, why not). Never raises."""
    with _lock:
        if _state["result"] is None:
            _state["result"] = _load_once()
        return _state["result"]


def _load_once() -> tuple[bool, str]:
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False, "this PyTorch build has no usable CUDA device"
    spec = importlib.util.find_spec("megalite._C")
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
        except Exception as exc:  # a stale or mismatched build: the JIT build may still work
            prebuilt = f"prebuilt {spec.origin} failed to load ({exc}); "
        else:
            return _finish_load(f"prebuilt extension {spec.origin}")
    else:
        prebuilt = "no prebuilt megalite._C (pip install --no-build-isolation -e . builds it); "
    if os.environ.get("MEGALITE_KERNELS_JIT", "1") == "0":
        return False, prebuilt + "JIT build disabled by MEGALITE_KERNELS_JIT=0"
    try:
        where = jit_build()
    except Exception as exc:
        return False, prebuilt + f"JIT build of {CSRC} failed: {exc}"
    return _finish_load(f"JIT-built extension in {where}")


def _finish_load(where: str) -> tuple[bool, str]:
    # The library is loaded now, so a second (JIT) copy must not be tried: it
    # would register the `megalite` namespace twice.
    try:
        register_python_side("megalite")
    except Exception as exc:
        return False, f"{where} loaded but registering its fake/autograd impls failed: {exc}"
    return True, where


def jit_build(verbose: bool = False) -> str:
    """Compile csrc/ with ninja (cached, rebuilt when a source changes) and load it into torch.ops.

    Returns where it was built. Concurrent ranks share the build through torch's file lock.
    """
    from torch.utils import cpp_extension

    sources = [os.path.join(CSRC, f) for f in ("bindings.cpp", "rmsnorm.cu", "rotary.cu")]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"sources {missing} not found (an installed wheel carries no csrc/)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed: pip install ninja")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found: set CUDA_HOME to a toolkit matching torch.version.cuda")
    build_dir = os.environ.get("MEGALITE_KERNELS_CACHE") or None
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    arch = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else NVCC_ARCH_FLAGS
    cpp_extension.load(name="megalite_kernels", sources=sources, extra_include_paths=[CSRC],
                       extra_cflags=["-O3"], extra_cuda_cflags=["-O3", *arch], build_directory=build_dir,
                       is_python_module=False, verbose=verbose)
    return build_dir or "torch's extension cache (TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions)"


def register_python_side(ns: str) -> None:
    """Register fake impls and autograd for the ops of library `ns` (the extension's is 'megalite')."""
    ops = getattr(torch.ops, ns)

    def rms_fwd_fake(x, weight, eps):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        return out, x.new_empty(x.shape[:-1], dtype=torch.float32)

    def rms_bwd_fake(dy, x, weight, rstd):
        dw = x.new_empty((0,), dtype=torch.float32) if weight is None else weight.new_empty(weight.shape)
        return torch.empty_like(x, memory_format=torch.contiguous_format), dw

    def rotary_fake(x, cos, sin, interleaved, rot_dim, conjugate):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def rms_setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])

    def rms_backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = ops.rms_norm_bwd(dy, x, weight, rstd)
        return dx, (dw if weight is not None else None), None

    def rotary_setup(ctx, inputs, output):
        _, cos, sin, ctx.interleaved, ctx.rot_dim, ctx.conjugate = inputs
        ctx.save_for_backward(cos, sin)

    def rotary_backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # a rotation's adjoint is the rotation by -angle
        dx = ops.rotary(dy, cos, sin, ctx.interleaved, ctx.rot_dim, not ctx.conjugate)
        return dx, None, None, None, None, None

    torch.library.register_fake(f"{ns}::rms_norm_fwd")(rms_fwd_fake)
    torch.library.register_fake(f"{ns}::rms_norm_bwd")(rms_bwd_fake)
    torch.library.register_fake(f"{ns}::rotary")(rotary_fake)
    torch.library.register_autograd(f"{ns}::rms_norm_fwd", rms_backward, setup_context=rms_setup)
    torch.library.register_autograd(f"{ns}::rotary", rotary_backward, setup_context=rotary_setup)
    _state["ops"] = ops


def _ops():
    ops = _state["ops"]
    if ops is None:
        raise RuntimeError("megalite fused kernels are not loaded; call megalite.kernels.fused.load() "
                           "(megalite.kernels does this when it picks the fused backend)")
    return ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Fused RMSNorm over the last dim (fp32 math, x's dtype out); same contract as reference.rms_norm.

    Dtypes other than fp32/fp16/bf16 take the reference path.
    """
    if x.dtype not in DTYPES or (weight is not None and weight.dtype not in DTYPES):
        return reference.rms_norm(x, weight, eps)
    y, _ = _ops().rms_norm_fwd(x, weight, float(eps))
    return y


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                 rot_dim: int | None = None) -> torch.Tensor:
    """Fused rotary embedding of x [s, b, heads, head_dim]; same contract as reference.apply_rotary.

    cos/sin get no gradient here: tables that require grad, and dtypes the
    kernel lacks, take the reference path.
    """
    rot_dim = reference.rotary_dim(x, cos, rot_dim)
    if x.dim() != 4 or x.dtype not in DTYPES or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)):
        return reference.apply_rotary(x, cos, sin, interleaved=interleaved, rot_dim=rot_dim)
    return _ops().rotary(x, cos, sin, bool(interleaved), int(rot_dim), False)
