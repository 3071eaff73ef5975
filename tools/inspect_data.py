#!/usr/bin/env python
"""Megatron-style wrapper: the same as `megalite inspect` (same flags, same output).

    python tools/inspect_data.py --run-dir runs/my_run --batch 1200

`megalite inspect --help` documents it; the command line lives in megalite.cli.data and the
library (inspect_batch, run_settings, format_pieces, ...) in megalite.data.inspect.
"""
import sys

from megalite.cli.data import inspect_main as main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
