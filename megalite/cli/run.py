"""`megalite train | demo | config | generate`: training, the demo, config printing and decoding.

Each handler imports its module only when its command runs, so `megalite --help` stays fast.
"""
from __future__ import annotations

import sys


def add_commands(sub) -> None:
    """Register train, demo, config and generate on the top-level subparsers `sub`."""
    train = sub.add_parser("train", help="train a model from a preset or YAML config")
    train.add_argument("config", help="preset name (tiny, gpt2-124m, llama-1b, ...) or YAML path")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 optim.lr=3e-4")
    train.set_defaults(handler=train_command)
    demo = sub.add_parser("demo", help="build the demo corpus, tokenizer and tokens; train the tiny preset")
    demo.add_argument("overrides", nargs="*", help="dotted overrides for the tiny preset")
    demo.set_defaults(handler=demo_command)
    show = sub.add_parser("config", help="print the resolved and validated config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(handler=config_command)
    add_generate_command(sub)


def add_generate_command(sub) -> None:
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
    gen.set_defaults(handler=generate_command)


def train_command(args) -> int:
    from megalite.train import train_main

    return train_main(args.config, args.overrides)


def demo_command(args) -> int:
    from megalite.demo import demo_main

    return demo_main(args.overrides)


def config_command(args) -> int:
    """Print the resolved config as YAML once it passes pre-flight (the rules, the data files it names, the
    engine), then the learning rate at a few steps as YAML comments (the output still loads as a config);
    a config error is one line per broken rule and exit code 2."""
    from megalite.config import ConfigError, load_config, to_yaml
    from megalite.preflight import preflight

    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg)
    except ConfigError as e:
        print(f"megalite: {e}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    print("\n".join(lr_summary(cfg)))
    return 0


def lr_summary(cfg) -> list[str]:
    """Two comment lines: the schedule in words, and its rate at the first step, the end of warmup, the
    decay's start, middle and end, and the last step."""
    from megalite.optim import LRSchedule

    schedule = LRSchedule(cfg.optim, cfg.train.steps)
    points = ", ".join(f"{step}: {schedule.lr_at(step):.4g}" for step in schedule.milestones(cfg.train.steps))
    return [f"# lr schedule: {schedule.describe()}", f"# lr at step {points}"]


def generate_command(args) -> int:
    from megalite.generate import generate_main

    return generate_main(args)
