"""Megatron's indexed token format: PREFIX.bin (tokens) + PREFIX.idx (index).

Byte-compatible with Megatron-Core's IndexedDataset in both directions. The
.idx file is, little-endian:

    magic      9 bytes  b"MMIDIDX\\x00\\x00"
    version    uint64   1
    dtype      uint8    code of the token dtype (DTYPES below)
    n_seqs     uint64   number of sequences
    n_docs     uint64   length of document_indices (documents + 1)
    sequence_lengths   int32[n_seqs]   tokens per sequence
    sequence_pointers  int64[n_seqs]   byte offset of each sequence in .bin
    document_indices   int64[n_docs]   first sequence of each document, then n_seqs

A document holds one or more sequences (usually one); an empty document holds
none, so two neighbouring document_indices are equal.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
          6: np.float64, 7: np.float32, 8: np.uint16}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class IndexFileError(ValueError):
    """A .bin/.idx pair that is missing, truncated or inconsistent."""


def optimal_dtype(vocab_size: int) -> type:
    """uint16 when every token id fits (Megatron's rule, with its margin), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx"


def write_index(path, dtype, sequence_lengths, document_indices) -> None:
    """Write an .idx file for sequences stored back to back in the .bin file."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(docs.tobytes(order="C"))


def make_parent(prefix: str) -> None:
    """Create the directory PREFIX.bin goes into; a file in the way is bad input, named as such."""
    parent = Path(prefix).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in (parent, *parent.parents) if p.exists() and not p.is_dir())
        raise ValueError(f"cannot write {prefix}.bin: {blocker} is a file, not a directory; choose another "
                         "output prefix") from None


class IndexedDatasetWriter:
    """Streams documents to PREFIX.bin/.idx, atomically.

    Both files are written under temporary names and renamed by `finalize()`,
    the .idx last, so an interrupted run never leaves a readable partial pair.
    Use as a context manager: leaving the block normally finalizes; leaving it
    with an exception removes the temporaries.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no code in the Megatron format; use one of "
                             f"{sorted(str(d) for d in DTYPE_CODES)}")
        make_parent(self.prefix)
        self._tmp_bin = bin_path(self.prefix) + ".tmp"
        self._tmp_idx = idx_path(self.prefix) + ".tmp"
        self._bin = open(self._tmp_bin, "wb")
        # Index arrays grow a chunk at a time as numpy arrays (4-8 bytes per entry), not as
        # Python lists of ints (~36 bytes each): billions of documents must fit in memory.
        self._lengths: list[np.ndarray] = []
        self._doc_ends: list[np.ndarray] = [np.zeros(1, np.int64)]
        self._num_sequences = 0

    def add_document(self, tokens, lengths=None) -> None:
        """Append one document; `lengths` splits it into sequences (default: one)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        if lengths is None:
            lengths = [len(arr)] if len(arr) else []
        self.add_raw(arr.tobytes(order="C"), lengths, [len(lengths)])

    def add_raw(self, token_bytes: bytes, sequence_lengths, document_ends) -> None:
        """Append many documents at once from already-encoded bytes.

        `document_ends` are this batch's document boundaries as counts of its
        own sequences (as document_indices[1:] would be for the batch alone).
        """
        self._bin.write(token_bytes)
        lengths = np.asarray(sequence_lengths, dtype=np.int32).reshape(-1)
        self._lengths.append(lengths)
        self._doc_ends.append(self._num_sequences + np.asarray(document_ends, dtype=np.int64).reshape(-1))
        self._num_sequences += len(lengths)

    @property
    def sequence_lengths(self) -> np.ndarray:
        return np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)

    @property
    def document_indices(self) -> np.ndarray:
        return np.concatenate(self._doc_ends)

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        write_index(self._tmp_idx, self.dtype, self.sequence_lengths, self.document_indices)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))

    def abort(self) -> None:
        self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False


def read_header(path: str) -> tuple[np.dtype, int, int]:
    """(dtype, sequence count, document-index count) of an .idx, its header checked against its size."""
    if not os.path.exists(path):
        raise IndexFileError(f"{path} cannot be opened: index file not found")
    size = os.path.getsize(path)
    if size < HEADER_SIZE:
        raise IndexFileError(f"{path}: {size} bytes is shorter than the {HEADER_SIZE}-byte header; "
                             "not a Megatron index file")
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[:9] != MAGIC:
        raise IndexFileError(f"{path}: bad magic {head[:9]!r}, expected {MAGIC!r}; not a Megatron index file")
    version, code, n_seqs, n_docs = struct.unpack("<QBQQ", head[9:])
    if version != VERSION:
        raise IndexFileError(f"{path}: version {version} is not supported (only {VERSION})")
    if code not in DTYPES:
        raise IndexFileError(f"{path}: unknown dtype code {code}; known codes are {sorted(DTYPES)}")
    need = HEADER_SIZE + n_seqs * (4 + 8) + n_docs * 8
    if size != need:
        raise IndexFileError(f"{path}: {size} bytes, but a header of {n_seqs} sequences and "
                             f"{n_docs} document indices needs {need}; the file is truncated or corrupt")
    return np.dtype(DTYPES[code]), n_seqs, n_docs


def read_index(path: str) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sequence_lengths, sequence_pointers, document_indices), validated, memory-mapped."""
    dtype, n_seqs, n_docs = read_header(path)
    buf = np.memmap(path, mode="r", dtype=np.uint8)
    off = HEADER_SIZE
    lengths = np.frombuffer(buf, dtype=np.int32, count=n_seqs, offset=off)
    pointers = np.frombuffer(buf, dtype=np.int64, count=n_seqs, offset=off + 4 * n_seqs)
    docs = np.frombuffer(buf, dtype=np.int64, count=n_docs, offset=off + 12 * n_seqs)
    return dtype, lengths, pointers, docs


