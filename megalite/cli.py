"""`megalite <command> ...`: thin dispatch to the modules that do the work.

    megalite train CONFIG [section.key=value ...]   train (single process or under any launcher)
    megalite demo [--steps N]                       build the demo data and train the tiny preset
    megalite config CONFIG [section.key=value ...]  print the resolved, validated config
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher passes --local_rank=N before the command; the rank comes from the
    # LOCAL_RANK it also exports (topology.launcher.discover), so the flag is accepted and ignored
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from a preset or YAML config")
    train.add_argument("config", help="preset name (tiny, gpt2-124m, llama-1b, ...) or YAML path")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 optim.lr=3e-4")
    demo = sub.add_parser("demo", help="build the demo corpus, tokenizer and tokens; train the tiny preset")
    demo.add_argument("overrides", nargs="*", help="dotted overrides for the tiny preset")
    show = sub.add_parser("config", help="print the resolved and validated config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        from megalite.train import train_main
        return train_main(args.config, args.overrides)
    if args.command == "demo":
        from megalite.demo import demo_main
        return demo_main(args.overrides)
    if args.command == "config":
        from megalite.config import ConfigError, load_config, to_yaml, validate
        try:
            cfg = load_config(args.config, args.overrides)
            validate(cfg)
        except ConfigError as e:
            print(f"megalite: {e}", file=sys.stderr)
            return 2
        print(to_yaml(cfg), end="")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
