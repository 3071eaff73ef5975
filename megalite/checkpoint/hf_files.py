"""Hugging Face safetensors files, read and written one tensor at a time.

`HFTensors` reads a model directory (model.safetensors, or shards + index) by name, each tensor
only when asked for (plain reads, nothing memory-mapped), and gives the same names as meta
tensors (shapes and dtypes from the file headers, nothing read) for a conversion's dry run.
`LazyState` is what an import converts into: megalite name -> a recipe that makes that one full
tensor from its HF tensors when asked for.

`write_safetensors` writes (name, tensor) pairs as they come: the file plan is
made up front from the names and sizes alone (a meta-device dry run of the
conversion gives them), so each output file is written and dropped as soon as
its last tensor arrives. Peak memory of a streamed export (hf.export_hf): the
tensors of one output file (at most max_shard_bytes, or one larger tensor
alone) plus one full megalite tensor being converted (checkpoint.reader).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from safetensors.torch import save_file

from megalite.checkpoint.io import CheckpointError


def _safetensors_files(hf_dir: Path) -> list[str]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    if (hf_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise CheckpointError(f"{hf_dir} holds neither model.safetensors nor model.safetensors.index.json "
                          "(only safetensors checkpoints are imported; nothing is unpickled)")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """name -> (dtype, shape, first byte, end byte) of a safetensors file, from its JSON header alone."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 * 2**20:
                raise ValueError(f"header length {size} is not that of a safetensors file")
            header = json.loads(f.read(size))
        start, total = 8 + size, path.stat().st_size
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = (start + o for o in entry["data_offsets"])
            dtype, shape = _DTYPES[entry["dtype"]], list(entry["shape"])
            if not start <= begin <= end <= total or end - begin != dtype.itemsize * torch.Size(shape).numel():
                raise ValueError(f"tensor '{name}' lies outside the file or has the wrong size")
            out[name] = (dtype, shape, begin, end)
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


class HFTensors(Mapping):
    """name -> tensor over a HF safetensors directory, each tensor read from disk only when asked for.

    Read with plain file reads, not memory-mapped (safetensors' safe_open keeps every page it has
    touched resident in the process): a read costs the process that one tensor. `view(meta=True)`
    gives the same names as meta tensors of their shape and dtype, from the headers alone.
    """

    def __init__(self, hf_dir: Path, meta: bool = False, index: dict | None = None):
        self.is_meta = meta
        self.index = index if index is not None else {
            name: (hf_dir / fname, *where) for fname in _safetensors_files(hf_dir)
            for name, where in _header(hf_dir / fname).items()}

    def view(self, meta: bool = False) -> "HFTensors":
        """The same tensors, read (meta=False) or as meta tensors of their shape and dtype (meta=True)."""
        return HFTensors(Path(), meta, self.index)

    def __getitem__(self, name: str) -> torch.Tensor:
        path, dtype, shape, begin, end = self.index[name]
        if self.is_meta:
            return torch.empty(shape, dtype=dtype, device="meta")
        data = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(begin)
            if f.readinto(memoryview(data.numpy())) != end - begin:
                raise CheckpointError(f"{path} ends inside tensor '{name}'")
        return data.view(dtype).view(shape)  # safetensors is little-endian, as every machine megalite runs on

    def __contains__(self, name) -> bool:  # Mapping's would read the tensor to find out
        return name in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


class LazyState(Mapping):
    """megalite name -> full tensor, each made by its recipe (reading only its own HF tensors) when asked for."""

    def __init__(self, recipes: dict[str, Callable[[], torch.Tensor]]):
        self.recipes = recipes

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.recipes[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.recipes)

    def __len__(self) -> int:
        return len(self.recipes)


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
