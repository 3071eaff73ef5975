"""Which documents make up global batch K of a run? Single process, no cluster.

`inspect_batch` builds the datasets as the trainer does (same data path,
split, seq len, seed and index cache) and names, for every sample of global
batch K, the document pieces it is made of. The sample order is prefix-stable
(it does not depend on how many samples the run asked for), so global batch K
is what the trainer read at step K + 1, or fewer when the run skipped samples before it
(`skipped_note`: train.skip_samples and the ranges its rollbacks recorded). `settings` / `run_settings` take the
data and tokenizer settings from a run's resolved config.yaml; `format_pieces`
prints the answer. The command line is `megalite inspect` (megalite.cli.data).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megalite.data.indexed import IndexedDataset

# settings() keys whose values come from the run's config (or these defaults) unless given explicitly
SETTING_KEYS = ("data_path", "seq_len", "global_batch_size", "seed", "data_split", "cache_dir",
                "tokenizer_type", "tokenizer_model")
REQUIRED_KEYS = ("data_path", "seq_len", "global_batch_size")
# The index cache holds, per sample, its start (document, offset: 2 x int64) and its place in the shuffle
# (int64): megalite.data.gpt_dataset. An unbounded --batch must not write gigabytes without being asked.
INDEX_BYTES_PER_SAMPLE = 24
UNASKED_INDEX_BYTES = 1 << 30
DEFAULTS = {"seed": 1234, "data_split": "969,30,1", "cache_dir": None, "tokenizer_type": None,
            "tokenizer_model": None}


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
    """ids -> text with the given tokenizer, or None when no model is given.

    Unlike megalite.data.tokenizer.build_tokenizer it needs no end-of-document token (it only
    decodes). A missing model raises FileNotFoundError, one that does not load ValueError.
    """
    if not tokenizer_model:
        return None
    if tokenizer_type not in (None, "SentencePieceTokenizer", "HuggingFaceTokenizer"):
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} must be SentencePieceTokenizer or "
                         "HuggingFaceTokenizer")
    path = str(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer" and os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--tokenizer-model {path} not found")
    try:
        if tokenizer_type == "HuggingFaceTokenizer":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(path)
            return lambda ids: tok.decode([int(i) for i in ids])
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=path)
        return lambda ids: sp.decode([int(i) for i in ids])
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError, tokenizers a plain Exception
        raise ValueError(f"--tokenizer-model {path} cannot be loaded as {tokenizer_type or 'SentencePieceTokenizer'}: "
                         f"{e}") from e


def _preview(tokens: np.ndarray, decode, words: int) -> str:
    if decode is None:
        return " ".join(str(int(t)) for t in tokens[:words])
    return " ".join(decode(tokens).split()[:words])


def inspect_batch(data_path, seq_len: int, global_batch_size: int, batch: int, split: str = "train",
                  seed: int = 1234, train_samples: int | None = None, data_split: str = "969,30,1",
                  cache_dir: str | None = None, decode=None, words: int = 8,
                  run_samples: dict | None = None) -> list[Piece]:
    """The document pieces of every sample of global batch `batch`, in batch order.

    Builds the datasets as the trainer does (same split, seed, cache), asking
    `split` for `train_samples` samples (default: just enough for this batch;
    the order is prefix-stable, so any larger count gives the same answer).
    `run_samples` (split -> samples the run reads, from its config) bounds `batch`.
    """
    from megalite.config import DataConfig
    from megalite.data.loader import build_datasets

    total = samples_to_index(batch, global_batch_size, split, train_samples, run_samples)
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


def samples_to_index(batch: int, global_batch_size: int, split: str, train_samples: int | None,
                     run_samples: dict | None) -> int:
    """How many samples to build the index for, so that global batch `batch` is in it; ValueError when
    the batch is one the run never reads, or (no run to say) its index would be bigger than a GiB of cache
    without --train-samples asking for it."""
    if batch < 0 or global_batch_size <= 0:
        raise ValueError(f"--batch {batch} must be >= 0 and --global-batch-size {global_batch_size} > 0")
    needed = (batch + 1) * global_batch_size
    if run_samples is not None and needed > run_samples.get(split, needed):
        batches = run_samples[split] // global_batch_size
        raise ValueError(f"--batch {batch}: the run reads {batches} global batches of the {split} split (0 to "
                         f"{batches - 1}); ask for one of them")
    if train_samples is None:
        if needed * INDEX_BYTES_PER_SAMPLE > UNASKED_INDEX_BYTES and run_samples is None:
            raise ValueError(f"--batch {batch} needs an index of {needed:,} samples (about "
                             f"{needed * INDEX_BYTES_PER_SAMPLE / 2**30:.1f} GiB of cache); give --run-dir so the "
                             f"run bounds it, or --train-samples {needed} to build it anyway")
        return needed
    if train_samples < needed:
        raise ValueError(f"--train-samples {train_samples} is too few for global batch {batch} of "
                         f"{global_batch_size} (needs {needed})")
    return int(train_samples)


def run_settings(run_dir: str | None = None, config: str | None = None) -> dict:
    """inspect_batch's keyword arguments (data and tokenizer) from a run directory's or a config's YAML."""
    from megalite.config import load_config, samples_per_split

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
            "tokenizer_type": d.tokenizer_type, "tokenizer_model": d.tokenizer_model,
            "run_samples": samples_per_split(cfg)}


