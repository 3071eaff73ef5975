"""Fixed-length GPT samples packed across document boundaries (Megatron semantics).

The documents of one split (a contiguous range of document ids) are shuffled
once per epoch and laid end to end: the *document stream*. Sample j, in stream
order, is tokens [j*seq_len, j*seq_len + seq_len + 1) of that stream, so
neighbouring samples share one token (the last label of one is the first input
of the next). `ds[i]` is sample `shuffle_index[i]`: the sample order is
shuffled too, within each epoch (an epoch's samples are those whose last token
lies in it). As many whole epochs are laid down as `num_samples` needs.

The order is prefix-stable: every epoch's two shuffles are seeded by
(seed, epoch) alone, so the first N samples do not depend on how many more
were asked for. A run extended on resume (a larger train.steps) continues
with the samples the shorter run would never have reached, in the same order.

Three index arrays describe all of it, built vectorized with numpy and cached
on disk as .npy files named by a hash of everything they depend on:

    document_index  [epochs * docs]  document id at each position of the stream
    sample_index    [epoch_samples, 2]  (stream position, token offset in that document)
                                        where sample j starts, for every sample of the epochs
    shuffle_index   [samples]        stream-order sample behind ds[i] (num_samples of them)

Empty documents (no tokens) are left out of the stream: they contribute nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from typing import Callable

import numpy as np

from megalite.data.indexed import IndexedDataset, idx_path

SPLIT_NAMES = ("train", "valid", "test")
INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")
CACHE_VERSION = 2  # bump when the meaning of cached arrays changes


# ---------------------------------------------------------------- split
def split_document_ranges(split: str, num_documents: int) -> dict[str, tuple[int, int]]:
    """{'train': (start, end), 'valid': ..., 'test': ...} document ranges from weights like '969,30,1'.

    Weights are normalized; boundaries are the rounded cumulative shares, so the
    ranges partition [0, num_documents) and each is within one document of its share.
    Fewer than three weights leave the missing splits empty.
    """
    parts = [p.strip() for p in str(split).replace("/", ",").split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0 \
            or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"split={split!r} must be up to three non-negative numbers with a positive sum, "
                         "e.g. '969,30,1' (train, valid, test)")
    weights += [0.0] * (3 - len(weights))
    shares = np.cumsum(np.asarray(weights) / sum(weights))
    bounds = [0] + [int(math.floor(s * num_documents + 0.5)) for s in shares]
    bounds[-1] = num_documents  # float error must not lose or invent the last document
    return {name: (bounds[k], bounds[k + 1]) for k, name in enumerate(SPLIT_NAMES)}


def document_lengths(indexed: IndexedDataset) -> np.ndarray:
    """Tokens per document (its sequences summed), int64, without a loop over documents."""
    ends = np.zeros(len(indexed.sequence_lengths) + 1, dtype=np.int64)
    np.cumsum(indexed.sequence_lengths, out=ends[1:])
    return ends[indexed.document_indices[1:]] - ends[indexed.document_indices[:-1]]


# ---------------------------------------------------------------- index building
def _small_int(limit: int):
    return np.int32 if limit < 2**31 - 1 else np.int64


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """The generator of one epoch's document (stream 0) or sample (stream 1) shuffle: (seed, epoch) alone."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**63, epoch, stream]))


