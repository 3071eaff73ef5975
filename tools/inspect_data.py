#!/usr/bin/env python
"""Which documents make up global batch K of a run? Single process, no cluster.

    python tools/inspect_data.py --data-path 0.3 A_text_document 0.7 B_text_document \\
        --seq-len 2048 --global-batch-size 512 --batch 1200 --train-samples 512000 \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model

    python tools/inspect_data.py --run-dir runs/my_run --batch 1200

With --run-dir (or --config RUN/config.yaml, or a checkpoint step directory's
config.yaml) the data path, split, seq len, global batch size, seed, cache and
tokenizer come from the run's resolved config; flags given as well override
them. The sample order is prefix-stable (it does not depend on how many
samples the run asked for), so global batch K is what the trainer read at
step K + 1. Index arrays come from (or go to) the same cache the run uses.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

from megalite.data.blend import parse_data_path
from megalite.data.indexed import IndexedDataset


@dataclass
class Piece:
    """One document piece inside one sample of the batch."""

    sample: int        # sample index in the run's order
    position: int      # position inside the global batch
    prefix: str        # dataset prefix
    document: int      # document index in that dataset
    offset: int        # first token's offset inside the document
    num_tokens: int    # tokens this document contributes to the sample
    text: str          # first words (decoded) or first token ids


def load_decoder(tokenizer_type: str | None, tokenizer_model: str | None):
    """ids -> text with the given tokenizer, or None when no model is given."""
    if not tokenizer_model:
        return None
    if tokenizer_type in (None, "SentencePieceTokenizer"):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
        return lambda ids: sp.decode([int(i) for i in ids])
    if tokenizer_type == "HuggingFaceTokenizer":
        from tokenizers import Tokenizer

        path = tokenizer_model
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        tok = Tokenizer.from_file(path)
        return lambda ids: tok.decode([int(i) for i in ids])
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} must be SentencePieceTokenizer or HuggingFaceTokenizer")


def _preview(tokens: np.ndarray, decode, words: int) -> str:
    if decode is None:
        return " ".join(str(int(t)) for t in tokens[:words])
    return " ".join(decode(tokens).split()[:words])


def inspect_batch(data_path, seq_len: int, global_batch_size: int, batch: int, split: str = "train",
                  seed: int = 1234, train_samples: int | None = None, data_split: str = "969,30,1",
                  cache_dir: str | None = None, decode=None, words: int = 8) -> list[Piece]:
    """The document pieces of every sample of global batch `batch`, in batch order.

    Builds the datasets as the trainer does (same split, seed, cache), asking
    `split` for `train_samples` samples (default: just enough for this batch;
    the order is prefix-stable, so any larger count gives the same answer).
    """
    from megalite.config import DataConfig
    from megalite.data.loader import build_datasets

    if batch < 0 or global_batch_size <= 0:
        raise ValueError(f"--batch {batch} must be >= 0 and --global-batch-size {global_batch_size} > 0")
    needed = (batch + 1) * global_batch_size
    total = needed if train_samples is None else int(train_samples)
    if total < needed:
        raise ValueError(f"--train-samples {total} is too few for global batch {batch} of "
                         f"{global_batch_size} (needs {needed})")
    cfg = DataConfig(path=list(data_path), split=data_split, seq_len=seq_len, seed=seed, cache_dir=cache_dir)
    ds = build_datasets(cfg, {split: total})[split]
    if ds is None:
        raise ValueError(f"split {split!r} has no documents under --data-split {data_split!r}")
    readers: dict[str, IndexedDataset] = {}
    pieces = []
    for position in range(global_batch_size):
        k = batch * global_batch_size + position
        for prefix, doc, offset, n in ds.sample_documents(k):
            reader = readers.setdefault(prefix, IndexedDataset(prefix))
            tokens = reader.document_tokens(doc)[offset:offset + min(n, 4 * words + 16)]
            pieces.append(Piece(k, position, prefix, doc, offset, n, _preview(tokens, decode, words)))
    return pieces


def run_settings(run_dir: str | None = None, config: str | None = None) -> dict:
    """inspect_batch's keyword arguments (data and tokenizer) from a run directory's or a config's YAML."""
    from megalite.config import load_config

    path = config if config else os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; give --run-dir the run directory (it holds config.yaml) "
                                "or --config the run's config.yaml")
    cfg = load_config(path)
    d = cfg.data
    if not d.path:
        raise ValueError(f"{path} has no data.path; pass --data-path")
    return {"data_path": list(d.path), "seq_len": d.seq_len, "global_batch_size": cfg.train.global_batch_size,
            "seed": d.seed, "data_split": d.split, "cache_dir": d.cache_dir,
            "tokenizer_type": d.tokenizer_type, "tokenizer_model": d.tokenizer_model}


