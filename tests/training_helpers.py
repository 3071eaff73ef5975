"""What the end-to-end training tests share: a learnable synthetic corpus, a tiny
run config and the per-step metrics a run wrote.

The corpus is counting sequences (t, t+1, t+2, ... mod VOCAB): a two-layer model
learns them in a few steps, so a falling loss is a real signal and loss curves
of different layouts have something to disagree about.
"""
import json
import os

import numpy as np

from megalite.data.indexed import IndexedDatasetWriter

VOCAB = 128


def write_counting_corpus(prefix: str, docs: int = 300, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(docs):
            start, n = rng.integers(0, VOCAB), rng.integers(10, 90)
            w.add_document((start + np.arange(n)) % VOCAB)
    return prefix


def tiny_overrides(prefix, run_dir, steps=8, **extra) -> list[str]:
    """Dotted overrides of the tiny preset for a seconds-long CPU run; `extra` wins."""
    kv = {"model.vocab_size": VOCAB, "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 4,
          "model.num_kv_heads": 2, "model.max_seq_len": 32, "data.seq_len": 32, "data.path": f"[{prefix}]",
          "data.split": "90,10,0", "train.micro_batch_size": 2, "train.global_batch_size": 8,
          "train.steps": steps, "train.eval_interval": 0, "train.eval_steps": 2, "train.run_dir": str(run_dir),
          "optim.lr": 3e-3, "optim.warmup_steps": min(2, steps), "logging.interval": 1, "logging.tensorboard": False,
          "logging.progress_bar": False, "checkpoint.interval": 2, "checkpoint.keep_last": 10}
    kv.update(extra)
    return [f"{k}={v}" for k, v in kv.items()]


def step_metrics(run_dir, *keys: str) -> dict:
    """step -> value of `keys` (one key: the value; several: a tuple) from metrics.jsonl.

    A step logged twice (after a resume) keeps its last value."""
    keys = keys or ("loss",)
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            if row.get("loss") is not None:
                values = tuple(row[k] for k in keys)
                out[row["step"]] = values[0] if len(values) == 1 else values
    return out