def settings(run_dir: str | None = None, config: str | None = None, **given) -> dict:
    """The run's settings (run_dir / config, else DEFAULTS), overridden by the `given` ones that are not None.

    `given` holds SETTING_KEYS (data_path=..., seq_len=..., ...); "run_samples" is what the run reads
    of each split (None without a run). Raises ValueError when data_path,
    seq_len or global_batch_size is known from neither.
    """
    unknown = set(given) - set(SETTING_KEYS)
    if unknown:
        raise TypeError(f"settings() got unknown keys {sorted(unknown)}; known: {', '.join(SETTING_KEYS)}")
    base = run_settings(run_dir, config) if run_dir or config else {**DEFAULTS, "run_samples": None}
    base.update({key: value for key, value in given.items() if value is not None})
    missing = [f"--{k.replace('_', '-')}" for k in REQUIRED_KEYS if not base.get(k)]
    if missing:
        raise ValueError(f"give {', '.join(missing)}, or --run-dir RUN to read them from RUN/config.yaml")
    return base


def warmup_note(run_dir: str | None, config: str | None, batch: int, seq_len: int) -> str | None:
    """How step batch + 1 of the run cut its samples under data.seq_len_schedule, or None where it did not."""
    if not (run_dir or config):
        return None
    from megalite.config import load_config, seq_len_at

    schedule = list(load_config(config or os.path.join(run_dir, "config.yaml")).data.seq_len_schedule)
    length = seq_len_at(schedule, seq_len, batch + 1)
    if length == seq_len:
        return None
    return (f"step {batch + 1} trained on sequences of {length} tokens (data.seq_len_schedule {schedule}): each "
            f"sample above was cut into {seq_len // length} consecutive sequences of {length}")


def skipped_ranges(run_dir: str | None, config: str | None) -> list[tuple[int, int]]:
    """The training order's sample ranges the run skipped: train.skip_samples and its rollbacks' record
    (run_dir/skipped_samples.json, megalite.stability)."""
    if not (run_dir or config):
        return []
    import json

    from megalite.config import load_config
    from megalite.config.skip_samples import parse_skip_samples

    t = load_config(config or os.path.join(run_dir, "config.yaml")).train
    ranges = set(parse_skip_samples(t.skip_samples, t.global_batch_size))
    record = os.path.join(run_dir, "skipped_samples.json") if run_dir else None
    if record and os.path.isfile(record):
        with open(record) as f:
            ranges |= {(int(a), int(b)) for a, b in json.load(f)}
    return sorted(ranges)


def skipped_note(ranges: list[tuple[int, int]], batch: int, global_batch_size: int) -> str | None:
    """Whether global batch `batch` was trained on, and at which step, when the run skipped samples."""
    if not ranges:
        return None
    start = batch * global_batch_size
    listed = ", ".join(f"[{a}, {b})" for a, b in ranges)
    if any(a <= start < b for a, b in ranges):
        return f"no step trained on global batch {batch}: the run skipped samples {listed}"
    before = sum(max(0, min(b, start) - a) for a, b in ranges) // global_batch_size
    return f"step {batch + 1 - before} trained on global batch {batch} (the run skipped samples {listed})"


def format_pieces(pieces: list[Piece]) -> str:
    """One line per document piece: sample, dataset, document, offset, tokens, first words."""
    lines = [f"{'sample':>9} {'pos':>4}  {'dataset':<28} {'document':>9} {'offset':>7} {'tokens':>6}  first words"]
    for p in pieces:
        name = os.path.basename(p.prefix)
        lines.append(f"{p.sample:>9} {p.position:>4}  {name:<28} {p.document:>9} {p.offset:>7} "
                     f"{p.num_tokens:>6}  {p.text!r}")
    return "\n".join(lines)
