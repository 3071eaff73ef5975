#!/usr/bin/env python
"""Megatron-style wrapper: the same as `megalite train-tokenizer` (same flags, same output).

    python tools/train_tokenizer.py --input corpus/*.jsonl.gz --output-prefix tok \\
        --vocab-size 32000 --model-type bpe --byte-fallback

`megalite train-tokenizer --help` documents it; the code lives in megalite.cli.data.
"""
import sys

from megalite.cli.data import train_tokenizer_main as main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
