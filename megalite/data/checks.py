"""Pre-flight checks of the data a config names: (cheaply) its files and its tokenizer.

A missing or broken dataset, or a tokenizer bigger than the model's vocabulary,
must fail in seconds with the key, the value and the fix, not after process
groups, the model and the optimizer exist. The checks open each PREFIX.idx
(its header, then its arrays against the size of PREFIX.bin: a truncated token
file or an index of another dtype fails here) and load the tokenizer named by
data.tokenizer_model. Token ids are checked against model.vocab_size as
data.token_check says: about a million sampled tokens per file by default,
every token with 'all'.
megalite.preflight runs them after the config's own rules (config.validate) pass.
"""
from __future__ import annotations

import os

from megalite.config import Config, parse_data_path, split_blend_string, split_weights, splits_in_use
from megalite.config.validation import SPLITS
from megalite.data.gpt_dataset import split_document_ranges
from megalite.data.indexed import (
    IndexedDataset,
    IndexFileError,
    bin_path,
    first_token_at_or_above,
    idx_path,
    read_header,
)
from megalite.data.tokenizer import TOKENIZER_TYPES, build_tokenizer


def index_document_count(prefix: str) -> int:
    """Documents in PREFIX.idx from its header alone; IndexFileError names what is wrong.

    Also opens PREFIX.bin (not read) and checks it holds whole tokens of the
    index's dtype. Cost: one header read and two stats, whatever the size.
    """
    idx, binf = idx_path(prefix), bin_path(prefix)
    try:
        dtype, _, n_docs = read_header(idx)
    except OSError as e:
        raise IndexFileError(f"index file {idx} cannot be opened ({e.strerror})") from None
    if n_docs < 1:
        raise IndexFileError(f"{idx} has no document indices; the index is corrupt")
    try:
        with open(binf, "rb") as f:
            bin_size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise IndexFileError(f"token file {binf} cannot be opened ({e.strerror})") from None
    itemsize = dtype.itemsize
    if bin_size % itemsize:
        raise IndexFileError(f"{binf} is {bin_size} bytes, not a whole number of {itemsize}-byte tokens; "
                             "it is truncated or corrupt")
    return int(n_docs) - 1


def _prefix_fix(prefix: str) -> str:
    if prefix.endswith((".bin", ".idx")) and os.path.exists(idx_path(prefix[:-4])):
        return f"drop the extension: a prefix names both files, e.g. {prefix[:-4]!r}"
    if split_blend_string([prefix]) != [prefix]:
        return (f"it looks like Megatron's space-separated blend: give it as a list, "
                f"{split_blend_string([prefix])} (load_config splits such a string itself)")
    return ("create it with `megalite preprocess` (it writes OUTPUT_PREFIX_text_document.bin/.idx) "
            "or fix the path")


def check_data(cfg: Config, err) -> None:
    """The files data.path names and the tokenizer data.tokenizer_model names (config already valid)."""
    if cfg.data.path:
        check_data_files(cfg, parse_data_path(list(cfg.data.path))[0], err)
    check_tokenizer_vocab(cfg, err)


def check_data_files(cfg: Config, prefixes: list[str], err) -> None:
    """Every prefix's .idx/.bin open with a sane header, and each split the run reads gets documents."""
    counts = {}
    for prefix in prefixes:
        try:
            counts[prefix] = index_document_count(prefix)
        except IndexFileError as e:
            err(f"data.path prefix {prefix!r}: {e}; {_prefix_fix(prefix)}")
            continue
        try:
            check_token_ids(IndexedDataset(prefix), cfg.model.vocab_size, cfg.data.token_check, err)
        except IndexFileError as e:
            err(f"data.path prefix {prefix!r}: {e}; re-create it with `megalite preprocess` (or restore both files)")
            del counts[prefix]
    weights = split_weights(cfg.data.split)
    if len(counts) < len(prefixes) or weights is None:
        return
    for name, why in splits_in_use(cfg).items():
        if weights[SPLITS.index(name)] == 0:
            continue  # reported by check_split_shares
        ranges = [split_document_ranges(cfg.data.split, n)[name] for n in counts.values()]
        if all(end <= start for start, end in ranges):
            held = ", ".join(f"{p}: {n}" for p, n in counts.items())
            err(f"data.split={cfg.data.split!r} leaves the {name} split without documents (documents per "
                f"data.path prefix: {held}), but {why}; raise its share in data.split or use more documents"
                f"{' (or set train.eval_interval=0)' if name == 'valid' else ''}")


def check_token_ids(ds: IndexedDataset, vocab_size: int, how: str, err) -> None:
    """Every token id the data holds (data.token_check='all') or a sample of them ('sample') is below
    model.vocab_size; an id at or above it would index past the embedding mid-run."""
    if how == "off":
        return
    found = first_token_at_or_above(ds, vocab_size, every=how == "all")
    if found is not None:
        token, document = found
        err(f"data.path prefix {ds.prefix!r} holds token id {token} (document {document}), but model.vocab_size="
            f"{vocab_size}: the data was tokenized for a bigger vocabulary; set model.vocab_size to the "
            "tokenizer's size (or more), or preprocess the data with this model's tokenizer")


def check_tokenizer_vocab(cfg: Config, err) -> None:
    """data.tokenizer_model loads, and its ids all fit in model.vocab_size."""
    d, m = cfg.data, cfg.model
    if not d.tokenizer_model or d.tokenizer_type not in TOKENIZER_TYPES:
        return
    try:
        vocab = build_tokenizer(d.tokenizer_type, d.tokenizer_model).vocab_size
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception for a broken tokenizer.json
        err(f"data.tokenizer_model={d.tokenizer_model!r} cannot be loaded as data.tokenizer_type="
            f"{d.tokenizer_type!r}: {e}")
        return
    if m.vocab_size < vocab:
        err(f"model.vocab_size={m.vocab_size} is smaller than the {vocab} tokens of data.tokenizer_model="
            f"{d.tokenizer_model!r}: ids up to {vocab - 1} would index past the embedding; set "
            f"model.vocab_size={vocab} (or more)")
