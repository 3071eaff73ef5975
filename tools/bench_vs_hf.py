#!/usr/bin/env python
"""megalite against Hugging Face transformers: training tokens/s of one Llama shape, side by side.

    python tools/bench_vs_hf.py --steps 30
    python tools/bench_vs_hf.py --steps 30 --rounds 3 --threads 2 --json

In one process on this machine, alternately (megalite, HF, megalite, HF, ... for --rounds rounds):

  megalite  the `tiny` preset's shape trained by megalite's own Trainer (as tools/bench_train.py does:
            random tokens through the real data loader, pipeline runner and native engine);
  HF        a plain PyTorch loop training `transformers.LlamaForCausalLM` built from its own config
            class (SDPA attention), with the same shape and the same recipe.

The shape and recipe (both sides): hidden 256, 4 layers, 4 query heads and 2 kv heads, SwiGLU FFN 768,
vocabulary 4096 (untied), seq 128, micro-batch 8 and two accumulation steps per optimizer step
(16 x 128 = 2,048 tokens a step), fp32, AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, foreach),
warmup-then-cosine lr, gradient clipping at 1.0, no dropout, no activation checkpointing, the same
torch thread count. Every run builds a fresh model and times every optimizer step on the wall clock
(megalite's: from one step's start to the next's, so whatever the Trainer does between steps is
counted); the first --warmup steps of each run are left out. By default the two runs of a round go
step by step (HF's step i runs in megalite's step hook, just before megalite's step i is timed), so a
busy moment of a shared machine hits both sides. Reported: the median tokens/s over the steady steps of
each side (all rounds pooled), every round's own median, megalite / HF of those medians, and the median
over steps of the pair-by-pair ratio (the figure least moved by other load on the machine).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent)]  # bench_train beside it; megalite from this checkout
from bench_train import random_corpus  # noqa: E402

from megalite.config import load_config  # noqa: E402
from megalite.kernels.attention import choose_backend  # noqa: E402
from megalite.preflight import preflight  # noqa: E402
from megalite.topology import ProcessGroups  # noqa: E402
from megalite.train import Trainer  # noqa: E402

SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 768,
         "vocab_size": 4096, "seq_len": 128, "micro_batch_size": 8, "accumulation": 2}
RECIPE = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20, "betas": (0.9, 0.95), "eps": 1e-8,
          "weight_decay": 0.1, "clip_grad": 1.0, "seed": 1234}


def megalite_overrides(steps: int, log_interval: int) -> list[str]:
    """The `tiny` preset pinned to SHAPE and RECIPE (every field the comparison depends on, explicitly)."""
    s, r = SHAPE, RECIPE
    return [f"model.hidden_size={s['hidden_size']}", f"model.num_layers={s['num_layers']}",
            f"model.num_heads={s['num_heads']}", f"model.num_kv_heads={s['num_kv_heads']}",
            f"model.ffn_hidden_size={s['ffn_hidden_size']}", f"model.vocab_size={s['vocab_size']}",
            f"model.max_seq_len={s['seq_len']}", "model.activation=swiglu", "model.norm=rmsnorm",
            "model.position=rope", "model.tie_embeddings=false", "model.bias=false", "model.dropout=0.0",
            f"data.seq_len={s['seq_len']}", "data.num_workers=0",
            f"train.micro_batch_size={s['micro_batch_size']}",
            f"train.global_batch_size={s['micro_batch_size'] * s['accumulation']}",
            "train.precision=fp32", "train.device=cpu",
            f"train.seed={r['seed']}", f"train.steps={steps}", "train.eval_interval=0", "train.resume=none",
            f"optim.lr={r['lr']}", f"optim.min_lr={r['min_lr']}", f"optim.warmup_steps={min(r['warmup_steps'], steps)}",
            "optim.decay=cosine", f"optim.beta1={r['betas'][0]}", f"optim.beta2={r['betas'][1]}",
            f"optim.eps={r['eps']}", f"optim.weight_decay={r['weight_decay']}", f"optim.clip_grad={r['clip_grad']}",
            "engine.backend=native", "checkpoint.interval=0", f"logging.interval={log_interval}",
            "logging.tensorboard=false", "logging.wandb=false", "logging.progress_bar=false"]


def check_megalite_config(cfg) -> None:
    """Refuse to compare anything but SHAPE with the HF-comparable options."""
    s, m, t = SHAPE, cfg.model, cfg.train
    got = {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
           "num_kv_heads": m.num_kv_heads, "ffn_hidden_size": m.ffn_hidden_size, "vocab_size": m.vocab_size,
           "seq_len": cfg.data.seq_len, "micro_batch_size": t.micro_batch_size,
           "accumulation": t.global_batch_size // t.micro_batch_size}
    wrong = {k: v for k, v in got.items() if v != s[k]}
    recompute = t.activation_checkpointing not in (False, None, "none")  # the preset's default: off
    if wrong or m.dropout or recompute or t.precision != "fp32" or m.tie_embeddings:
        raise SystemExit(f"bench_vs_hf: megalite config does not match the HF shape: {wrong}, dropout {m.dropout}, "
                         f"checkpointing {t.activation_checkpointing}, {t.precision}, tied {m.tie_embeddings}")


def megalite_attention_backend() -> str:
    """The attention backend megalite picks for this run's query tensors (fp32 on the CPU)."""
    q = torch.zeros(SHAPE["seq_len"], 1, SHAPE["num_heads"], SHAPE["hidden_size"] // SHAPE["num_heads"])
    name, why = choose_backend(q)
    return f"{name} ({why})"


def run_megalite(steps: int, log_interval: int = 1, between=None) -> dict:
    """One fresh megalite run of `steps` steps: wall seconds of every step, the Trainer's own step times.

    `between(step)`, when given, runs (untimed for megalite) at the start of every step, before it is
    timed: the other side's step, so that the two alternate step by step.
    """
    starts: list[float] = []
    ends: list[float] = []

    def at_step(step: int) -> None:
        if starts:
            ends.append(time.perf_counter())  # the previous step, with all the Trainer did after it
        if between is not None:
            between(step)
        starts.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        base = load_config("tiny", megalite_overrides(steps, log_interval))
        gb, seq = base.train.global_batch_size, base.data.seq_len
        random_corpus(f"{tmp}/rand", base.model.vocab_size, tokens=(steps + 2) * gb * (seq + 1) * 2)
        cfg = load_config("tiny", [*megalite_overrides(steps, log_interval), f"data.path=[{tmp}/rand]",
                                   "data.split=100,0,0", f"train.run_dir={tmp}/run"])
        check_megalite_config(cfg)
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer's own console lines
            preflight(cfg, world_size=1)
            trainer = Trainer(cfg, ProcessGroups.single(), step_hooks=[at_step])
            trainer.save = lambda: ends.append(time.perf_counter())  # called once, after the last step
            trainer.fit()
        rows = [json.loads(line) for line in open(Path(tmp) / "run" / "metrics.jsonl")]
    return {"step_s": [b - a for a, b in zip(starts, ends)],
            "trainer_step_s": {r["step"]: r["step_time_s"] for r in rows if "step_time_s" in r},
            "parameters": trainer.model.num_parameters()}


# ------------------------------------------------------------------ Hugging Face
def hf_model():
    """LlamaForCausalLM of SHAPE from transformers' own config class, SDPA attention, fp32, no dropout."""
    import transformers

    s = SHAPE
    conf = transformers.LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["ffn_hidden_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        max_position_embeddings=s["seq_len"], rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        initializer_range=0.02, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(RECIPE["seed"])
    return transformers.LlamaForCausalLM(conf).float()


def lr_at(step: int, steps: int) -> float:
    """Linear warmup to lr, cosine to min_lr (the schedule megalite's optim.LRSchedule follows)."""
    r = RECIPE
    warmup = min(r["warmup_steps"], steps)
    if warmup and step <= warmup:
        return r["lr"] * step / warmup
    progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return r["min_lr"] + (r["lr"] - r["min_lr"]) * 0.5 * (1.0 + math.cos(math.pi * progress))


class HFLoop:
    """A fresh plain-PyTorch training loop on LlamaForCausalLM; `step(i)` runs (and times) optimizer step i."""

    def __init__(self, steps: int):
        s, r = SHAPE, RECIPE
        self.steps, self.model = steps, hf_model()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": r["weight_decay"]},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=r["lr"], betas=r["betas"], eps=r["eps"], foreach=True)
        gen = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, s["vocab_size"], (steps * s["accumulation"], s["micro_batch_size"],
                                                       s["seq_len"] + 1), generator=gen)
        self.step_s: list[float] = []

    def step(self, step: int) -> None:
        accum = SHAPE["accumulation"]
        start = time.perf_counter()
        self.model.train()
        total = torch.zeros(())
        for mb in range(accum):
            tokens = self.data[(step - 1) * accum + mb]  # [b, s + 1]
            logits = self.model(input_ids=tokens[:, :-1]).logits  # [b, s, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) / accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.params, RECIPE["clip_grad"])
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, self.steps)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if not math.isfinite(float(total)):
            raise RuntimeError(f"HF loss is {float(total)} at step {step}")
        self.step_s.append(time.perf_counter() - start)

    def result(self) -> dict:
        return {"step_s": self.step_s, "parameters": sum(p.numel() for p in self.params),
                "attention": self.model.config._attn_implementation}


