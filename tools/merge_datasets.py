#!/usr/bin/env python
"""Merge Megatron .bin/.idx pairs into one, without re-tokenizing.

    python tools/merge_datasets.py --input data/part0_text_document data/part1_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input-dir data/parts --output-prefix data/all_text_document

Inputs are merged in the order given (--input-dir: sorted by name). The result
equals preprocessing the concatenated corpus, byte for byte.
"""
from __future__ import annotations

import argparse
import sys

from megalite.data.indexed import IndexFileError
from megalite.data.merge import merge_datasets, prefixes_in_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="dataset prefixes (PREFIX.bin + PREFIX.idx), in order")
    src.add_argument("--input-dir", help="merge every .bin/.idx pair in this directory, sorted by name")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    args = p.parse_args(argv)
    try:
        prefixes = args.input or prefixes_in_dir(args.input_dir)
        info = merge_datasets(prefixes, args.output_prefix)
    except (FileNotFoundError, ValueError, IndexFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {info['inputs']} datasets: {info['documents']} documents, {info['sequences']} sequences, "
          f"{info['tokens']} {info['dtype']} tokens -> {args.output_prefix}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
