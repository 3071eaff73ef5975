"""Hugging Face safetensors files written as tensors arrive: model.safetensors, or shards + index.

`write_safetensors` writes (name, tensor) pairs as they come: the file plan is
made up front from the names and sizes alone (a meta-device dry run of the
conversion gives them), so each output file is written and dropped as soon as
its last tensor arrives. Peak memory of a streamed export (hf.export_hf): the
tensors of one output file (at most max_shard_bytes, or one larger tensor
alone; safetensors' save_file briefly holds a serialised copy too) plus one
full megalite tensor being converted (checkpoint.reader).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names grouped, in order, into files of at most max_bytes (a larger tensor gets a file of its own)."""
    shards, current, used = [], [], 0
    for name, n in sizes:
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += n
    return shards + [current] if current else shards


def write_safetensors(named: Iterable[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int,
                      dtype: torch.dtype = torch.float32, plan: list[tuple[str, list[int]]] | None = None
                      ) -> list[str]:
    """Write model.safetensors, or model-XXXXX-of-YYYYY.safetensors + index when larger than max_shard_bytes.

    `plan` lists (name, shape) in the order `named` will yield them; with it, `named` is consumed
    lazily and each file is written as soon as its last tensor arrives. Without it, `named` is
    materialised first. Returns the file names written.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max shard size {max_shard_bytes} must be positive")
    if plan is None:
        named = list(named)
        plan = [(n, list(t.shape)) for n, t in named]
    size = torch.tensor([], dtype=dtype).element_size()
    files = plan_shards([(n, size * int(torch.Size(s).numel())) for n, s in plan], max_shard_bytes)
    fnames = (["model.safetensors"] if len(files) == 1 else
              [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)])
    order = iter([(name, k) for k, names in enumerate(files) for name in names])
    buffer: dict[str, torch.Tensor] = {}
    weight_map, total = {}, 0
    for name, tensor in named:
        want, k = next(order, (None, None))
        if name != want:
            raise RuntimeError(f"conversion yielded '{name}' where its dry run planned '{want}'")
        buffer[name] = tensor.to(dtype).contiguous()
        if len(buffer) == len(files[k]):  # the file's last tensor: write it and let its tensors go
            save_file(buffer, out_dir / fnames[k], metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in buffer.values())
            weight_map.update(dict.fromkeys(buffer, fnames[k]))
            buffer = {}
    if (missing := next(order, None)) is not None:
        raise RuntimeError(f"conversion ended before '{missing[0]}' that its dry run planned")
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return fnames