def run_hf(steps: int) -> dict:
    """One fresh plain-PyTorch run of `steps` steps on LlamaForCausalLM: wall seconds of every step."""
    loop = HFLoop(steps)
    for step in range(1, steps + 1):
        loop.step(step)
    return loop.result()


# ------------------------------------------------------------------ the comparison
def tokens_per_s(seconds: list[float]) -> float:
    return SHAPE["micro_batch_size"] * SHAPE["accumulation"] * SHAPE["seq_len"] / statistics.median(seconds)


def compare(steps: int, warmup: int, rounds: int, threads: int, log_interval: int = 1, alternate: str = "step",
            progress=lambda line: None) -> dict:
    """Median tokens/s of both sides over `rounds` rounds of one fresh run each.

    alternate='step': within a round the two runs go step by step (HF's step i runs in megalite's step
    hook, just before megalite's step i is timed), so a noisy second of the machine hits both sides;
    'run': a round is a whole megalite run, then a whole HF run.
    """
    if steps <= warmup:
        raise SystemExit(f"bench_vs_hf: --steps {steps} must exceed --warmup {warmup}")
    if alternate not in ("step", "run"):
        raise SystemExit(f"bench_vs_hf: --alternate {alternate!r} is not 'step' or 'run'")
    torch.set_num_threads(threads)
    per_round, steady, trainer_s, info, paired = [], {"megalite": [], "hf": []}, [], {}, []
    for i in range(rounds):
        gc.collect()
        if alternate == "step":
            hf = HFLoop(steps)
            info["megalite"] = run_megalite(steps, log_interval, between=hf.step)
            info["hf"] = hf.result()
        else:
            info["megalite"] = run_megalite(steps, log_interval)
            gc.collect()
            info["hf"] = run_hf(steps)
        row = {}
        for name, out in info.items():
            if len(out["step_s"]) != steps:
                raise RuntimeError(f"{name} timed {len(out['step_s'])} steps, expected {steps}")
            steady[name] += out["step_s"][warmup:]
            row[name] = tokens_per_s(out["step_s"][warmup:])
        trainer_s += [v for k, v in info["megalite"]["trainer_step_s"].items() if k > warmup]
        if alternate == "step":  # step i of each side ran back to back: their ratio cancels slow drifts
            paired += [h / m for m, h in zip(info["megalite"]["step_s"][warmup:], info["hf"]["step_s"][warmup:])]
        per_round.append(row)
        progress(f"round {i + 1}/{rounds}: megalite {row['megalite']:,.0f} tokens/s | HF {row['hf']:,.0f} tokens/s")
    import transformers

    result = {
        "shape": SHAPE, "steps": steps, "warmup": warmup, "rounds": rounds, "alternate": alternate,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "tokens_per_step": SHAPE["micro_batch_size"] * SHAPE["accumulation"] * SHAPE["seq_len"],
        "parameters": {"megalite": info["megalite"]["parameters"], "hf": info["hf"]["parameters"]},
        "attention": {"megalite": megalite_attention_backend(), "hf": info["hf"]["attention"]},
        "per_round_tokens_per_s": per_round,
        "tokens_per_s": {name: tokens_per_s(v) for name, v in steady.items()},
        "median_step_s": {name: statistics.median(v) for name, v in steady.items()},
        # the Trainer's own figure (metrics.jsonl: its step, without what it does between steps)
        "megalite_trainer_reported_tokens_per_s": tokens_per_s(trainer_s) if trainer_s else None,
    }
    result["ratio_megalite_over_hf"] = result["tokens_per_s"]["megalite"] / result["tokens_per_s"]["hf"]
    # median over steps i of HF's step time / megalite's (= megalite's tokens/s over HF's, pair by pair)
    result["paired_ratio_median"] = statistics.median(paired) if paired else None
    return result