def format_pieces(pieces: list[Piece]) -> str:
    """One line per document piece: sample, dataset, document, offset, tokens, first words."""
    lines = [f"{'sample':>9} {'pos':>4}  {'dataset':<28} {'document':>9} {'offset':>7} {'tokens':>6}  first words"]
    for p in pieces:
        name = os.path.basename(p.prefix)
        lines.append(f"{p.sample:>9} {p.position:>4}  {name:<28} {p.document:>9} {p.offset:>7} "
                     f"{p.num_tokens:>6}  {p.text!r}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--run-dir", default=None, help="a run directory: its config.yaml gives the settings")
    source.add_argument("--config", default=None, help="a run's config.yaml (e.g. one saved in a checkpoint)")
    ap.add_argument("--data-path", nargs="+", default=None, help="PREFIX, or weighted: 0.3 A 0.7 B")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--global-batch-size", type=int, default=None)
    ap.add_argument("--batch", type=int, required=True, help="global batch (optimizer step - 1) to show")
    ap.add_argument("--split", default="train", choices=("train", "valid", "test"))
    ap.add_argument("--data-split", default=None, help="train,valid,test document proportions (default 969,30,1)")
    ap.add_argument("--seed", type=int, default=None, help="the data seed (data.seed; default 1234)")
    ap.add_argument("--train-samples", type=int, default=None,
                    help="samples to build the index for; default: just enough (the order does not depend on it)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--tokenizer-type", default=None, choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"))
    ap.add_argument("--tokenizer-model", default=None)
    ap.add_argument("--words", type=int, default=8, help="words (or token ids) shown per document")
    return ap.parse_args(argv)


DEFAULTS = {"seed": 1234, "data_split": "969,30,1", "cache_dir": None, "tokenizer_type": None,
            "tokenizer_model": None}


def settings(args: argparse.Namespace) -> dict:
    """The run's settings (--run-dir/--config, else defaults), overridden by the flags given."""
    base = run_settings(args.run_dir, args.config) if args.run_dir or args.config else dict(DEFAULTS)
    for key in ("data_path", "seq_len", "global_batch_size", "seed", "data_split", "cache_dir",
                "tokenizer_type", "tokenizer_model"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    missing = [f"--{k.replace('_', '-')}" for k in ("data_path", "seq_len", "global_batch_size") if not base.get(k)]
    if missing:
        raise SystemExit(f"inspect_data: give {', '.join(missing)}, or --run-dir RUN to read them from "
                         "RUN/config.yaml")
    return base


def main(argv=None) -> int:
    args = parse_args(argv)
    s = settings(args)
    parse_data_path(s["data_path"])  # fail early on a malformed path
    pieces = inspect_batch(s["data_path"], s["seq_len"], s["global_batch_size"], args.batch, args.split,
                           s["seed"], args.train_samples, s["data_split"], s["cache_dir"],
                           load_decoder(s["tokenizer_type"], s["tokenizer_model"]), args.words)
    print(format_pieces(pieces))
    return 0


if __name__ == "__main__":
    sys.exit(main())
