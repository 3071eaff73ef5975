"""Nested training state <-> (flat tensors for safetensors, JSON skeleton).

Checkpoints never pickle: tensors go to safetensors, everything else to JSON.
`flatten` walks any nesting of dict/list/tuple holding tensors, numpy arrays
and scalars, numbers, strings, bools and None; each tensor is replaced in the
skeleton by a reference to its name in the flat dict. `unflatten` reverses
it exactly: tuples come back as tuples (Python's and NumPy's RNG states need
them), int dict keys as ints (optimizer state is keyed by parameter index),
non-finite floats as floats, numpy arrays with their dtype and shape.

Markers in the skeleton are one-key JSON objects:
    {"__tensor__": name}                       a torch tensor
    {"__ndarray__": name, "dtype": "<u4", "shape": [...]}   numpy data stored as raw bytes
    {"__npscalar__": name, "dtype": "<f8"}     a numpy scalar (np.float64 ...)
    {"__tuple__": [...]}                       a tuple
    {"__dict__": [[key, value], ...]}          a dict whose keys are not all plain strings
    {"__float__": "nan" | "inf" | "-inf"}      a non-finite float
"""
from __future__ import annotations

import math

import numpy as np
import torch

MARKERS = ("__tensor__", "__ndarray__", "__npscalar__", "__tuple__", "__dict__", "__float__")


class _Flattener:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.storages: set[int] = set()

    def _add(self, path: str, tensor: torch.Tensor) -> str:
        name, n = path or "root", 1
        while name in self.tensors:  # distinct keys can print alike (1 and "1")
            name, n = f"{path}#{n}", n + 1
        t = tensor.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing memory (tied weights, views): give repeats their own copy
        if ptr in self.storages or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel():
            self.storages.add(t.untyped_storage().data_ptr())
        self.tensors[name] = t
        return name

    def walk(self, obj, path: str):
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self._add(path, obj)}
        if isinstance(obj, np.ndarray):
            return self._numpy(obj, path, "__ndarray__")
        if isinstance(obj, np.generic):
            return self._numpy(np.asarray(obj), path, "__npscalar__")
        if isinstance(obj, tuple):
            return {"__tuple__": [self.walk(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            return self._dict(obj, path)
        raise TypeError(f"cannot checkpoint {type(obj).__name__} at '{path or '/'}': only tensors, numpy "
                        "arrays, dict/list/tuple, int/float/str/bool and None are stored (nothing is pickled)")

    def _numpy(self, arr: np.ndarray, path: str, marker: str) -> dict:
        if arr.dtype.hasobject or arr.dtype.fields is not None:
            raise TypeError(f"cannot checkpoint numpy dtype {arr.dtype} at '{path}': only plain numeric arrays")
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        out = {marker: self._add(path, torch.from_numpy(raw.copy())), "dtype": arr.dtype.str}
        if marker == "__ndarray__":
            out["shape"] = list(arr.shape)
        return out

    def _dict(self, obj: dict, path: str):
        if any(isinstance(k, (torch.Tensor, np.ndarray)) for k in obj):
            raise TypeError(f"cannot checkpoint a dict keyed by arrays at '{path or '/'}'")
        if all(isinstance(k, str) and k not in MARKERS for k in obj):
            return {k: self.walk(v, f"{path}/{k}") for k, v in obj.items()}
        return {"__dict__": [[self.walk(k, f"{path}/key"), self.walk(v, f"{path}/{k}")] for k, v in obj.items()]}


def flatten(obj) -> tuple[dict[str, torch.Tensor], object]:
    """(tensors by name, JSON-able skeleton) for a nested state.

    The tensors are CPU, contiguous and share no memory with each other (as
    safetensors requires); CPU inputs are not copied, so they may alias `obj`.
    """
    f = _Flattener()
    skeleton = f.walk(obj, "")
    return f.tensors, skeleton


def _tensor(tensors: dict, name: str) -> torch.Tensor:
    if name not in tensors:
        raise KeyError(f"checkpoint skeleton refers to tensor '{name}', which is not in the tensor file")
    return tensors[name]


def _marker(tensors: dict, node: dict):
    if "__tensor__" in node:
        return _tensor(tensors, node["__tensor__"])
    if "__ndarray__" in node or "__npscalar__" in node:
        name = node.get("__ndarray__", node.get("__npscalar__"))
        raw = _tensor(tensors, name).numpy().tobytes()
        arr = np.frombuffer(raw, dtype=np.dtype(node["dtype"])).copy()
        return arr.reshape(node["shape"]) if "__ndarray__" in node else arr.reshape(())[()]
    if "__tuple__" in node:
        return tuple(unflatten(tensors, v) for v in node["__tuple__"])
    if "__dict__" in node:
        return {unflatten(tensors, k): unflatten(tensors, v) for k, v in node["__dict__"]}
    return float(node["__float__"])


def unflatten(tensors: dict[str, torch.Tensor], skeleton):
    """Rebuild the object `flatten` split into (tensors, skeleton)."""
    if isinstance(skeleton, list):
        return [unflatten(tensors, v) for v in skeleton]
    if isinstance(skeleton, dict):
        if skeleton and next(iter(skeleton)) in MARKERS:
            return _marker(tensors, skeleton)
        return {k: unflatten(tensors, v) for k, v in skeleton.items()}
    return skeleton
