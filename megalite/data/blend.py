"""Blending several datasets by weight, deterministically and evenly.

Sample k of a BlendedDataset comes from dataset `dataset_index[k]`, as that
dataset's sample `dataset_sample_index[k]` (its running count). The choice is
greedy: among the datasets still below their target share (count < w * n after
n samples), take the one whose next sample is due soonest ((count + 1) / w).
This is Balinski and Young's quota method; it keeps every dataset's count among
the first n samples within one sample of w * n for every n. (Picking the largest
plain deficit w * n - count, Megatron's rule, can drift slightly past one.)
"""
from __future__ import annotations

import math
import os

import numpy as np

from megalite.data.gpt_dataset import CACHE_VERSION, _load, cache_key, cache_paths, cached_arrays

BLEND_NAMES = ("dataset_index", "dataset_sample_index")
SIZE_MARGIN = 0.005  # constituents are cut slightly longer than their exact share needs


def parse_data_path(path) -> tuple[list[str], list[float]]:
    """(prefixes, normalized weights) from ['0.3', 'A', '0.7', 'B'] or ['A'] (or ['A', 'B'], equal weights)."""
    items = [str(p) for p in ([path] if isinstance(path, (str, os.PathLike)) else path)]
    if not items:
        raise ValueError("data path is empty; give one prefix ['PREFIX'] or weighted prefixes "
                         "['0.3', 'PREFIX_A', '0.7', 'PREFIX_B']")
    if not _is_number(items[0]):
        prefixes, weights = items, [1.0] * len(items)
    else:
        prefixes, raw = items[1::2], items[0::2]
        if len(items) % 2 or any(not _is_number(w) for w in raw) or any(_is_number(p) for p in prefixes):
            raise ValueError(f"data path {items!r} must alternate weights and prefixes, "
                             "e.g. ['0.3', 'PREFIX_A', '0.7', 'PREFIX_B']")
        weights = [float(w) for w in raw]
        if any(not w > 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"data path weights {raw} must all be positive finite numbers")
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def constituent_sizes(weights, size: int, margin: float = SIZE_MARGIN) -> list[int]:
    """Samples to ask of each dataset: ceil(w * size * (1 + margin)) + 1 (the blend never needs more)."""
    return [int(math.ceil(w * size * (1 + margin))) + 1 for w in weights]


def blend_indices(weights, size: int) -> dict[str, np.ndarray]:
    """dataset_index and dataset_sample_index of the greedy quota blend (module docstring).

    A Python loop over samples with plain floats (no numpy per step); measured on
    a shared 2-core machine: 1e6 samples in 0.42 s for two datasets, 0.50 s for
    three, 1.0 s for eight. One dataset needs no loop. The result is cached.
    """
    w = [float(x) for x in weights]
    m = len(w)
    if m == 0 or any(not x > 0 for x in w):
        raise ValueError(f"weights {weights} must be a non-empty list of positive numbers")
    total = sum(w)
    w = [x / total for x in w]
    dtype = np.uint8 if m < 256 else np.int32
    if m == 1:
        return {"dataset_index": np.zeros(size, dtype), "dataset_sample_index": np.arange(size, dtype=np.int64)}
    choice = _quota_sequence(w, size)
    index = np.asarray(choice, dtype=dtype)
    sample_index = np.empty(size, dtype=np.int64)
    for d in range(m):  # a loop over datasets: each one's running count of its own samples
        where = np.flatnonzero(index == d)
        sample_index[where] = np.arange(len(where))
    return {"dataset_index": index, "dataset_sample_index": sample_index}


def _quota_sequence(w: list[float], size: int) -> list[int]:
    m = len(w)
    counts = [0] * m
    out = [0] * size
    for k in range(size):
        n = k + 1
        best, best_due = -1, math.inf
        for d in range(m):
            c = counts[d]
            if c < w[d] * n:  # below its share: may take this sample without exceeding ceil(w*n)
                due = (c + 1) / w[d]
                if due < best_due:
                    best, best_due = d, due
        if best < 0:  # only float rounding can leave nobody below share; take the most overdue
            best = min(range(m), key=lambda d: (counts[d] + 1) / w[d])
        counts[best] += 1
        out[k] = best
    return out


class BlendedDataset:
    """`size` samples drawn from `datasets` in proportion to `weights` (see the module docstring).

    Each constituent needs len() >= constituent_sizes(weights, size)[d], or at
    least the count the blend actually takes from it.
    """

    def __init__(self, datasets, weights, size: int, cache_dir: str | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"got {len(datasets)} datasets and {len(weights)} weights; give one weight each")
        total = float(sum(weights))
        self.datasets = list(datasets)
        self.weights = [float(x) / total for x in weights]
        self.size = int(size)
        self.cache_dir = cache_dir or self.datasets[0].cache_dir
        self.description = {"class": "BlendedDataset", "version": CACHE_VERSION, "size": self.size,
                            "weights": self.weights, "datasets": [d.cache_key for d in self.datasets]}
        arrays = cached_arrays(self.cache_dir, self.description, BLEND_NAMES,
                               lambda: blend_indices(self.weights, self.size))
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        self._check_sizes()

    def _check_sizes(self) -> None:
        if not self.size:
            return
        taken = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, need) in enumerate(zip(self.datasets, taken)):
            if len(ds) < need:
                raise ValueError(f"dataset {d} ({getattr(ds, 'prefix', ds)}) has {len(ds)} samples but the "
                                 f"blend takes {need}; build it with num_samples >= "
                                 f"{constituent_sizes(self.weights, self.size)[d]}")

    def __len__(self) -> int:
        return self.size

    def source(self, k: int) -> tuple[int, int]:
        """(dataset number, sample index inside that dataset) of blended sample k."""
        if not -self.size <= k < self.size:
            raise IndexError(f"sample {k} is out of range for {self.size} samples")
        k %= self.size
        return int(self.dataset_index[k]), int(self.dataset_sample_index[k])

    def __getitem__(self, k: int) -> dict:
        d, i = self.source(k)
        return self.datasets[d][i]

    def sample_documents(self, k: int) -> list[tuple[str, int, int, int]]:
        """(dataset prefix, document index, token offset, n tokens) pieces of sample k, in order."""
        d, i = self.source(k)
        ds = self.datasets[d]
        return [(ds.prefix, doc, off, n) for doc, off, n in ds.sample_documents(i)]

    def __getstate__(self):
        # Memory maps would pickle as full copies into DataLoader workers; reopen them there instead.
        state = dict(self.__dict__)
        state["dataset_index"] = state["dataset_sample_index"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        paths, _ = cache_paths(self.cache_dir, cache_key(self.description), BLEND_NAMES)
        self.dataset_index = _load(paths["dataset_index"])
        self.dataset_sample_index = _load(paths["dataset_sample_index"])
