"""How much of the data-parallel all-reduce the overlapped reduction hides behind backward.

Two gloo ranks (torch.multiprocessing) train a stack of wide Linear layers, whose tens of MB of
fp32 gradients make communication a large share of a step. Each repetition times one step
(forward + backward + gradient reduction, no optimizer) with the blocking reduction
(NativeEngine(overlap=False): all-reduce after backward) and with the overlapped one (buckets
all-reduced as backward produces them), side by side in the same run, on two copies of the same
weights; the blocking step's reduction alone is the communication-only time. Times are the slower
rank's, medians over the repetitions. The fraction of communication hidden is

    hidden = (t_blocking - t_overlap) / t_comm

(1: all of it behind backward; 0: none). On a CPU the all-reduce's gloo threads compete with the
matmuls for the same cores, so a CPU figure is a floor of what a GPU (separate NCCL engine) hides.

    python tools/bench_overlap.py                      # 8 x [1024, 1024] layers, 32 MiB of gradients
    python tools/bench_overlap.py --layers 16 --reps 11 --bucket-elems 2000000
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megalite.config import OptimConfig, TrainConfig
from megalite.engine import NativeEngine

WORLD = 2


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*blocks)


def _engine(model: nn.Module, overlap: bool, bucket_elems: int) -> NativeEngine:
    one_micro_batch = TrainConfig(micro_batch_size=1, global_batch_size=WORLD)  # accumulation 1
    return NativeEngine(model, OptimConfig(), one_micro_batch, 1, dp_group=dist.group.WORLD,
                        bucket_elems=bucket_elems, overlap=overlap)


def _slowest(seconds: float) -> float:
    """The slowest rank's time (a step ends for the job when its last rank ends)."""
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _step(engine: NativeEngine, x: torch.Tensor) -> tuple[float, float]:
    """One forward + backward + reduction: (seconds to the end of backward, seconds in all)."""
    dist.barrier()
    start = time.perf_counter()
    engine.backward(engine.model(x).pow(2).mean())  # x [tokens, width]
    backward = time.perf_counter() - start
    engine.reduce_gradients()
    total = time.perf_counter() - start
    return backward, total


def _worker(rank: int, port: int, args) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    blocking = _engine(_model(args.layers, args.width), False, args.bucket_elems)
    overlapped = _engine(_model(args.layers, args.width), True, args.bucket_elems)
    x = torch.randn(args.tokens, args.width, generator=torch.Generator().manual_seed(rank))
    times = {"blocking": [], "overlap": [], "comm": [], "compute": []}
    for rep in range(args.warmup + args.reps):
        b_backward, b_total = _step(blocking, x)
        _, o_total = _step(overlapped, x)
        same = all(torch.equal(p.grad, q.grad) for p, q in zip(blocking.params, overlapped.params))
        blocking.zero_grad()
        overlapped.zero_grad()
        if not same:
            raise RuntimeError(f"rank {rank} rep {rep}: overlapped gradients differ from the blocking ones")
        if rep >= args.warmup:
            for key, t in (("blocking", b_total), ("overlap", o_total), ("comm", b_total - b_backward),
                           ("compute", b_backward)):
                times[key].append(_slowest(t))
    if rank == 0:
        _report(args, overlapped, {k: statistics.median(v) for k, v in times.items()})
    dist.destroy_process_group()


def _report(args, engine: NativeEngine, t: dict) -> None:
    grads = sum(p.numel() for p in engine.params)
    buckets = len(engine.reducer.buckets)
    print(f"bench_overlap: {WORLD} gloo ranks, {args.layers} x Linear({args.width}, {args.width}), "
          f"{args.tokens} tokens, {grads * 4 / 2**20:.1f} MiB of fp32 gradients in {buckets} bucket(s) of "
          f"<= {args.bucket_elems:,} elements, {args.threads} thread(s) a rank; median of {args.reps} "
          f"(after {args.warmup} warm-up), slower rank")
    print(f"  step, blocking reduction   {t['blocking'] * 1e3:8.1f} ms   "
          f"(forward+backward {t['compute'] * 1e3:.1f} ms + all-reduce {t['comm'] * 1e3:.1f} ms)")
    print(f"  step, overlapped reduction {t['overlap'] * 1e3:8.1f} ms")
    print(f"  communication only         {t['comm'] * 1e3:8.1f} ms")
    print(f"  communication hidden       {(t['blocking'] - t['overlap']) / t['comm']:8.1%}   "
          "(t_blocking - t_overlap) / t_comm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="Linear layers (default 8)")
    parser.add_argument("--width", type=int, default=1024, help="features in and out of each (default 1024)")
    parser.add_argument("--tokens", type=int, default=256, help="rows of the input batch (default 256)")
    parser.add_argument("--bucket-elems", type=int, default=2_100_000,
                        help="elements a bucket (default 2.1M: two layers each, 4 buckets)")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads a rank (default 1: 2 ranks, 2 cores)")
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(_free_port(), args), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
