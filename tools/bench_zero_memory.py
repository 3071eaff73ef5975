"""Bytes per parameter per rank for the native engine and ZeRO-1/2/3, analytic and measured.

    DS_ACCELERATOR=cpu python tools/bench_zero_memory.py [--presets tiny llama-1b] [--dps 2 4] [--no-measure]

Analytic (mixed-precision Adam, P parameters, dp ranks; the ZeRO paper's rules):
    native (megalite): fp32 weights 4P + fp32 grads 4P + Adam m, v 8P, all replicated      = 16P
    ZeRO-1: bf16 weights 2P + bf16 grads 2P + (fp32 master + m + v) 12P/dp                 = 4P + 12P/dp
    ZeRO-2: bf16 weights 2P + grads 2P/dp + 12P/dp                                        = 2P + 14P/dp
    ZeRO-3: everything sharded                                                            = 16P/dp

Measured: for each dp in --dps, dp gloo CPU ranks build the tiny preset made deep and narrow (MODEL
below, P = 6.0M) under DeepSpeed with train.precision=bf16 (DeepSpeed's CPU accelerator runs bf16 mixed
precision: bf16 weights and gradients, fp32 master weights and Adam moments), run one backward and one
step per ZeRO stage, and take a census of every tensor storage the ZeRO optimizer, its inner AdamW and
the model hold on this rank, each storage counted once (views into DeepSpeed's flat buffers are one):
    parameters: the model's bf16 storage (ZeRO-1/2: bit16_groups flat buffer; ZeRO-3: this rank's
                fp16_partitioned_groups shard, the ds_tensor of every parameter)
    gradients:  after backward, before the step: the parameters' .grad (ZeRO-1), the reduced partition
                (ZeRO-2 all_grad_tensors, ZeRO-3 grad_partitions_flat_buffer)
    optimizer:  after the step: the fp32 master partition (single_partition_of_fp32_groups,
                fp32_partitioned_groups_flat) and AdamW's exp_avg, exp_avg_sq
Any other storage is one of DeepSpeed's fixed buffers, listed by attribute name and left out of the
comparison: the grad-norm and overflow scalars that stay allocated, and, alive only while they work
(so absent from a census taken between phases), the reduce bucket of engine.zero_bucket_size elements
(ipg_buffer / ZeRO-3's ipg bucket, during backward), the all-gather bucket of the same size (during the
step) and ZeRO-3's prefetch bucket (stage3_prefetch_bucket_size, during forward). Flat-buffer alignment
padding is counted. Under ZeRO-2 the gradients also hold the whole gradient of the parameters straddling
this rank's partition edges (printed), bounded by the largest parameter, hence the deep narrow model.
Exit status 1 when a measured category is more than 10% off its formula.
"""
from __future__ import annotations

import argparse
import os

import torch

from megalite.memory import STATE_BYTES

RULES = STATE_BYTES  # (weights, grads, optimizer states) bytes per parameter, as functions of dp
TOLERANCE = 0.10
BUCKET = 1_000_000  # engine.zero_bucket_size for the measurement: the fixed buffers stay small beside 16P
# the tiny preset made deep and narrow (P = 4.9M in ~1000 parameters of <= 50K elements): under ZeRO-2,
# DeepSpeed keeps the whole gradient of the (at most two) parameters straddling this rank's partition
# edges until the step, so the largest parameter must be small beside P/dp for 2P/dp to describe it
MODEL = ["model.hidden_size=64", "model.num_layers=96", "model.vocab_size=1024", "model.num_heads=4",
         "model.num_kv_heads=2"]
CATEGORIES = ("parameters", "gradients", "optimizer")
# attribute (or census prefix) -> category; anything else is a fixed buffer
OWNERS = {
    "parameters": ("bit16_groups", "fp16_groups", "fp16_partitioned_groups", "param.", "ds_tensor."),
    "gradients": ("all_grad_tensors", "averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
                  "grad."),
    "optimizer": ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "adam."),
}


def count_params(preset: str) -> int:
    """Parameters of a preset's model (counted on meta-device blocks: no memory, no init)."""
    from megalite.config import load_config
    from megalite.model import total_parameters

    return total_parameters(load_config(preset).model)


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


