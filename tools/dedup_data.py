#!/usr/bin/env python
"""Megatron-style wrapper: the same as `megalite dedup` (same flags, same output).

    python tools/dedup_data.py --input corpus/*.jsonl.gz --output clean.jsonl.gz --workers 16

`megalite dedup --help` documents it; the code lives in megalite.cli.data and megalite.data.dedup.
"""
import sys

from megalite.cli.data import dedup_main as main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
