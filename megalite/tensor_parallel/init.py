"""Deterministic, tensor-parallel-independent weight initialisation.

Each parameter's FULL (unsharded) weight is drawn from its own CPU
torch.Generator, seeded from (base seed, the parameter's stable name), and a
rank keeps only its shard. So a tp=2 run starts from exactly the tp=1
weights split in two, and adding or reordering layers never shifts the
random stream of any other parameter. The price is that every rank draws the
full matrix once on the CPU at start-up.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn

InitMethod = Callable[[tuple, torch.Generator], torch.Tensor]
"""init_method(full_shape, generator) -> full fp32 CPU tensor of that shape."""


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from the base seed and a parameter name (stable across runs and Python versions)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def normal_init(std: float, valid_rows: int | None = None) -> InitMethod:
    """N(0, std^2) everywhere, or only on the first `valid_rows` rows with the rest zero.

    `valid_rows` serves padded vocabularies: the real rows are drawn from a
    [valid_rows, ...] stream, so they do not depend on how much padding the
    tensor-parallel size added, and the padding rows stay zero.
    """
    if std < 0:
        raise ValueError(f"init std={std} is negative")

    def init(shape: tuple, generator: torch.Generator) -> torch.Tensor:
        rows = shape[0] if valid_rows is None else valid_rows
        if rows > shape[0]:
            raise ValueError(f"valid_rows={rows} exceeds the {shape[0]} rows of a {tuple(shape)} weight")
        full = torch.zeros(shape, dtype=torch.float32)
        full[:rows].normal_(0.0, std, generator=generator)
        return full

    return init


def full_weight(shape: tuple, init_method: InitMethod, seed: int, name: str) -> torch.Tensor:
    """The full fp32 CPU weight named `name`; identical on every rank and for every tp size."""
    generator = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
    full = init_method(tuple(shape), generator)
    if tuple(full.shape) != tuple(shape):
        raise ValueError(f"init method for {name} returned shape {tuple(full.shape)}, expected {tuple(shape)}")
    return full


@torch.no_grad()
def init_shard_(param: torch.Tensor, init_method: InitMethod, seed: int, name: str,
                partition_dim: int | None, rank: int, world_size: int) -> None:
    """Fill `param` with its shard of the full weight (split evenly along `partition_dim`; None: replicated)."""
    shape = list(param.shape)
    if partition_dim is not None:
        shape[partition_dim] *= world_size
    full = full_weight(tuple(shape), init_method, seed, name)
    if partition_dim is not None:
        full = full.chunk(world_size, dim=partition_dim)[rank]
    param.copy_(full)


def init_model_weights(model: nn.Module, seed: int) -> None:
    """Call `init_weights(seed, prefix)` on every submodule that has it, prefix = its module path.

    The module path (e.g. 'blocks.3.attn.qkv') is what makes a parameter's
    random stream stable, so build the whole model before calling this.
    """
    for prefix, module in model.named_modules():
        init = getattr(module, "init_weights", None)
        if init is not None and module is not model:
            init(seed, prefix)
