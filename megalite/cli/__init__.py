"""`megalite <command> ...`: one command line for training, data and checkpoints.

    megalite train CONFIG [section.key=value ...]   train (single process or under any launcher)
    megalite demo [section.key=value ...]           build the demo data and train the tiny preset
    megalite config CONFIG [section.key=value ...]  print the resolved, validated config
    megalite generate CKPT --prompt TEXT [...]      continue a prompt with a trained checkpoint
    torchrun --nproc_per_node N -m megalite generate CKPT ...   the same, tensor-parallel (tp = N)

    megalite preprocess --input ... --output-prefix ... --tokenizer-type ... --tokenizer-model ...
    megalite train-tokenizer --input ... --output-prefix ... --vocab-size N
    megalite merge --input PREFIX ... --output-prefix PREFIX
    megalite inspect --run-dir RUN --batch K
    megalite convert to-hf|from-hf|reshard ...

`megalite COMMAND --help` documents each command. A failure is one line, `megalite: <what failed,
the value, the fix>`, and exit code 2 for bad input or 1 for a run-time failure (megalite.cli.errors;
`megalite --debug COMMAND` shows the traceback). The data commands take Megatron-LM's flag names;
tools/ keeps Megatron-style wrappers (python tools/preprocess_data.py ...) of the same code.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from megalite.cli import convert, data, run
from megalite.cli.errors import DEBUG_ENV, report_failures


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; building it imports nothing heavy (each handler imports its work)."""
    p = argparse.ArgumentParser(prog="megalite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher passes --local_rank=N before the command; the rank comes from the
    # LOCAL_RANK it also exports (distributed.launcher.discover), so the flag is accepted and ignored
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of a failure (also {DEBUG_ENV}=1); without it, one line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    run.add_commands(sub)
    data.add_commands(sub)
    convert.add_commands(sub)
    return p


def _show_own_warnings() -> None:
    """megalite's own warnings (a config adjusted to the run, a checkpoint chosen without `latest`) are one
    line each, printed by rank 0 only."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not category.__module__.startswith("megalite."):
            return default(message, category, filename, lineno, file, line)
        if os.environ.get("RANK", "0") == "0":
            print(f"megalite: note: {message}", file=sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_own_warnings()
    return report_failures(lambda: args.handler(args), args.debug)
