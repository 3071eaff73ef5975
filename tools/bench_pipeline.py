"""Measure the pipeline bubble and activation stash of the real executor against theory.

Spawns p gloo processes per pipeline size and runs megalite's Executor and
P2P on stages whose forward and backward take a fixed, known time (sleeps:
tf/v and tb/v per chunk), so the only idle time is the schedule's bubble plus
communication overhead. Prints, per (schedule, p, m, v):

    bubble = 1 - ideal / measured   ideal = m * (tf + tb), the busy time of one rank
    theory = (p-1) / (m+p-1)        1F1B (all-forward-all-backward has the same bubble)
             (p-1) / (v*m + p-1)    interleaved; i.e. (p-1)/(v*m) of the ideal time, Megatron's form

and the peak number of (micro-batch, chunk) activations each stage stashed,
beside the schedule's bound (asserted equal).

    python tools/bench_pipeline.py [--tf-ms 40] [--tb-ms 80] [--repeats 2] [--pp 2 4]

Stage times are long next to a gloo hop on a shared CPU (about 1 ms, paid
once per boundary per micro-batch and chunk, so interleaving pays it v
times): the excess over theory is that latency, not schedule idle time.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalite.pipeline import P2P, Executor, StageHooks, build_schedule, max_in_flight
from megalite.pipeline.runner import schedule_kind

SHAPE = (4, 1, 8)  # [s, b, h] of every boundary tensor: tiny, so communication is cheap


class Sleep(torch.autograd.Function):
    """Identity whose forward sleeps `tf` seconds and whose backward sleeps `tb`."""

    @staticmethod
    def forward(ctx, x, tf: float, tb: float):
        time.sleep(tf)
        ctx.tb = tb
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.tb)
        return grad, None, None


def timed_run(kind: str, p: int, m: int, v: int, tf: float, tb: float) -> tuple[float, float, int]:
    """One schedule run on this rank (all ranks call it): (start, end, peak stashed)."""
    rank = dist.get_rank()
    hooks = StageHooks(forward=lambda chunk, x: Sleep.apply(x, tf / v, tb / v),
                       first_input=lambda mb: torch.ones(SHAPE, requires_grad=True),
                       loss=lambda mb, out: out.sum())
    p2p = P2P((rank - 1) % p, (rank + 1) % p, SHAPE, torch.float32, torch.device("cpu"), p)
    actions = build_schedule(kind, p, rank, m, v)
    dist.barrier()
    start = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process on the machine
    stats = Executor(hooks, p2p, rank, p, v).run(actions)
    return start, time.perf_counter(), stats.peak_stashed


def measure(kind: str, p: int, m: int, v: int, tf: float, tb: float, repeats: int) -> dict:
    """Best of `repeats` runs: makespan, bubble fraction, per-stage peak stash (all ranks call it)."""
    best, peaks = None, None
    for _ in range(repeats):
        start, end, peak = timed_run(kind, p, m, v, tf, tb)
        out = [None] * p
        dist.all_gather_object(out, (start, end, peak))
        makespan = max(e for _, e, _ in out) - min(s for s, _, _ in out)
        best = makespan if best is None else min(best, makespan)
        peaks = [pk for _, _, pk in out]
    ideal = m * (tf + tb)
    theory = (p - 1) / (v * m + p - 1) if kind == "interleaved" else (p - 1) / (m + p - 1)
    bounds = [max_in_flight(kind, p, r, m, v) for r in range(p)]
    return {"kind": kind, "p": p, "m": m, "v": v, "ideal": ideal, "measured": best,
            "bubble": 1 - ideal / best, "theory": theory, "peaks": peaks, "bounds": bounds}


def _worker(rank: int, p: int, port: int, cases: list, tf: float, tb: float, repeats: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=p,
                            timeout=timedelta(seconds=120))
    try:
        for kind, m, v in cases:
            row = measure(kind, p, m, v, tf, tb, repeats)
            if rank == 0:
                results.put(row)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(p: int, cases: list, tf: float, tb: float, repeats: int) -> list[dict]:
    """Spawn p gloo processes and measure every (kind, m, v) case on them."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(p, _free_port(), cases, tf, tb, repeats, results), nprocs=p,
                       join=True, start_method="spawn")
    return [results.get() for _ in cases]


def default_cases(p: int) -> list[tuple[str, int, int]]:
    """(schedule, m, v) per pipeline size: enough to see the trends in well under a minute."""
    out = [("1f1b", m, 1) for m in (4, 8)] + [("afab", 8, 1)]
    return out + [(schedule_kind("1f1b", v), 2 * p, v) for v in (2, 4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tf-ms", type=float, default=40.0, help="forward time of one whole stage (ms)")
    ap.add_argument("--tb-ms", type=float, default=80.0, help="backward time of one whole stage (ms)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args(argv)
    tf, tb = args.tf_ms / 1e3, args.tb_ms / 1e3
    print(f"stage forward {args.tf_ms} ms, backward {args.tb_ms} ms (per chunk: divided by v); gloo, "
          f"{os.cpu_count()} CPUs; best of {args.repeats}")
    print(f"{'schedule':<12}{'p':>3}{'m':>4}{'v':>3}{'ideal ms':>10}{'meas ms':>10}{'bubble':>9}{'theory':>9}"
          f"{'over (pts)':>11}   peak stash per stage / bound")
    worst, ok = 0.0, True
    for p in args.pp:
        for r in run_world(p, default_cases(p), tf, tb, args.repeats):
            over = 100 * (r["bubble"] - r["theory"])
            worst = max(worst, over)
            ok &= r["peaks"] == r["bounds"]
            print(f"{r['kind']:<12}{r['p']:>3}{r['m']:>4}{r['v']:>3}{1e3 * r['ideal']:>10.0f}"
                  f"{1e3 * r['measured']:>10.0f}{r['bubble']:>9.3f}{r['theory']:>9.3f}{over:>11.2f}   "
                  f"{r['peaks']} / {r['bounds']}")
    print(f"worst overhead above theory: {worst:.2f} points (target < 5); stash peaks equal bounds: {ok}")
    return 0 if ok and worst < 5 else 1


if __name__ == "__main__":
    sys.exit(main())
