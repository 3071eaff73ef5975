#!/usr/bin/env python
"""Peak memory of the vocabulary-parallel loss, forward and backward, whole-tensor against chunked.

    python tools/bench_loss_memory.py --vocab 131072 --seq 4096 --batch 1 --dtype bf16

Each variant runs in a fresh process: logits [s, b, V] and labels are made first, then the peak
resident memory (ru_maxrss) of the loss's forward and backward is read against the resident size
just before it. Large tensors are mmap'ed by the allocator and unmapped when freed, so the growth
is the bytes the loss held at its peak (its input's gradient included). `whole` is one chunk (the
fp32 working copy of every logit at once, as a non-chunked loss holds); `chunked` is the default
chunk of megalite.tensor_parallel.cross_entropy.CHUNK_ELEMENTS.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(vocab: int, seq: int, batch: int, dtype: str, chunk_elements: int) -> dict:
    """Peak bytes the loss held beyond its inputs (this process's maxrss growth)."""
    import torch

    from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(seq, batch, vocab, dtype=getattr(torch, DTYPES[dtype])).requires_grad_()
    labels = torch.randint(0, vocab, (seq, batch))
    before = _rss_bytes()
    loss = vocab_parallel_cross_entropy(logits, labels, None, chunk_elements=chunk_elements)
    loss.mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_bytes": peak - before, "logits_bytes": logits.numel() * logits.element_size(),
            "loss": float(loss.mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # chunk_elements, in a child
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.vocab, args.seq, args.batch, args.dtype, args.child)))
        return 0
    from megalite.tensor_parallel.cross_entropy import CHUNK_ELEMENTS

    whole = args.vocab * args.seq * args.batch
    print(f"loss over logits [s={args.seq}, b={args.batch}, V={args.vocab}] in {args.dtype}; peak bytes held beyond "
          "the logits (their gradient included)")
    results = {}
    for name, chunk in (("whole", whole), ("chunked", CHUNK_ELEMENTS)):
        out = subprocess.run([sys.executable, __file__, "--vocab", str(args.vocab), "--seq", str(args.seq),
                              "--batch", str(args.batch), "--dtype", args.dtype, "--child", str(chunk)],
                             capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"  {name:<8} chunk {min(chunk, whole):>11,} logits: peak {r['peak_bytes'] / 2**30:6.2f} GiB "
              f"({r['peak_bytes'] / r['logits_bytes']:.2f} x the logits), loss {r['loss']:.6f}")
    print(f"  chunked / whole: {results['chunked']['peak_bytes'] / results['whole']['peak_bytes']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
