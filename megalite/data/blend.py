"""Blending several datasets by weight, deterministically, evenly and prefix-stably.

Sample k of a BlendedDataset comes from dataset `dataset_index[k]`, as that
dataset's sample `dataset_sample_index[k]` (its running count). Every
dataset's count among the first n samples stays within one sample of w * n,
for every n, and the choice for sample n never depends on how many samples
were asked for: the blend of N samples is the first N of the blend of 2N.

How, vectorized: a binary tree over the datasets. The root hands sample n to
its left subtree when floor(s*n + 1/2) steps up (s: the left's share), so each
side's count is within 1/2 of its share; a deeper node splits *its own* arrivals
the same way, and its children's error is bounded by s*E + 1/2 (E: the node's
bound). A small dynamic program picks the tree that keeps every leaf's bound
below one. A closed form in n, so it is computed in chunks with numpy. When
no tree can guarantee it (rare: many datasets of very unequal weight), the
blend falls back to the sequential quota method: among the datasets still
below their share (count < w * n), take the one whose next sample is due
soonest ((count + 1) / w) (Balinski and Young; also within one sample, and
also prefix-stable, but a Python loop: ~0.4 s per million samples).
(Picking the largest plain deficit w * n - count, Megatron's rule, can drift
slightly past one.)
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from megalite.data.gpt_dataset import CACHE_VERSION, cache_key, cache_paths, cached_arrays, load_array

BLEND_NAMES = ("dataset_index", "dataset_sample_index")
SIZE_MARGIN = 0.005  # constituents are cut slightly longer than their exact share needs


def constituent_sizes(weights, size: int, margin: float = SIZE_MARGIN) -> list[int]:
    """Samples to ask of each dataset: ceil(w * size * (1 + margin)) + 1 (the blend never needs more)."""
    return [int(math.ceil(w * size * (1 + margin))) + 1 for w in weights]


def blend_indices(weights, size: int) -> dict[str, np.ndarray]:
    """dataset_index and dataset_sample_index of the blend (module docstring). Cached by the caller."""
    w = [float(x) for x in weights]
    m = len(w)
    if m == 0 or any(not x > 0 or not math.isfinite(x) for x in w):
        raise ValueError(f"weights {weights} must be a non-empty list of positive numbers")
    total = sum(w)
    w = [x / total for x in w]
    dtype = np.uint8 if m < 256 else np.int32
    if m == 1:
        return {"dataset_index": np.zeros(size, dtype), "dataset_sample_index": np.arange(size, dtype=np.int64)}
    tree = blend_tree(w)
    if tree is None:
        return _quota_indices(w, size, dtype)
    index, sample_index = np.empty(size, dtype), np.empty(size, dtype=np.int64)
    for lo in range(0, size, CHUNK):  # a closed form in n: chunks bound the memory, not the result
        hi = min(size, lo + CHUNK)
        index[lo:hi], sample_index[lo:hi] = route(tree, np.arange(lo + 1, hi + 1, dtype=np.int64))
    return {"dataset_index": index, "dataset_sample_index": sample_index}


CHUNK = 1 << 22
SUBSET_SEARCH_MAX = 10   # every split of every subset: 3^m / 2 candidates
SORTED_SEARCH_MAX = 64   # splits of the weight-sorted order only: m^3 / 6 candidates


def blend_tree(w: list[float]):
    """A tree (leaf: dataset number; node: (left, right, left's share)) whose every leaf stays within one
    sample of its share, or None when the search finds none. Deterministic in the weights alone."""
    m = len(w)
    if m <= SUBSET_SEARCH_MAX:
        groups = _TreeSearch(w, tuple(range(m)), sorted_splits=False)
    elif m <= SORTED_SEARCH_MAX:
        groups = _TreeSearch(w, tuple(sorted(range(m), key=lambda d: (w[d], d))), sorted_splits=True)
    else:
        return None
    threshold, tree = groups.best(groups.root)
    return tree if threshold > 1e-9 else None  # the root's error is 0: it needs a positive threshold


class _TreeSearch:
    """threshold(group): the largest error bound a node over `group` may have so that every leaf below it
    stays within one sample (a leaf: 1; a node: the best split's min over children of (T(child) - 1/2) / share)."""

    def __init__(self, w, order, sorted_splits: bool):
        self.w, self.root, self.sorted_splits, self.memo = w, order, sorted_splits, {}

    def _splits(self, group: tuple):
        if self.sorted_splits:  # contiguous cuts of the weight-sorted order
            yield from ((group[:k], group[k:]) for k in range(1, len(group)))
            return
        first, rest = group[0], group[1:]  # every partition once: the left part holds the first member
        for r in range(len(rest)):
            for chosen in itertools.combinations(rest, r):
                left = (first, *chosen)
                yield left, tuple(d for d in rest if d not in chosen)

    def best(self, group: tuple):
        if len(group) == 1:
            return 1.0, group[0]
        if group not in self.memo:
            total = sum(self.w[d] for d in group)
            found = (-math.inf, None)
            for left, right in self._splits(group):
                share = sum(self.w[d] for d in left) / total
                (t_left, tree_left), (t_right, tree_right) = self.best(left), self.best(right)
                t = min((t_left - 0.5) / share, (t_right - 0.5) / (1 - share))
                if t > found[0]:
                    found = (t, (tree_left, tree_right, share))
            self.memo[group] = found
        return self.memo[group]


def route(tree, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, that dataset's sample index) of blended samples n (1-based), through `tree`."""
    dataset, count = np.empty(len(n), dtype=np.int64), np.empty(len(n), dtype=np.int64)
    pending = [(tree, np.arange(len(n)), n)]  # (node, which samples, their arrival number at the node)
    while pending:
        node, where, arrival = pending.pop()
        if not isinstance(node, tuple):
            dataset[where], count[where] = node, arrival
            continue
        left, right, share = node
        left_count = np.floor(share * arrival + 0.5).astype(np.int64)
        to_left = left_count > np.floor(share * (arrival - 1) + 0.5).astype(np.int64)
        pending.append((left, where[to_left], left_count[to_left]))
        pending.append((right, where[~to_left], (arrival - left_count)[~to_left]))
    return dataset, count - 1


def _quota_indices(w: list[float], size: int, dtype) -> dict[str, np.ndarray]:
    index = np.asarray(_quota_sequence(w, size), dtype=dtype)
    sample_index = np.empty(size, dtype=np.int64)
    for d in range(len(w)):  # a loop over datasets: each one's running count of its own samples
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
        self.dataset_index = load_array(paths["dataset_index"])
        self.dataset_sample_index = load_array(paths["dataset_sample_index"])