def samples_through(epochs: int, tokens_per_epoch: int, seq_len: int) -> int:
    """Samples whose last token lies in the first `epochs` epochs of the stream."""
    return max(0, (epochs * tokens_per_epoch - 1) // seq_len)


def build_gpt_indices(doc_ids: np.ndarray, doc_lengths: np.ndarray, seq_len: int,
                      num_samples: int | None, seed: int) -> dict[str, np.ndarray]:
    """The three index arrays (see the module docstring) for documents `doc_ids` of lengths `doc_lengths`.

    `num_samples=None` cuts one epoch. Prefix-stable: each epoch's document
    shuffle and its samples' shuffle are seeded by (seed, epoch) only, and an
    epoch's samples (those whose last token lies in it) are shuffled among
    themselves, so the first N samples are the same whatever total (>= N) is
    asked for, and a longer run sees the shorter run's samples first. Whole
    epochs are laid down (sample_index covers them); shuffle_index stops at
    num_samples. Vectorized: a loop over epochs, none over documents or samples.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be > 0")
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    keep = lengths > 0  # empty documents would only add zero-length stream entries
    ids, lengths = np.asarray(doc_ids)[keep], lengths[keep]
    tokens_per_epoch = int(lengths.sum())
    if num_samples is None:
        num_samples = samples_through(1, tokens_per_epoch, seq_len)
    if num_samples < 0:
        raise ValueError(f"num_samples={num_samples} must be >= 0")
    if num_samples > 0 and tokens_per_epoch == 0:
        raise ValueError(f"cannot cut {num_samples} samples: the {len(doc_ids)} documents hold no tokens; "
                         "give the split more documents (data.split) or use a larger dataset")
    # Smallest number of epochs whose stream holds num_samples samples of seq_len + 1 tokens.
    epochs = max(1, -(-(num_samples * seq_len + 1) // max(tokens_per_epoch, 1)))
    order = _document_order(len(ids), epochs, seed)
    document_index = ids.astype(_small_int(int(ids.max(initial=0)) + 1))[order]
    stream_ends = np.cumsum(lengths[order])  # end token of each stream position
    total = samples_through(epochs, tokens_per_epoch, seq_len)
    starts = np.arange(total, dtype=np.int64) * seq_len
    where = np.searchsorted(stream_ends, starts, side="right")  # first document ending after the start
    sample_index = np.empty((total, 2), dtype=np.int64)
    sample_index[:, 0] = where
    sample_index[:, 1] = starts - np.where(where > 0, stream_ends[where - 1], 0)
    shuffle_index = _sample_order(epochs, tokens_per_epoch, seq_len, num_samples, seed)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def _document_order(n: int, epochs: int, seed: int) -> np.ndarray:
    """Stream position -> document position: every epoch an independent shuffle of range(n)."""
    order = np.empty(epochs * n, dtype=_small_int(n))
    for epoch in range(epochs):
        order[epoch * n:(epoch + 1) * n] = _epoch_rng(seed, epoch, 0).permutation(n)
    return order


def _sample_order(epochs: int, tokens_per_epoch: int, seq_len: int, num_samples: int, seed: int) -> np.ndarray:
    """The first num_samples entries of: each epoch's samples, shuffled among themselves, epoch after epoch."""
    total = samples_through(epochs, tokens_per_epoch, seq_len)
    out = np.empty(total, dtype=_small_int(total))
    for epoch in range(epochs):
        first = samples_through(epoch, tokens_per_epoch, seq_len)
        last = samples_through(epoch + 1, tokens_per_epoch, seq_len)
        out[first:last] = first + _epoch_rng(seed, epoch, 1).permutation(last - first)
    return out[:num_samples]


# ---------------------------------------------------------------- cache
def cache_key(description: dict) -> str:
    """sha256 of the canonical JSON of `description`: equal inputs, equal key."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def default_cache_dir(prefix: str) -> str:
    """Where index arrays go when no cache_dir is set: a `cache/` folder beside the data."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")


