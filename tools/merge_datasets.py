#!/usr/bin/env python
"""Megatron-style wrapper: the same as `megalite merge` (same flags, same output).

    python tools/merge_datasets.py --input data/part0_text_document data/part1_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input-dir data/parts --output-prefix data/all_text_document

`megalite merge --help` documents it; the code lives in megalite.cli.data.
"""
import sys

from megalite.cli.data import merge_main as main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
