"""`megalite preprocess | train-tokenizer | merge | inspect | dedup`: the data commands, with Megatron-LM's flags.

Each command is an argument set (add_*_arguments), a handler that imports its work only when it
runs (so `--help` imports neither numpy nor torch) and a standalone `*_main(argv)` that the
Megatron-style wrappers in tools/ call, so `python tools/preprocess_data.py ...` and
`megalite preprocess ...` take the same flags and do the same thing. A bad input is one line on
stderr (megalite.cli.errors): exit code 2 for bad input, 1 for a run-time failure.
"""
from __future__ import annotations

import argparse
import os
import sys

from megalite.cli.errors import add_debug_argument, report_failures

PREPROCESS_DOC = """Tokenize a text corpus into Megatron .bin/.idx files (Megatron-LM's flags and output).

    megalite preprocess --input corpus/*.jsonl.gz --output-prefix data/web \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --json-keys text --append-eod --workers 16

writes data/web_text_document.bin/.idx, byte-identical to Megatron-LM's
preprocess_data.py with GPTSentencePieceTokenizer. Bad input lines (malformed or
too deeply nested JSON, missing or non-string key, invalid UTF-8 or a lone
surrogate escape like "\\ud800", truncated .gz) are skipped and counted with
their first file:line; --strict makes any of them fatal. Empty documents are
kept (no sequence, as Megatron does) and reported with their first file:line.
"""

TRAIN_TOKENIZER_DOC = """Train a SentencePiece tokenizer on a (sampled) corpus.

    megalite train-tokenizer --input corpus/*.jsonl.gz --output-prefix tok \\
        --vocab-size 32000 --model-type bpe --byte-fallback

writes tok.model and tok.vocab (text kept exactly: no normalization, whitespace
and newlines preserved, digits split). The corpus is streamed once and sampled
uniformly over documents, keeping at most --max-sentences of them and --max-mb
of text, so neither the corpus nor a few huge documents have to fit in memory.
Bad input lines (as in `megalite preprocess`) are skipped and counted with their
first file:line; --strict makes them fatal. Ids: unk 0, <s> 1, </s> 2 (end of
document), <pad> 3.
"""

MERGE_DOC = """Merge Megatron .bin/.idx pairs into one, without re-tokenizing.

    megalite merge --input data/part0_text_document data/part1_text_document \\
        --output-prefix data/all_text_document
    megalite merge --input-dir data/parts --output-prefix data/all_text_document

Inputs are merged in the order given (--input-dir: sorted by name). The result
equals preprocessing the concatenated corpus, byte for byte.
"""

INSPECT_DOC = """Which documents make up global batch K of a run? Single process, no cluster.

    megalite inspect --data-path 0.3 A_text_document 0.7 B_text_document \\
        --seq-len 2048 --global-batch-size 512 --batch 1200 --train-samples 512000 \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model

    megalite inspect --run-dir runs/my_run --batch 1200

With --run-dir (or --config RUN/config.yaml, or a checkpoint step directory's
config.yaml) the data path, split, seq len, global batch size, seed, cache and
tokenizer come from the run's resolved config; flags given as well override
them. The sample order is prefix-stable (it does not depend on how many
samples the run asked for), so global batch K is what the trainer read at
step K + 1. Index arrays come from (or go to) the same cache the run uses.
"""

DEDUP_DOC = """Remove exact and near-duplicate documents from a jsonl / jsonl.gz corpus, before preprocessing.

    megalite dedup --input corpus/*.jsonl.gz --output clean.jsonl.gz --workers 16

Exact duplicates: equal texts after normalization (Unicode NFC, lowercase,
whitespace runs collapsed). Near duplicates: MinHash (datasketch) of the word
5-gram shingles (--ngram, --char-ngrams) with LSH banding; a document whose
estimated Jaccard with an earlier kept one is >= --threshold is removed, so
each cluster keeps its first document in input order. --bands/--rows default
to datasketch's optimum for the threshold and --num-perm. Kept lines are
written unchanged (.gz output: gzip). Bad lines (invalid JSON, missing or
non-string key, ...) are skipped and counted. The JSON report (--report,
default OUTPUT_BASE.dedup_report.json) has the counts and the first pairs with
their estimated and true Jaccard. Needs datasketch: pip install "megalite[dedup]".
"""


