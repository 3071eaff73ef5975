"""Benchmark the fused RMSNorm and rotary kernels against PyTorch eager and torch.compile.

For each op (rmsnorm, rotary), pass (fwd, fwd+bwd), tokens and hidden size
it prints the time of the fused op, of the reference twin in eager mode and
of the twin under torch.compile, the fused op's achieved bandwidth in GB/s
(bytes that must move at least once / time) and that as a fraction of the
device's measured copy bandwidth (a large tensor copy). Times are CUDA-event
medians after warm-up. Rotary uses head_dim 128 (heads = hidden / 128).

    python tools/bench_kernels.py            # hidden 2048..16384, tokens 4096..32768, bf16
    python tools/bench_kernels.py --quick    # a few shapes, fewer iterations
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch

from megalite.kernels import fused, reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIM = 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes per op and fewer iterations")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--ops", nargs="+", choices=["rmsnorm", "rotary"], default=["rmsnorm", "rotary"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.tokens, args.iters, args.warmup = [4096, 16384], [8192], 20, 5
    return args


def time_ms(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over `iters` CUDA-event-timed runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(iters: int) -> float:
    """Measured device copy bandwidth: read + write of a 1 GiB tensor."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(functools.partial(dst.copy_, src), iters, 3)
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def step_fn(op, x, dy, backward: bool):
    """fn() running op(x), plus its backward with dy when asked."""
    if not backward:
        return lambda: op(x)

    def run():
        x.grad = None
        op(x).backward(dy)
    return run


def rms_case(tokens: int, hidden: int, dtype: torch.dtype):
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    w = torch.ones(hidden, device="cuda", dtype=dtype, requires_grad=True)
    ops = {"fused": lambda t: fused.rms_norm(t, w, 1e-5), "eager": lambda t: reference.rms_norm(t, w, 1e-5)}
    # minimum traffic: fwd reads x, writes y; bwd reads dy and x, writes dx (rstd and w are negligible)
    return x, ops, (2, 5)


def rotary_case(tokens: int, hidden: int, dtype: torch.dtype):
    x = torch.randn(tokens, 1, hidden // HEAD_DIM, HEAD_DIM, device="cuda", dtype=dtype)
    cos, sin = reference.rope_cos_sin(tokens, HEAD_DIM, device="cuda")
    ops = {"fused": lambda t: fused.apply_rotary(t, cos, sin), "eager": lambda t: reference.apply_rotary(t, cos, sin)}
    return x, ops, (2, 4)  # fwd reads and writes x; bwd reads dy and writes dx


def bench_shape(name, case, tokens, hidden, args, copy_gbs, have_fused):
    dtype = DTYPES[args.dtype]
    x, ops, passes = case(tokens, hidden, dtype)
    if not args.no_compile:
        ops["compile"] = torch.compile(ops["eager"])
    elem = x.numel() * x.element_size()
    rows = []
    for backward, moves in zip((False, True), passes):
        xg = x.detach().requires_grad_(backward)
        dy = torch.randn_like(x)
        with torch.set_grad_enabled(backward):
            times = {k: time_ms(step_fn(op, xg, dy, backward), args.iters, args.warmup)
                     for k, op in ops.items() if k != "fused" or have_fused}
        best = times.get("fused", float("nan"))
        gbs = moves * elem / (best * 1e-3) / 1e9
        rows.append((name, "fwd+bwd" if backward else "fwd", tokens, hidden, best, gbs, gbs / copy_gbs,
                     times["eager"], times.get("compile", float("nan"))))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA device (torch.cuda.is_available() is False); "
              "the fused kernels only run on CUDA", file=sys.stderr)
        return 2
    have_fused, why = fused.load()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")
    print(f"fused kernels: {'loaded' if have_fused else 'UNAVAILABLE'} ({why})")
    copy_gbs = copy_bandwidth_gbs(args.iters)
    print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s\n")
    head = f"{'op':8} {'pass':8} {'tokens':>7} {'hidden':>6} {'fused ms':>9} {'GB/s':>7} {'%copy':>6} " \
           f"{'eager ms':>9} {'compile ms':>10} {'vs compile':>10}"
    print(head)
    print("-" * len(head))
    cases = {"rmsnorm": rms_case, "rotary": rotary_case}
    for name in args.ops:
        for hidden in args.hidden:
            for tokens in args.tokens:
                if name == "rotary" and hidden % HEAD_DIM:
                    continue
                for r in bench_shape(name, cases[name], tokens, hidden, args, copy_gbs, have_fused):
                    print(f"{r[0]:8} {r[1]:8} {r[2]:7d} {r[3]:6d} {r[4]:9.4f} {r[5]:7.0f} {100 * r[6]:5.1f}% "
                          f"{r[7]:9.4f} {r[8]:10.4f} {r[8] / r[4]:9.2f}x", flush=True)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
