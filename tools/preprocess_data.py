#!/usr/bin/env python
"""Megatron-style wrapper: the same as `megalite preprocess` (same flags, same output).

    python tools/preprocess_data.py --input corpus/*.jsonl.gz --output-prefix data/web \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --json-keys text --append-eod --workers 16

`megalite preprocess --help` documents it; the code lives in megalite.cli.data.
"""
import sys

from megalite.cli.data import preprocess_main as main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