class IndexedDataset:
    """Memory-mapped, zero-copy reader of a PREFIX.bin/.idx pair.

    `ds[i]` is sequence i as a read-only numpy view; `ds[i:j]` a list of views;
    `ds.get(i, offset, length)` a slice of one sequence. Opening validates the
    index against itself and against the .bin size and names what is wrong.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        self.dtype, self.sequence_lengths, self.sequence_pointers, self.document_indices = \
            read_index(idx_path(self.prefix))
        self._validate()
        size = os.path.getsize(bin_path(self.prefix))
        self._bin = np.memmap(bin_path(self.prefix), mode="r", dtype=np.uint8) if size else np.zeros(0, np.uint8)

    def _validate(self) -> None:
        path, b = idx_path(self.prefix), bin_path(self.prefix)
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths) or np.any(np.diff(docs) < 0):
            raise IndexFileError(f"{path}: document indices must rise from 0 to the sequence count "
                                 f"{len(lengths)}; the index is corrupt")
        if np.any(lengths < 0):
            raise IndexFileError(f"{path}: negative sequence length; the index is corrupt")
        if not os.path.exists(b):
            raise IndexFileError(f"{b}: token file not found (its index {path} exists)")
        itemsize = self.dtype.itemsize
        expected = int(lengths.astype(np.int64).sum()) * itemsize
        if len(lengths):
            ends = pointers + lengths.astype(np.int64) * itemsize
            if pointers[0] != 0 or np.any(pointers[1:] != ends[:-1]):
                raise IndexFileError(f"{path}: sequence pointers do not follow the sequence lengths of "
                                     f"{self.dtype} tokens; the index is corrupt, or its dtype is not the one "
                                     f"{b} was written with")
        actual = os.path.getsize(b)
        if actual != expected:
            raise IndexFileError(f"{b}: {actual} bytes, but its index {path} describes {expected}; "
                                 "the pair is truncated or mismatched")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.astype(np.int64).sum())

    def flat_tokens(self) -> np.ndarray:
        """Every token of the file back to back, as one read-only memory-mapped view (nothing is read yet)."""
        return np.frombuffer(self._bin, dtype=self.dtype, count=self.num_tokens)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence idx (to its end when length is None)."""
        n = int(self.sequence_lengths[idx])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"slice [{offset}, {offset + length}) is outside sequence {idx} of length {n}")
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} is out of range for {len(self)} sequences")
        return self.get(idx)

    def document_tokens(self, doc: int) -> np.ndarray:
        """All tokens of document `doc`, its sequences concatenated (a copy unless one sequence)."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if last - first == 1:
            return self.get(first)
        parts = [self.get(i) for i in range(first, last)]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return os.path.exists(idx_path(prefix)) and os.path.exists(bin_path(prefix))


def first_token_at_or_above(ds: IndexedDataset, limit: int, every: bool = False,
                            windows: int = 64, window_tokens: int = 1 << 14) -> tuple[int, int] | None:
    """(token id, document) of a token id >= `limit` (or < 0) in `ds`, or None when none was found.

    every=False reads `windows` evenly spaced runs of `window_tokens` tokens (about a million in all,
    milliseconds whatever the file's size), so it finds a vocabulary mismatch (data tokenized for
    another model: bad ids everywhere) but may miss a rare bad id; every=True reads every token, in
    chunks of 16M.
    """
    total = ds.num_tokens
    if total == 0:
        return None
    tokens = ds.flat_tokens()
    step = 1 << 24
    if every or total <= windows * window_tokens:
        starts, width = range(0, total, step), step
    else:
        starts, width = np.linspace(0, total - window_tokens, windows).astype(np.int64), window_tokens
    for start in map(int, starts):
        run = tokens[start:start + width]
        bad = np.flatnonzero((run >= limit) | (run < 0))
        if len(bad):
            at = start + int(bad[0])
            sequence = int(np.searchsorted(ds.sequence_pointers, at * ds.dtype.itemsize, side="right")) - 1
            document = int(np.searchsorted(ds.document_indices, sequence, side="right")) - 1
            return int(run[bad[0]]), document
    return None
