"""`megalite demo`: corpus -> tokenizer -> tokens -> a trained tiny model, on any machine.

Builds (once, cached) the demo corpus from the Python standard library's own
sources, trains its SentencePiece tokenizer, preprocesses it into Megatron's
.bin/.idx format, then trains the tiny preset, evaluates it, saves a checkpoint
and ends with a few sampled continuations of short code prompts. On a GPU the
same command uses it.

The demo trains the tiny preset on half its batch (DEMO_OVERRIDES), so that
the whole first run, data included, takes under 3 minutes on 2 CPU cores.
The preset file stays as shipped (its golden loss curves depend on it); the
command line's overrides come after the demo's and win.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time

from megalite.config import ConfigError, load_config
from megalite.data.demo import ensure_demo_data
from megalite.data.indexed import IndexedDataset
from megalite.preflight import preflight

# The tiny preset's 300 steps at half its global batch (8 sequences, one micro-batch): half the time
# (a first run, data included, 106 s on 2 CPU cores against 205 s), and at equal tokens a lower loss than
# 150 steps of 16. Evaluation every 100 steps on as many sequences as the preset's (10 x 8 = 5 x 16);
# one checkpoint, at the end (the last step always saves one).
DEMO_OVERRIDES = ("train.global_batch_size=8", "train.eval_interval=100", "train.eval_steps=10",
                  "checkpoint.interval=0")
# Prompts without a trailing space: SentencePiece puts a word's space in front of it ('▁def', '▁foo'),
# so 'def ' would end in a lone '▁' token the corpus hardly has.
PROMPTS = ("def", "import", "class")
SAMPLING = {"max_new_tokens": 48, "temperature": 0.8, "top_p": 0.9, "seed": 0}


def describe_data(demo) -> None:
    ds = IndexedDataset(demo.prefix)
    print("demo data written:")
    for path in (demo.corpus, demo.tokenizer_model, demo.prefix + ".bin", demo.prefix + ".idx"):
        print(f"  {path}  ({os.path.getsize(path) / 1e6:.2f} MB)")
    print(f"  {ds.num_documents} documents, {ds.num_tokens:,} tokens, dtype {ds.dtype}")


def loss_curve(run_dir) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def sample_texts(run_dir: str, demo, prompts=PROMPTS, sampling=SAMPLING) -> list[str]:
    """Each prompt and its sampled continuation by the model the demo just trained (its latest checkpoint).

    Prompt i is sampled with seed sampling["seed"] + i, so `megalite generate` with the same flags
    (see generate_command) prints the same text.
    """
    from megalite.data.tokenizer import build_tokenizer
    from megalite.generate import generate, load_model

    model, _ = load_model(os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "config.yaml"))
    tok = build_tokenizer("SentencePieceTokenizer", demo.tokenizer_model)
    texts = []
    for i, prompt in enumerate(prompts):
        ids = tok.encode(prompt)
        new = generate(model, ids, sampling["max_new_tokens"], temperature=sampling["temperature"],
                       top_p=sampling["top_p"], seed=sampling["seed"] + i, eod=tok.eod)
        texts.append(tok.decode(ids + new))
    return texts


def generate_command(run_dir: str, prompt: str, seed: int, sampling=SAMPLING) -> str:
    """The `megalite generate` command line that prints the demo's sample of `prompt` with `seed`."""
    return (f"megalite generate {shlex.quote(os.path.join(run_dir, 'checkpoints'))} --prompt {shlex.quote(prompt)} "
            f"--max-new-tokens {sampling['max_new_tokens']} --temperature {sampling['temperature']} "
            f"--top-p {sampling['top_p']} --seed {seed}")


def print_samples(run_dir: str, texts: list[str], prompts=PROMPTS, sampling=SAMPLING) -> None:
    """The demo's last words: the samples, one block each, after the command that makes more."""
    seed = sampling["seed"]
    command = generate_command(run_dir, prompts[0], seed, sampling)
    print(f"\nsample 1 again, or more with another --prompt or --seed: {command}")
    print(f"\nthe trained model continues {len(prompts)} prompts (sampled: temperature {sampling['temperature']}, "
          f"top-p {sampling['top_p']}, up to {sampling['max_new_tokens']} new tokens):")
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        print(f"\n--- sample {i + 1} of {len(prompts)}: {prompt!r}, seed {seed + i} ---\n{text.rstrip()}")


def demo_main(overrides: list[str]) -> int:
    demo = ensure_demo_data()
    describe_data(demo)
    run_dir = os.path.join("runs", "demo-" + time.strftime("%Y%m%d-%H%M%S"))
    try:
        cfg = load_config("tiny", [f"data.path=[{demo.prefix}]", f"data.tokenizer_model={demo.tokenizer_model}",
                                   f"train.run_dir={run_dir}", *DEMO_OVERRIDES, *overrides])
        preflight(cfg, world_size=1)
        run_dir = cfg.train.run_dir  # an override of train.run_dir wins
    except ConfigError as e:
        print(f"megalite: invalid config:\n{e}", file=sys.stderr)
        return 2
    from megalite.topology import ProcessGroups
    from megalite.train import Trainer

    start = time.time()
    final = Trainer(cfg, ProcessGroups.single()).fit()
    curve = loss_curve(run_dir)
    print(f"\ntrained {cfg.train.steps} steps in {time.time() - start:.0f}s: loss {curve[0][1]:.3f} "
          f"(step {curve[0][0]}) -> {curve[-1][1]:.3f} (step {curve[-1][0]}); "
          f"validation loss {final.get('valid_loss', float('nan')):.3f}, "
          f"perplexity {final.get('valid_ppl', float('nan')):.1f}")
    print(f"run directory: {run_dir} (config.yaml, metrics.jsonl, checkpoints/)")
    print_samples(run_dir, sample_texts(run_dir, demo))
    return 0
