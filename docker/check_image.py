"""Fail the image build unless what megalite runs on is really there; no GPU needed.

docker/Dockerfile runs this right after `pip install`. setup.py skips the CUDA
extension silently when it cannot build it (no CUDA build of torch, no nvcc),
and megalite would then fall back to the PyTorch twins, or a just-in-time
build on every node at start-up: in an image that is a build error. So the
extension `megalite._C` must exist, load, and register the ops
megalite.kernels.fused declares; DeepSpeed, flash-attn and mpi4py must import.

    python docker/check_image.py     # exit 0, or 1 with one line per problem
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

RUNTIME_MODULES = ("deepspeed", "flash_attn", "mpi4py")
FIX = ("build it with a CUDA build of torch and nvcc present: pip install --no-build-isolation . "
       "(see cuda_extension in setup.py; MEGALITE_BUILD_KERNELS must not be 0)")


def kernel_problems() -> list[str]:
    """Why megalite's compiled CUDA kernels (megalite._C) are unusable; [] when they load."""
    import torch

    if torch.version.cuda is None:
        return [f"torch {torch.__version__} has no CUDA: megalite._C cannot be built; use a CUDA base image"]
    spec = importlib.util.find_spec("megalite._C")
    if spec is None or not spec.origin:
        return [f"megalite._C (the CUDA kernels from csrc/) was not built; {FIX}"]
    try:
        torch.ops.load_library(spec.origin)
    except Exception as exc:  # noqa: BLE001 - any load failure is the message
        return [f"megalite._C at {spec.origin} does not load: {exc}"]
    from megalite.kernels.fused import SCHEMAS

    missing = [name for name in SCHEMAS if not _has_op(name)]
    return [f"megalite._C at {spec.origin} lacks the ops {missing}; rebuild it from this csrc/"] if missing else []


def _has_op(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.megalite, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def import_problems(modules=RUNTIME_MODULES) -> list[str]:
    problems = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - ImportError or a broken build
            problems.append(f"import {name} failed: {type(exc).__name__}: {exc}")
    return problems


def main(modules=RUNTIME_MODULES) -> int:
    problems = kernel_problems() + import_problems(modules)
    for problem in problems:
        print(f"check_image: {problem}", file=sys.stderr)
    if not problems:
        import megalite

        print(f"check_image: megalite {megalite.__file__} with its CUDA kernels, and {', '.join(modules)}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