def report(r: dict) -> str:
    s, tps = r["shape"], r["tokens_per_s"]
    lines = [
        f"megalite vs Hugging Face transformers {r['transformers']} (LlamaForCausalLM), torch {r['torch']}, "
        f"cpu, {r['threads']} thread(s)",
        f"shape: hidden {s['hidden_size']}, {s['num_layers']} layers, {s['num_heads']} heads ({s['num_kv_heads']} kv), "
        f"ffn {s['ffn_hidden_size']}, vocab {s['vocab_size']}, seq {s['seq_len']}, micro-batch "
        f"{s['micro_batch_size']} x {s['accumulation']} accumulation = {r['tokens_per_step']:,} tokens/step; "
        "fp32, AdamW, clip 1.0",
        f"parameters: megalite {r['parameters']['megalite']:,} | HF {r['parameters']['hf']:,}",
        f"attention: megalite {r['attention']['megalite']} | HF {r['attention']['hf']}",
        f"{r['steps']} steps per run, first {r['warmup']} left out, {r['rounds']} round(s), megalite and HF "
        f"alternating {'step by step' if r['alternate'] == 'step' else 'run by run'}",
    ]
    for i, row in enumerate(r["per_round_tokens_per_s"]):
        lines.append(f"  round {i + 1}: megalite {row['megalite']:,.0f} tokens/s | HF {row['hf']:,.0f} tokens/s")
    n = (r["steps"] - r["warmup"]) * r["rounds"]
    lines += [
        f"megalite tokens/s (median of {n} steps): {tps['megalite']:,.0f}  "
        f"({r['median_step_s']['megalite'] * 1e3:.1f} ms/step)",
        f"HF       tokens/s (median of {n} steps): {tps['hf']:,.0f}  ({r['median_step_s']['hf'] * 1e3:.1f} ms/step)",
        f"megalite / HF: {r['ratio_megalite_over_hf']:.3f}",
    ]
    if r["paired_ratio_median"]:
        lines.append(f"megalite / HF, median of the {n} step-by-step pairs: {r['paired_ratio_median']:.3f}")
    if r["megalite_trainer_reported_tokens_per_s"]:
        lines.append(f"(megalite's own metrics.jsonl tokens_per_s, median of its logged steady steps: "
                     f"{r['megalite_trainer_reported_tokens_per_s']:,.0f})")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps of each run left out of the medians")
    p.add_argument("--rounds", type=int, default=2, help="alternating (megalite, HF) rounds")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both")
    p.add_argument("--log-interval", type=int, default=1,
                   help="megalite's logging.interval (1: the Trainer writes metrics.jsonl every step)")
    p.add_argument("--alternate", choices=("step", "run"), default="step",
                   help="alternate megalite and HF step by step (default) or whole run by whole run")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead")
    args = p.parse_args(argv)
    os.environ.pop("MEGALITE_ATTENTION", None)  # megalite chooses its backend as in a real run
    progress = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    result = compare(args.steps, args.warmup, args.rounds, args.threads, args.log_interval, args.alternate, progress)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
