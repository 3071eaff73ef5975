#!/usr/bin/env python
"""Measure training throughput of a preset on this device.

    python tools/bench_train.py llama-1b train.micro_batch_size=4 --steps 20
    python tools/bench_train.py tiny --steps 30

Trains on random tokens (the data path is not what is measured), skips the
first --warmup steps (allocator, autotuning), and prints the steady-state
tokens/s, MFU (6N + 12*L*H*Q*T FLOPs per token against the device's peak) and
peak memory, as the trainer reports them in metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from megalite.config import load_config
from megalite.data.indexed import IndexedDatasetWriter, optimal_dtype
from megalite.preflight import preflight
from megalite.topology import ProcessGroups
from megalite.train import Trainer


def random_corpus(prefix: str, vocab_size: int, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    dtype = optimal_dtype(vocab_size)
    with IndexedDatasetWriter(prefix, dtype) as w:
        for _ in range(max(1, tokens // 4096)):
            w.add_document(rng.integers(0, vocab_size, 4096))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the averages")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(args.preset, args.overrides)
        gb, seq = base.train.global_batch_size, base.data.seq_len
        random_corpus(f"{tmp}/rand", base.model.vocab_size, tokens=(args.steps + 2) * gb * (seq + 1) * 2)
        cfg = load_config(args.preset, [*args.overrides, f"data.path=[{tmp}/rand]", "data.split=100,0,0",
                                        f"train.steps={args.steps}", "train.eval_interval=0",
                                        f"optim.warmup_steps={min(base.optim.warmup_steps, args.steps)}",
                                        "checkpoint.interval=0", "logging.interval=1",
                                        "logging.tensorboard=false", f"train.run_dir={tmp}/run"])
        preflight(cfg, world_size=1)
        trainer = Trainer(cfg, ProcessGroups.single())
        trainer.save = lambda: None  # measuring steps, not checkpoint writes
        trainer.fit()
        rows = [json.loads(line) for line in open(Path(tmp) / "run" / "metrics.jsonl")]
    steady = [r for r in rows if "tokens_per_s" in r][args.warmup:]
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    print(f"\n{args.preset} on {trainer.device} ({cfg.train.precision}), seq {seq}, micro "
          f"{cfg.train.micro_batch_size}, global {gb}, {trainer.model.num_parameters() / 1e6:.1f}M parameters")
    print(f"tokens/s (median of {len(steady)} steps): {tps:,.0f}")
    print(f"MFU: {statistics.median(mfu):.1%}" if mfu else "MFU: n/a (no known peak FLOP/s for this device)")
    print(f"peak memory: {max(r['peak_mem_gb'] for r in steady):.2f} GB")


if __name__ == "__main__":
    main()
