"""Bytes per parameter per rank for the native engine and ZeRO-1/2/3, analytic and measured.

    DS_ACCELERATOR=cpu python tools/bench_zero_memory.py [--presets tiny llama-1b] [--no-measure]

Analytic (mixed-precision Adam, P parameters, dp ranks; the ZeRO paper's rules):
    native (megalite): fp32 weights 4P + fp32 grads 4P + Adam m, v 8P, all replicated      = 16P
    ZeRO-1: bf16 weights 2P + bf16 grads 2P + (fp32 master + m + v) 12P/dp                 = 4P + 12P/dp
    ZeRO-2: bf16 weights 2P + grads 2P/dp + 12P/dp                                        = 2P + 14P/dp
    ZeRO-3: everything sharded                                                            = 16P/dp
Measured: a 2-rank gloo CPU run (fp32) of the tiny shape per stage; optimizer-state bytes per rank
= the inner optimizer's tensors (m, v) + DeepSpeed's fp32 master partition (ZeRO >= 1), against
12P/dp (8P for native and ZeRO-0, which keep no separate master in fp32). DeepSpeed's fixed
buffers (reduce/all-gather buckets of engine.zero_bucket_size elements, ZeRO-3's prefetch
bucket) are not optimizer state and are left out; the flat-buffer alignment padding is counted.
"""
from __future__ import annotations

import argparse
import os
import socket

import torch

RULES = {  # (weights, grads, optimizer states) bytes per parameter, as functions of dp
    "native": lambda dp: (4, 4, 8),
    "zero-1": lambda dp: (2, 2, 12 / dp),
    "zero-2": lambda dp: (2, 2 / dp, 12 / dp),
    "zero-3": lambda dp: (2 / dp, 2 / dp, 12 / dp),
}


def count_params(preset: str) -> int:
    """Parameters of a preset's model, built on the meta device (no memory)."""
    from megalite.config import load_config
    from megalite.model import Transformer

    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(load_config(preset).model).parameters())


def analytic_table(presets: list[str], dps=(2, 4, 8)) -> None:
    print(f"{'preset':10} {'P':>14} {'engine':8} {'dp':>3} {'weights':>9} {'grads':>9} {'optim':>9} "
          f"{'total B/P':>10} {'GiB/rank':>9}")
    for preset in presets:
        n = count_params(preset)
        for engine, rule in RULES.items():
            for dp in dps:
                w, g, o = rule(dp)
                total = w + g + o
                print(f"{preset:10} {n:>14,} {engine:8} {dp:>3} {w:>9.3f} {g:>9.3f} {o:>9.3f} {total:>10.3f} "
                      f"{total * n / 2**30:>9.2f}")


def _measure_rank(rank: int, world: int, port: int, stage: int, out) -> None:
    import torch.distributed as dist

    from megalite.config import load_config
    from megalite.engine import build_engine
    from megalite.model import Transformer
    from megalite.topology import ProcessGroups, Topology

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config("tiny", [f"engine.backend={'deepspeed' if stage >= 0 else 'native'}",
                               f"engine.zero_stage={max(stage, 0)}", "train.micro_batch_size=1",
                               "train.global_batch_size=2", "data.seq_len=16", "train.steps=1",
                               "optim.warmup_steps=0"])
    groups = ProcessGroups.build(Topology.from_world(world))
    model = Transformer(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    engine = build_engine(cfg, model, groups, "cpu")
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 17))
    engine.backward(model.loss(tokens[:, :-1], tokens[:, 1:]).mean())
    engine.step()
    opt = getattr(engine, "optimizer")
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
    state = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    masters = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat", [])
    state += sum(t.numel() * t.element_size() for t in masters)
    if rank == 0:
        out.put((stage, n, state))
    dist.destroy_process_group()


def measure(world: int = 2) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    print(f"\nmeasured optimizer-state bytes per rank, tiny preset, fp32, dp={world}")
    print(f"{'engine':8} {'P':>10} {'bytes/rank':>12} {'B/P':>7} {'formula':>8}")
    for stage in (-1, 0, 1, 2, 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q = ctx.Queue()
        procs = [ctx.Process(target=_measure_rank, args=(r, world, port, stage, q)) for r in range(world)]
        for p in procs:
            p.start()
        got = q.get(timeout=300)
        for p in procs:
            p.join()
        _, n, state = got
        formula = 8 if stage <= 0 else 12 / world
        name = "native" if stage < 0 else f"zero-{stage}"
        print(f"{name:8} {n:>10,} {state:>12,} {state / n:>7.3f} {formula:>8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "llama-1b"])
    ap.add_argument("--no-measure", action="store_true", help="print the analytic table only")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    analytic_table(args.presets)
    if not args.no_measure:
        measure()


if __name__ == "__main__":
    main()