def _save_atomic(path: str, write: Callable) -> None:
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)  # readers see the whole file or none of it
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_array(path: str) -> np.ndarray:
    """A cached index array, memory-mapped (read-only) where it can be."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # an empty array cannot be memory-mapped
        return np.load(path)


def cache_paths(cache_dir: str, key: str, names) -> tuple[dict[str, str], str]:
    """(.npy path per array name, path of the description .json written last)."""
    return ({name: os.path.join(cache_dir, f"{key}-{name}.npy") for name in names},
            os.path.join(cache_dir, f"{key}-description.json"))


def _build_and_save(cache_dir, key, description, names, build) -> None:
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the index cache folder {cache_dir!r} ({e}); "
                      "point data.cache_dir at a writable folder") from e
    arrays = build()
    paths, desc_path = cache_paths(cache_dir, key, names)
    for name in names:
        _save_atomic(paths[name], lambda f, a=arrays[name]: np.save(f, np.ascontiguousarray(a)))
    # The description goes last: its presence means every array is complete.
    _save_atomic(desc_path, lambda f: f.write(json.dumps(description, indent=1, sort_keys=True).encode()))


def cached_arrays(cache_dir: str, description: dict, names, build: Callable[[], dict]) -> dict[str, np.ndarray]:
    """Arrays `names` for `description`, from cache_dir or built by `build()` and cached.

    Under torch.distributed, global rank 0 builds while the others wait, then
    everybody loads; a rank that still finds no cache (a filesystem not shared
    with rank 0) builds its own copy.
    """
    import torch.distributed as dist

    key = cache_key(description)
    paths, desc_path = cache_paths(cache_dir, key, names)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        error = None
        if not os.path.exists(desc_path):
            try:
                _build_and_save(cache_dir, key, description, names, build)
            except Exception as e:  # noqa: BLE001 - the other ranks must hear of it, not hang
                error = e
        if distributed:
            dist.broadcast_object_list([None if error is None else repr(error)], src=0)
        if error is not None:
            raise error
    else:
        status = [None]
        dist.broadcast_object_list(status, src=0)  # also the barrier: rank 0 has finished
        if status[0] is not None:
            raise RuntimeError(f"rank 0 failed to build the index cache in {cache_dir}: {status[0]}")
        if not os.path.exists(desc_path):
            _build_and_save(cache_dir, key, description, names, build)
    return {name: load_array(paths[name]) for name in names}


# ---------------------------------------------------------------- dataset
class GPTDataset:
    """Samples of seq_len + 1 tokens from documents [start, end) of one IndexedDataset.

    `ds[i]` -> {"tokens": int64 [seq_len + 1]}; `sample_documents(i)` names the
    (document, offset, n_tokens) pieces it is made of; `packed_sample(j)` is
    sample j in stream (unshuffled) order.
    """

    def __init__(self, indexed: IndexedDataset | str, seq_len: int, num_samples: int | None = None,
                 seed: int = 1234, document_range: tuple[int, int] | None = None,
                 cache_dir: str | None = None):
        self.indexed = indexed if isinstance(indexed, IndexedDataset) else IndexedDataset(indexed)
        self.prefix = self.indexed.prefix
        self.seq_len = int(seq_len)
        start, end = document_range if document_range is not None else (0, self.indexed.num_documents)
        if not 0 <= start <= end <= self.indexed.num_documents:
            raise ValueError(f"document_range=({start}, {end}) must lie within the "
                             f"{self.indexed.num_documents} documents of {self.prefix}")
        self.document_range = (int(start), int(end))
        self.document_lengths = document_lengths(self.indexed)
        self.cache_dir = cache_dir or default_cache_dir(self.prefix)
        self.description = self._describe(num_samples, seed)
        self.cache_key = cache_key(self.description)
        self._arrays = cached_arrays(self.cache_dir, self.description, INDEX_NAMES, self._build)

    def _describe(self, num_samples, seed) -> dict:
        stat = os.stat(idx_path(self.prefix))
        return {"class": "GPTDataset", "version": CACHE_VERSION, "path": os.path.abspath(self.prefix),
                "idx_size": stat.st_size, "idx_mtime_ns": stat.st_mtime_ns,
                "document_range": list(self.document_range), "seq_len": self.seq_len,
                "num_samples": num_samples, "seed": int(seed)}

    def _build(self) -> dict:
        start, end = self.document_range
        num_samples = self.description["num_samples"]
        if num_samples and not self.document_lengths[start:end].any():
            raise ValueError(f"{self.prefix}: documents [{start}, {end}) hold no tokens, so {num_samples} "
                             "samples cannot be cut from them; give this split more documents (data.split)")
        return build_gpt_indices(np.arange(start, end), self.document_lengths[start:end], self.seq_len,
                                 self.description["num_samples"], self.description["seed"])

    @property
    def document_index(self) -> np.ndarray:
        return self._arrays["document_index"]

    @property
    def sample_index(self) -> np.ndarray:
        return self._arrays["sample_index"]

    @property
    def shuffle_index(self) -> np.ndarray:
        return self._arrays["shuffle_index"]

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def _stream_position(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} is out of range for {n} samples")
        return int(self.shuffle_index[i % n])

    def _pieces(self, j: int) -> list[tuple[int, int, int]]:
        """(document, offset, n_tokens) pieces of stream-order sample j."""
        pos, offset = (int(v) for v in self.sample_index[j])
        need, pieces = self.seq_len + 1, []
        while need > 0:
            doc = int(self.document_index[pos])
            take = min(int(self.document_lengths[doc]) - offset, need)
            pieces.append((doc, offset, take))
            need, pos, offset = need - take, pos + 1, 0
        return pieces

    def _read(self, doc: int, offset: int, length: int) -> np.ndarray:
        first, last = int(self.indexed.document_indices[doc]), int(self.indexed.document_indices[doc + 1])
        if last - first == 1:  # the usual case: one sequence, read just the slice
            return self.indexed.get(first, offset, length)
        return self.indexed.document_tokens(doc)[offset:offset + length]

    def _tokens(self, pieces) -> np.ndarray:
        return np.concatenate([self._read(*p) for p in pieces]).astype(np.int64)

    def packed_sample(self, j: int) -> dict:
        """Sample j in stream order (before the sample shuffle); j < len(sample_index)."""
        if not 0 <= j < len(self.sample_index):
            raise IndexError(f"stream sample {j} is out of range for {len(self.sample_index)} samples")
        return {"tokens": self._tokens(self._pieces(j))}

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self._tokens(self._pieces(self._stream_position(i)))}

    def sample_documents(self, i: int) -> list[tuple[int, int, int]]:
        """(document index, token offset in the document, n tokens) that make up ds[i], in order."""
        return self._pieces(self._stream_position(i))

    def __getstate__(self):
        # Memory maps would pickle as full copies into DataLoader workers; reopen them there instead.
        state = dict(self.__dict__)
        state["indexed"] = state["_arrays"] = state["document_lengths"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.indexed = IndexedDataset(self.prefix)
        self.document_lengths = document_lengths(self.indexed)
        paths, _ = cache_paths(self.cache_dir, self.cache_key, INDEX_NAMES)
        self._arrays = {name: load_array(p) for name, p in paths.items()}
