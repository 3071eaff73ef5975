"""train.compile: every transformer block compiled by torch.compile (Dynamo + Inductor), per block.

Each TransformerBlock is compiled in place (`nn.Module.compile()`, as torchtitan compiles each
block), so parameter names, hence state_dict keys and checkpoints, stay exactly those of the eager
model; the embedding and the head stay eager. The blocks of a model share one compiled graph (same
class, parameters as graph inputs), so compile time does not grow with the layer count. The fused
CUDA ops of megalite.kernels are registered custom ops and the kernel and attention backend choices
are constant at trace time, so at tp = 1 a block is one graph: no graph break. Activation checkpointing
composes: 'selective' and 'full' become checkpointed regions of the graph, whose backward
AOTAutograd plans (recomputing what they recompute eagerly).

Refused (megalite.config.validation): model.dropout > 0, because compiled dropout draws from
Inductor's own generator, not megalite's tensor-parallel RNG tracker (whose fork Dynamo cannot
trace: the masks would neither follow train.seed and resume exactly nor differ per tp rank as they
must); and sequence parallelism, whose sequence-parallel linear's backward Dynamo fails to trace
(an internal error in torch 2.13). Plain tensor parallelism works, but in pieces: Dynamo breaks the
graph at each tp collective (comm accounting mutates a module dict inside an autograd.Function, and
the in-place all-reduce uses mark_dirty) and runs those eagerly. `compile_problem` says what keeps
torch.compile from running here at all (the Python, the code generator); megalite.preflight
reports it before a run starts.
"""
from __future__ import annotations

import platform

from torch import nn

from megalite.kernels import mark_choices_constant
from megalite.model.blocks import TransformerBlock


def compile_unsupported() -> str | None:
    """Why torch.compile cannot run in this interpreter (e.g. a Python newer than this torch knows), or None."""
    import torch._dynamo  # here, not at import: Dynamo costs every process's start a second or more

    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as e:
        return f"{e} (torch {torch.__version__}, Python {platform.python_version()})"
    return None


def compile_problem(device_type: str) -> str | None:
    """Why compiled blocks cannot run on `device_type` here ('cuda': Inductor needs Triton; 'cpu': a
    C++ compiler), or None. The one sentence goes after 'train.compile=true needs ...'."""
    why = compile_unsupported()
    if why:
        return f"torch.compile, which is unsupported here: {why}"
    if device_type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            return "Triton (Inductor's GPU code generator), which is not importable; pip install the triton " \
                   "matching this torch"
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - whatever the lookup raises, the fix is the same
        return f"a C++ compiler for Inductor's CPU code, and none was found ({type(e).__name__}: {e}); " \
               "install g++ or clang++ (or set CXX)"
    return None


def compile_blocks(model: nn.Module) -> list[nn.Module]:
    """Compile every TransformerBlock of `model` in place (names and state_dict keys unchanged);
    returns the blocks compiled. Compilation itself happens at each block's first call."""
    why = compile_unsupported()
    if why:
        raise RuntimeError(f"train.compile=true needs torch.compile, which is unsupported here: {why}; "
                           "set train.compile=false")
    mark_choices_constant()
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    for block in blocks:
        block.compile()
    return blocks


def is_compiled(module: nn.Module) -> bool:
    """Whether `module` was compiled in place (nn.Module.compile)."""
    return getattr(module, "_compiled_call_impl", None) is not None
