#!/usr/bin/env python
"""Tokenize a text corpus into Megatron .bin/.idx files (Megatron-LM's flags and output).

    python tools/preprocess_data.py --input corpus/*.jsonl.gz --output-prefix data/web \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --json-keys text --append-eod --workers 16

writes data/web_text_document.bin/.idx, byte-identical to Megatron-LM's
preprocess_data.py with GPTSentencePieceTokenizer. Bad input lines (malformed or
too deeply nested JSON, missing or non-string key, invalid UTF-8 or a lone
surrogate escape like "\\ud800", truncated .gz) are skipped and counted with
their first file:line; --strict makes any of them fatal. Empty documents are
kept (no sequence, as Megatron does) and reported with their first file:line.
"""
from __future__ import annotations

import argparse
import os
import sys

from megalite.data.corpus import BadInputError
from megalite.data.preprocess import preprocess
from megalite.data.tokenizer import TOKENIZER_TYPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = preprocess(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                             json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
                             log_interval=args.log_interval, strict=args.strict,
                             chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))))
    except (BadInputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.report(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
