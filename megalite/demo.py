"""`megalite demo`: corpus -> tokenizer -> tokens -> a trained tiny model, on any machine.

Builds (once, cached) the demo corpus from the Python standard library's own
sources, trains its SentencePiece tokenizer, preprocesses it into Megatron's
.bin/.idx format, then trains the tiny preset, evaluates it and saves a
checkpoint. On a GPU the same command uses it.
"""
from __future__ import annotations

import json
import os
import sys
import time

from megalite.config import ConfigError, load_config
from megalite.data.demo import ensure_demo_data
from megalite.data.indexed import IndexedDataset
from megalite.preflight import preflight


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


def sample_text(run_dir: str, demo, prompt: str = "def ", new_tokens: int = 48) -> str:
    """A greedy continuation of `prompt` by the model the demo just trained (its latest checkpoint)."""
    from megalite.data.tokenizer import build_tokenizer
    from megalite.generate import generate, load_model

    model, _ = load_model(os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "config.yaml"))
    tok = build_tokenizer("SentencePieceTokenizer", demo.tokenizer_model)
    ids = tok.encode(prompt)
    return tok.decode(ids + generate(model, ids, new_tokens, eod=tok.eod))


def demo_main(overrides: list[str]) -> int:
    demo = ensure_demo_data()
    describe_data(demo)
    run_dir = os.path.join("runs", "demo-" + time.strftime("%Y%m%d-%H%M%S"))
    try:
        cfg = load_config("tiny", [f"data.path=[{demo.prefix}]", f"data.tokenizer_model={demo.tokenizer_model}",
                                   f"train.run_dir={run_dir}", *overrides])
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
    print(f"\nthe trained model continues 'def ' (greedy, `megalite generate {run_dir}/checkpoints "
          f"--prompt ...` for more):\n{sample_text(run_dir, demo)}")
    return 0
