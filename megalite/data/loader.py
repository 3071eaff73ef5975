"""Glue from the data config to per-split datasets and per-rank DataLoaders."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader

from megalite.config import DataConfig, parse_data_path
from megalite.data.blend import BlendedDataset, constituent_sizes
from megalite.data.documents import document_ids
from megalite.data.gpt_dataset import SPLIT_NAMES, GPTDataset, split_document_ranges
from megalite.data.indexed import IndexedDataset
from megalite.data.sampler import DistributedBatchSampler


def build_datasets(data_cfg: DataConfig, num_samples: dict) -> dict:
    """{'train'|'valid'|'test': BlendedDataset or None}, each of num_samples[split] samples.

    Every prefix of data_cfg.path is split by data_cfg.split over its documents;
    a split's blend uses the prefixes that have documents in it (weights renormalized,
    with a warning when one is left out). A split asked for 0 samples, or with no
    documents anywhere, is None. Call on every rank: index arrays are built once
    (global rank 0) and cached.
    """
    prefixes, weights = parse_data_path(data_cfg.path)
    indexed = [IndexedDataset(p) for p in prefixes]
    ranges = [split_document_ranges(data_cfg.split, ds.num_documents) for ds in indexed]
    out = {}
    for split in SPLIT_NAMES:
        size = int(num_samples.get(split, 0))
        use = [d for d in range(len(prefixes)) if ranges[d][split][1] > ranges[d][split][0]]
        if size <= 0 or not use:
            out[split] = None
            continue
        if len(use) < len(prefixes):
            left_out = [prefixes[d] for d in range(len(prefixes)) if d not in use]
            warnings.warn(f"split {split!r} of data.split={data_cfg.split!r} holds no documents of {left_out}; "
                          "blending the other datasets only", stacklevel=2)
        w = [weights[d] for d in use]
        sizes = constituent_sizes([x / sum(w) for x in w], size)
        parts = [GPTDataset(indexed[d], data_cfg.seq_len, n, data_cfg.seed, ranges[d][split], data_cfg.cache_dir)
                 for d, n in zip(use, sizes)]
        out[split] = BlendedDataset(parts, w, size, data_cfg.cache_dir)
    return out


def collate_tokens(samples: list[dict], eod: int | None = None) -> dict:
    """Stack the samples' tokens into one LongTensor [micro_batch, seq_len + 1]; with `eod` (packed
    documents kept apart, data.reset_attention_mask) also the document ids of the inputs [micro, seq_len]."""
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    if eod is None:
        return {"tokens": tokens}
    return {"tokens": tokens, "doc_ids": document_ids(tokens[:, :-1], eod)}


def build_dataloader(dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1, consumed_samples: int = 0, num_workers: int = 0,
                     seed: int = 0, eod: int | None = None, first_sample: int = 0) -> DataLoader:
    """DataLoader of this dp rank's micro-batches, {"tokens": LongTensor [micro, seq_len + 1]} (and
    "doc_ids" [micro, seq_len] when `eod` is given, see collate_tokens).

    The trainer uses tokens[:, :-1] as inputs and tokens[:, 1:] as labels. `first_sample`: global
    batches counted from that sample on (a batch-size ramp rebuilds the loader where the size changes).
    The loader owns a torch.Generator seeded with `seed`: creating an iterator
    draws a worker base seed, and drawing it from the global torch RNG would
    shift dropout's random stream (a resumed run would then diverge).
    """
    if dataset is None:
        raise ValueError("this split has no dataset: data.split gives it no documents or it was asked for "
                         "0 samples; give it a positive share in data.split")
    sampler = DistributedBatchSampler(len(dataset), global_batch_size, micro_batch_size, dp_rank, dp_size,
                                      consumed_samples, first_sample)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=functools.partial(collate_tokens, eod=eod),
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      generator=torch.Generator().manual_seed(int(seed)))