def add_commands(sub) -> None:
    """Register preprocess, train-tokenizer, merge, inspect and dedup on the top-level subparsers `sub`."""
    for name, help_, doc, add_arguments, handler in (
            ("preprocess", "tokenize a corpus into Megatron .bin/.idx files", PREPROCESS_DOC,
             add_preprocess_arguments, preprocess_command),
            ("train-tokenizer", "train a SentencePiece tokenizer on a sampled corpus", TRAIN_TOKENIZER_DOC,
             add_train_tokenizer_arguments, train_tokenizer_command),
            ("merge", "merge .bin/.idx datasets into one without re-tokenizing", MERGE_DOC,
             add_merge_arguments, merge_command),
            ("inspect", "name the documents of global batch K of a run", INSPECT_DOC,
             add_inspect_arguments, inspect_command),
            ("dedup", "remove exact and near-duplicate documents from a jsonl corpus", DEDUP_DOC,
             add_dedup_arguments, dedup_command)):
        p = sub.add_parser(name, help=help_, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p)
        p.set_defaults(handler=handler)


def _standalone(doc: str, add_arguments, handler, argv) -> int:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    add_debug_argument(p)
    args = p.parse_args(argv)
    return report_failures(lambda: handler(args), args.debug)


# ---- preprocess -------------------------------------------------------------------------------------

def add_preprocess_arguments(p: argparse.ArgumentParser) -> None:
    from megalite.data.tokenizer import TOKENIZER_TYPES  # a light module: no numpy, no torch

    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl, .jsonl.gz or .txt files (one document per line), directories or globs")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_{KEY}_document.bin/.idx")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model or HF tokenizer.json")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize; one output per key")
    p.add_argument("--append-eod", action="store_true", help="end every non-empty document with EOD")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="encoding processes")
    p.add_argument("--log-interval", type=int, default=100_000, help="documents between progress lines")
    p.add_argument("--strict", action="store_true", help="fail on the first bad input instead of skipping it")
    p.add_argument("--chunk-mb", type=float, default=2.0, help="raw input per worker task, in MB")
    p.add_argument("--allow-empty", action="store_true",
                   help="write the output even when no document survives (else that is an error, exit code 2)")


def preprocess_command(args: argparse.Namespace) -> int:
    from megalite.data.preprocess import preprocess

    summary = preprocess(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                         json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
                         log_interval=args.log_interval, strict=args.strict,
                         chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))), allow_empty=args.allow_empty)
    print(summary.report(), file=sys.stderr)
    return 0


def preprocess_main(argv: list[str] | None = None) -> int:
    """`megalite preprocess` as a program of its own (tools/preprocess_data.py)."""
    return _standalone(PREPROCESS_DOC, add_preprocess_arguments, preprocess_command, argv)


# ---- train-tokenizer --------------------------------------------------------------------------------

def add_train_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    from megalite.data.tokenizer import DEFAULT_SAMPLE_BYTES

    p.add_argument("--input", nargs="+", required=True, help=".jsonl, .jsonl.gz or .txt files, dirs or globs")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--byte-fallback", action="store_true", help="unknown characters become byte tokens")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--user-defined-symbols", default="", help="comma-separated pieces kept whole, e.g. <tab>,<code>")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--max-sentences", type=int, default=1_000_000, help="documents sampled for training")
    p.add_argument("--max-mb", type=float, default=DEFAULT_SAMPLE_BYTES / (1 << 20),
                   help="MB (MiB) of text the sample may hold in memory, whatever the documents' sizes")
    p.add_argument("--strict", action="store_true", help="fail on the first bad input instead of skipping it")
    p.add_argument("--max-sentence-length", type=int, default=4192, help="bytes; longer lines are cut")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--normalization", default="identity", choices=["identity", "nmt_nfkc", "nfkc"],
                   help="identity keeps text as is, so decoding gives back the exact input")
    p.add_argument("--no-split-digits", action="store_true", help="let digits merge into longer pieces")


def train_tokenizer_command(args: argparse.Namespace) -> int:
    from megalite.data.corpus import InputStats
    from megalite.data.tokenizer import train_sentencepiece

    symbols = [s for s in args.user_defined_symbols.split(",") if s]
    stats = InputStats()
    try:
        model = train_sentencepiece(args.input, args.output_prefix, args.vocab_size, model_type=args.model_type,
                                    json_keys=args.json_keys, byte_fallback=args.byte_fallback,
                                    character_coverage=args.character_coverage, user_defined_symbols=symbols,
                                    max_sentences=args.max_sentences, seed=args.seed,
                                    max_sentence_length=args.max_sentence_length,
                                    split_digits=not args.no_split_digits, normalization=args.normalization,
                                    max_bytes=max(1, int(args.max_mb * (1 << 20))), stats=stats,
                                    strict=args.strict)
    finally:  # what was skipped is worth knowing whether or not the training succeeded
        for line in InputStats(stats.skipped(), stats.first).lines():
            print(f"skipped {line}", file=sys.stderr)
    print(f"wrote {model}", file=sys.stderr)
    return 0


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    """`megalite train-tokenizer` as a program of its own (tools/train_tokenizer.py)."""
    return _standalone(TRAIN_TOKENIZER_DOC, add_train_tokenizer_arguments, train_tokenizer_command, argv)


