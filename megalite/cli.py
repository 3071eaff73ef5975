"""`megalite <command> ...`: thin dispatch to the modules that do the work.

    megalite train CONFIG [section.key=value ...]   train (single process or under any launcher)
    megalite demo [--steps N]                       build the demo data and train the tiny preset
    megalite config CONFIG [section.key=value ...]  print the resolved, validated config
    megalite generate CKPT --prompt TEXT [...]      continue a prompt with a trained checkpoint
    torchrun --nproc_per_node N -m megalite generate CKPT ...   the same, tensor-parallel (tp = N)
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
    _generate_parser(sub)
    return p


def _generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="greedy or sampled decoding from a checkpoint (KV cache); under "
                         "torchrun --nproc_per_node N it runs tensor-parallel with tp = N")
    gen.add_argument("checkpoint", help="checkpoint root (follows `latest`) or step directory, any layout")
    gen.add_argument("--prompt", required=True, help="text, or token ids ('1 2 3') with --ids or no tokenizer")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--ids", action="store_true", help="the prompt is token ids; print ids")
    gen.add_argument("--eod", type=int, default=None, help="stop id when the run has no tokenizer")
    gen.add_argument("--config", default=None, help="the run's config.yaml (default: next to the checkpoint)")
    gen.add_argument("--device", default="cpu", help="cpu or cuda (each rank uses cuda:LOCAL_RANK)")
    gen.add_argument("--tp", type=int, default=None,
                     help="tensor-parallel degree; must equal the launch's world size (the default)")


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
    if args.command == "generate":
        from megalite.generate import generate_main
        return generate_main(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