# ---------------------------------------------------------------------------------------------- census
def _collect(obj, name: str, out: dict, depth: int = 0) -> None:
    """storage pointer -> (first name that reached it, storage bytes), through lists, tuples and dicts."""
    if torch.is_tensor(obj):
        if obj.device.type != "meta" and obj.untyped_storage().nbytes():
            storage = obj.untyped_storage()
            out.setdefault(storage.data_ptr(), (name, storage.nbytes()))
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for x in obj:
            _collect(x, name, out, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for x in obj.values():
            _collect(x, name, out, depth + 1)


def census(engine, model) -> dict[str, int]:
    """Bytes per owner name of every storage the ZeRO optimizer, its AdamW and the model hold."""
    opt, found = engine.optimizer, {}
    for attr, value in vars(opt).items():  # first: views into DeepSpeed's flat buffers get its names
        _collect(value, attr.rpartition("__")[2] if attr.startswith("_") else attr, found)
    for state in opt.optimizer.state.values():
        for key, value in state.items():
            _collect(value, f"adam.{key}", found)
    for name, p in model.named_parameters():
        _collect(p.data, f"param.{name}", found)
        _collect(p.grad, f"grad.{name}", found)
        _collect(getattr(p, "ds_tensor", None), f"ds_tensor.{name}", found)
    by_name: dict[str, int] = {}
    for name, nbytes in found.values():
        by_name[name] = by_name.get(name, 0) + nbytes
    return by_name


def category(name: str) -> str:
    for cat, owners in OWNERS.items():
        if any(name == o or name.startswith(o) for o in owners):
            return cat
    return "fixed"


def split(by_name: dict[str, int]) -> dict[str, int]:
    out = dict.fromkeys((*CATEGORIES, "fixed"), 0)
    for name, nbytes in by_name.items():
        out[category(name)] += nbytes
    return out


def _measure_stage(stage: int, world: int, groups) -> dict:
    from megalite.config import load_config
    from megalite.engine import build_engine
    from megalite.model import Transformer

    cfg = load_config("tiny", [*MODEL, "engine.backend=deepspeed", f"engine.zero_stage={stage}", "train.precision=bf16",
                               f"engine.zero_bucket_size={BUCKET}", "train.micro_batch_size=1",
                               f"train.global_batch_size={world}", "data.seq_len=16", "train.steps=1",
                               "optim.warmup_steps=0"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    engine = build_engine(cfg, model, groups, "cpu")
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 17))
    engine.backward(model.loss(tokens[:, :-1], tokens[:, 1:]).mean())
    after_backward = census(engine, model)
    engine.step()
    after_step = census(engine, model)
    grads, rest = split(after_backward), split(after_step)
    fixed = {k: v for k, v in {**after_backward, **after_step}.items() if category(k) == "fixed"}
    partition = getattr(engine.optimizer, "partition_size", None)  # ZeRO-1/2: elements of this rank's slice
    straddle = grads["gradients"] - 2 * sum(partition) if stage == 2 and partition else 0
    return {"P": n, "parameters": rest["parameters"], "gradients": grads["gradients"],
            "optimizer": rest["optimizer"], "fixed": fixed, "straddle": straddle,
            "largest": largest}


def _measure_rank(rank: int, world: int, port: int, stages, out) -> None:
    import torch.distributed as dist

    from megalite.topology import ProcessGroups, Topology

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        groups = ProcessGroups.build(Topology.from_world(world))
        results = {stage: _measure_stage(stage, world, groups) for stage in stages}
        if rank == 0:
            out.put(results)
    finally:
        dist.destroy_process_group()


def measure_dp(world: int, stages=(1, 2, 3)) -> dict:
    """Rank 0's census for each stage, from `world` CPU ranks (dp = world)."""
    import torch.multiprocessing as mp

    from megalite.distributed.launcher import free_port

    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port("127.0.0.1")
    procs = [ctx.Process(target=_measure_rank, args=(r, world, port, stages, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = q.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=60)
    return results


def report(world: int, results: dict) -> bool:
    """Print measured vs formula per category; True when every category is within TOLERANCE."""
    ok = True
    print(f"\nmeasured bytes per rank, tiny preset with {' '.join(MODEL)}, bf16 mixed precision, dp={world} "
          f"(engine.zero_bucket_size={BUCKET:,})")
    print(f"{'stage':7} {'category':11} {'measured':>13} {'formula':>13} {'B/P':>7} {'rule B/P':>9} {'ratio':>7}")
    for stage, r in results.items():
        n = r["P"]
        rule = dict(zip(CATEGORIES, RULES[f"zero-{stage}"](world)))
        total_measured = total_formula = 0.0
        for cat in CATEGORIES:
            formula = rule[cat] * n
            ratio = r[cat] / formula
            total_measured, total_formula = total_measured + r[cat], total_formula + formula
            bad = abs(ratio - 1) > TOLERANCE
            ok &= not bad
            print(f"zero-{stage:<2} {cat:11} {r[cat]:>13,} {formula:>13,.0f} {r[cat] / n:>7.3f} {rule[cat]:>9.3f} "
                  f"{ratio:>7.3f}{'  OUTSIDE 10%' if bad else ''}")
        print(f"zero-{stage:<2} {'total':11} {total_measured:>13,.0f} {total_formula:>13,.0f} "
              f"{total_measured / n:>7.3f} {total_formula / n:>9.3f} {total_measured / total_formula:>7.3f}"
              f"   (P = {n:,})")
        fixed = ", ".join(f"{k} {v:,} B" for k, v in sorted(r["fixed"].items(), key=lambda kv: -kv[1]))
        print(f"{'':7} fixed buffers, not compared: {fixed or 'none'}")
        if r["straddle"]:
            print(f"{'':7} gradients include {r['straddle']:,} B beyond this rank's 2P/dp slice: whole-parameter "
                  f"grads of the parameters straddling its partition edges (largest parameter: {r['largest']:,})")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "llama-1b"])
    ap.add_argument("--dps", nargs="+", type=int, default=[2, 4], help="data-parallel sizes to measure")
    ap.add_argument("--no-measure", action="store_true", help="print the analytic table only")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    analytic_table(args.presets)
    if args.no_measure:
        return 0
    ok = all([report(dp, measure_dp(dp)) for dp in args.dps])
    print(f"\n{'all within' if ok else 'NOT all within'} {TOLERANCE:.0%} of the formulas")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
