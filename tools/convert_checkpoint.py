#!/usr/bin/env python
"""Wrapper: the same as `megalite convert` (same subcommands, flags and output).

    python tools/convert_checkpoint.py to-hf CKPT OUT_DIR [--config RUN/config.yaml]
    python tools/convert_checkpoint.py from-hf HF_DIR OUT_CKPT [parallel.tp=2 ...]
    python tools/convert_checkpoint.py reshard CKPT OUT --tp N --pp M [--cp C] [--ep E] [--dp D]

`megalite convert --help` documents it; the code lives in megalite.cli.convert.
"""
import sys

from megalite.cli.convert import convert_main as main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
