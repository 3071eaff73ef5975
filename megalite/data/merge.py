"""Merge many .bin/.idx pairs into one without re-tokenizing.

The .bin files are concatenated by streaming byte copy; the index arrays are
concatenated with each part's document indices shifted by the sequences
before it. The result is byte-identical to preprocessing the concatenated
corpus. Output is written under temporary names and renamed at the end (the
.idx last), so an interrupted merge leaves no readable partial pair.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence

import numpy as np

from megalite.data.indexed import IndexedDataset, bin_path, idx_path, write_index


def prefixes_in_dir(directory: str) -> list[str]:
    """Every PREFIX in `directory` with both PREFIX.bin and PREFIX.idx, sorted by name."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--input-dir {directory} is not a directory")
    names = sorted(n[:-4] for n in os.listdir(directory) if n.endswith(".idx"))
    prefixes = [os.path.join(directory, n) for n in names]
    missing = [p for p in prefixes if not os.path.exists(bin_path(p))]
    if missing:
        raise FileNotFoundError(f"{missing[0]}.idx has no matching .bin; remove it or restore the .bin")
    if not prefixes:
        raise FileNotFoundError(f"no .idx/.bin pairs found in {directory}")
    return prefixes


def merge_datasets(prefixes: Sequence[str], output_prefix: str, copy_chunk_bytes: int = 16 << 20) -> dict:
    """Concatenate the datasets at `prefixes` (in order) into output_prefix; returns counts.

    All inputs must share one token dtype; the output must not be one of them.
    """
    prefixes = [str(p) for p in prefixes]
    if not prefixes:
        raise ValueError("nothing to merge: pass at least one input prefix")
    out = os.path.abspath(str(output_prefix))
    if any(os.path.abspath(p) == out for p in prefixes):
        raise ValueError(f"output prefix {output_prefix} is also an input; choose another output prefix")
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every pair before writing anything
    dtype = datasets[0].dtype
    for p, ds in zip(prefixes, datasets):
        if ds.dtype != dtype:
            raise ValueError(f"{p} holds {ds.dtype} tokens but {prefixes[0]} holds {dtype}; datasets "
                             "of different dtypes cannot be merged (re-preprocess them with one tokenizer)")
    lengths, doc_indices = _merged_index(datasets)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp_bin, tmp_idx = bin_path(out) + ".tmp", idx_path(out) + ".tmp"
    try:
        with open(tmp_bin, "wb") as dst:
            for p in prefixes:
                with open(bin_path(p), "rb") as src:
                    shutil.copyfileobj(src, dst, copy_chunk_bytes)
            dst.flush()
            os.fsync(dst.fileno())
        write_index(tmp_idx, dtype, lengths, doc_indices)
        os.replace(tmp_bin, bin_path(out))
        os.replace(tmp_idx, idx_path(out))
    except BaseException:
        for tmp in (tmp_bin, tmp_idx):
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    return {"inputs": len(prefixes), "sequences": int(len(lengths)),
            "documents": int(len(doc_indices) - 1), "tokens": int(lengths.astype(np.int64).sum()),
            "dtype": str(dtype)}


def _merged_index(datasets: Sequence[IndexedDataset]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated sequence lengths and document indices (each part shifted by what precedes it)."""
    lengths = np.concatenate([ds.sequence_lengths for ds in datasets]).astype(np.int32)
    docs, offset = [np.zeros(1, np.int64)], 0
    for ds in datasets:
        docs.append(ds.document_indices[1:].astype(np.int64) + offset)
        offset += len(ds.sequence_lengths)
    return lengths, np.concatenate(docs)