# ---- merge ------------------------------------------------------------------------------------------

def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="dataset prefixes (PREFIX.bin + PREFIX.idx), in order")
    src.add_argument("--input-dir", help="merge every .bin/.idx pair in this directory, sorted by name")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")


def merge_command(args: argparse.Namespace) -> int:
    from megalite.data.merge import merge_datasets, prefixes_in_dir

    info = merge_datasets(args.input or prefixes_in_dir(args.input_dir), args.output_prefix)
    print(f"merged {info['inputs']} datasets: {info['documents']} documents, {info['sequences']} sequences, "
          f"{info['tokens']} {info['dtype']} tokens -> {args.output_prefix}.bin/.idx", file=sys.stderr)
    return 0


def merge_main(argv: list[str] | None = None) -> int:
    """`megalite merge` as a program of its own (tools/merge_datasets.py)."""
    return _standalone(MERGE_DOC, add_merge_arguments, merge_command, argv)


# ---- inspect ----------------------------------------------------------------------------------------

def add_inspect_arguments(ap: argparse.ArgumentParser) -> None:
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


def inspect_command(args: argparse.Namespace) -> int:
    from megalite.config.blend import parse_data_path
    from megalite.data.inspect import (
        SETTING_KEYS,
        format_pieces,
        inspect_batch,
        load_decoder,
        settings,
        skipped_note,
        skipped_ranges,
        warmup_note,
    )

    s = settings(args.run_dir, args.config, **{key: getattr(args, key) for key in SETTING_KEYS})
    parse_data_path(s["data_path"])  # fail early on a malformed path
    pieces = inspect_batch(s["data_path"], s["seq_len"], s["global_batch_size"], args.batch, args.split,
                           s["seed"], args.train_samples, s["data_split"], s["cache_dir"],
                           load_decoder(s["tokenizer_type"], s["tokenizer_model"]), args.words, s["run_samples"])
    print(format_pieces(pieces))
    if args.split == "train":
        notes = (skipped_note(skipped_ranges(args.run_dir, args.config), args.batch, s["global_batch_size"]),
                 warmup_note(args.run_dir, args.config, args.batch, s["seq_len"]))
        print("\n".join(note for note in notes if note), end="\n" if any(notes) else "")
    return 0


def inspect_main(argv: list[str] | None = None) -> int:
    """`megalite inspect` as a program of its own (tools/inspect_data.py)."""
    return _standalone(INSPECT_DOC, add_inspect_arguments, inspect_command, argv)


# ---- dedup ------------------------------------------------------------------------------------------

def add_dedup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl, .jsonl.gz or .txt files (one document per line), directories or globs")
    p.add_argument("--output", required=True, help="the kept lines, unchanged (.gz: gzip-compressed)")
    p.add_argument("--report", default=None, help="JSON report (default: beside the output)")
    p.add_argument("--json-key", default="text", help="the key holding each document's text")
    p.add_argument("--threshold", type=float, default=0.8, 
                   help="Jaccard similarity at which a document is a near duplicate")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--bands", type=int, default=None, help="LSH bands (default: datasketch's optimum)")
    p.add_argument("--rows", type=int, default=None, help="rows per band; bands * rows <= --num-perm")
    p.add_argument("--ngram", type=int, default=5, help="shingle length in words (characters with --char-ngrams)")
    p.add_argument("--char-ngrams", action="store_true", help="shingle by character n-grams instead of words")
    p.add_argument("--seed", type=int, default=1, help="MinHash permutation seed (same seed, same result)")
    p.add_argument("--exact-only", action="store_true", help="remove exact duplicates only (no MinHash)")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="signature processes")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="raw input per worker task, in MB")
    p.add_argument("--max-pairs", type=int, default=10, help="near-duplicate pairs listed in the report")


def dedup_command(args: argparse.Namespace) -> int:
    from megalite.data.dedup import DedupConfig, dedup, summary_line

    cfg = DedupConfig(json_key=args.json_key, threshold=args.threshold, num_perm=args.num_perm, bands=args.bands,
                      rows=args.rows, ngram=args.ngram, char_ngrams=args.char_ngrams, seed=args.seed,
                      exact_only=args.exact_only)
    report = dedup(args.input, args.output, cfg, report_path=args.report, workers=args.workers,
                   chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))), max_pairs=args.max_pairs)
    print(summary_line(report), file=sys.stderr)
    return 0


def dedup_main(argv: list[str] | None = None) -> int:
    """`megalite dedup` as a program of its own (tools/dedup_data.py)."""
    return _standalone(DEDUP_DOC, add_dedup_arguments, dedup_command, argv)
