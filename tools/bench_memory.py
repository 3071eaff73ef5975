#!/usr/bin/env python
"""The memory model (megalite.memory) against exact measurements on the CPU, for a grid of layouts.

    python tools/bench_memory.py            # every table; exit 1 if a figure is > 5% off or a target missed
    python tools/bench_memory.py --quick    # tp=1 and pp only (no spawned ranks)
    python tools/bench_memory.py --moe      # the MoE block's table only

Activations: the bytes autograd keeps for backward (saved-tensor hooks, each storage once) of one
transformer block of the layer shape below, at micro-batch 1 and 2: the growth per token, divided by
h, is the figure per (s*b*h) the model predicts; what does not grow is the per-micro-batch part (the
16-bit weight copies under autocast, the math path's mask). Grid: attention sdpa|math x fp32|bf16 x
recompute none|selective|full at tp=1, and tp=2 with and without sequence parallelism (two gloo
ranks; each measures its own shard of the block). Pipeline: one pp=2 rank's forwards and backwards
replayed in the order its schedule runs them (1F1B, interleaved with 2 chunks), the peak of all
graphs alive at once against in_flight x layers x the per-layer prediction. State: bytes per
parameter the native engine holds after one step (weights, gradients, AdamW moments), each storage
once; the ZeRO stages are measured by tools/bench_zero_memory.py. MoE: the same block with a dropless
8-expert top-2 MoE feed-forward and one shared expert (model.moe_*), sdpa, fp32|bf16 x recompute at tp=1
and (full run) at tp=2 with and without sequence parallelism.

Targets (issue 15): bf16 activations per layer per (s*b*h) at most 34 without recompute and at most 2
with full recompute; under sequence parallelism at tp=t no part of the block stays replicated (tp=2+SP
keeps half of tp=1); every measurement within 5% of its prediction (an MoE block's fixed bytes may also
exceed it by the 4*E bytes of torch._grouped_mm's offsets, which the model leaves out).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megalite.config import load_config
from megalite.memory import (
    Layout,
    in_flight,
    layer_activation_bytes,
    layer_activation_bytes_per_token,
    layer_fixed_bytes,
    native_state_bytes,
    per_token_and_fixed,
    replay_peak_bytes,
    state_bytes,
)
from megalite.model.blocks import BlockSettings, TransformerBlock
from megalite.pipeline.schedules import compute_order

TOLERANCE = 0.05
# one Llama block: h=512, 8 query heads and 2 kv heads (d=64), SwiGLU FFN 1536, s=256
LAYER = ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=2", "model.ffn_hidden_size=1536",
         "model.max_seq_len=256"]
SEQ = 256
# the pipeline replay: 4 such blocks at h=256 over pp=2, 4 micro-batches of [128, 2]
PIPE = ["model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=768",
        "model.max_seq_len=128", "model.num_layers=4"]
PIPE_SEQ, PIPE_BATCH, PIPE_MICRO = 128, 2, 4
# the MoE block: LAYER with 8 experts of width 512, top-2, one shared expert
MOE = LAYER + ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.ffn_hidden_size=512",
               "model.moe.shared_experts=1"]
MODES = ("none", "selective", "full")
TARGETS = {("bf16", "none"): 34.0, ("bf16", "full"): 2.0}  # bytes per (s*b*h), sdpa, tp=1
failures: list[str] = []


def _cfg(overrides):
    return load_config("tiny", overrides).model


def _block(cfg, mode: str, tp_group=None, sp: bool = False) -> TransformerBlock:
    torch.manual_seed(0)
    block = TransformerBlock(cfg, BlockSettings(tp_group=tp_group, sequence_parallel=sp, activation_checkpointing=mode))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block


def _check(label: str, measured: float, predicted: float, slack: int = 0) -> str:
    """The ratio, printed; a failure when off by more than TOLERANCE and by more than `slack` bytes above."""
    ratio = measured / predicted if predicted else float(measured == 0)
    if abs(ratio - 1) > TOLERANCE and not 0 <= measured - predicted <= slack:
        failures.append(f"{label}: measured {measured:.3f}, predicted {predicted:.3f}")
    return f"{ratio:6.3f}"


def measure_grid(cfg, layouts: list[Layout], tp_group=None) -> list[tuple[Layout, float, int]]:
    """(layout, measured bytes per token, measured fixed bytes) of one block on this rank."""
    out = []
    for lay in layouts:
        os.environ["MEGALITE_ATTENTION"] = lay.attention
        block = _block(cfg, lay.recompute, tp_group, lay.sequence_parallel)
        local = SEQ // lay.tp if lay.sequence_parallel else SEQ
        out.append((lay, *per_token_and_fixed(block, local, cfg.hidden_size, lay.precision, tokens=SEQ)))
    os.environ.pop("MEGALITE_ATTENTION", None)
    return out


def print_grid(cfg, rows) -> dict:
    h = cfg.hidden_size
    print(f"{'tp':>2} {'sp':>3} {'attention':9} {'dtype':5} {'recompute':9} | {'B/(sbh) meas':>12} "
          f"{'pred':>8} {'ratio':>6} | {'fixed B meas':>12} {'pred':>10} {'ratio':>6}")
    table = {}
    for lay, per_token, fixed in rows:
        pred = layer_activation_bytes_per_token(cfg, lay, SEQ) / h
        pred_fixed = layer_fixed_bytes(cfg, lay, SEQ)
        label = f"tp={lay.tp} sp={lay.sequence_parallel} {lay.attention} {lay.precision} {lay.recompute}"
        offsets = 4 * cfg.moe_num_experts  # torch._grouped_mm's int32 offsets, where moe.py uses it: not modelled
        print(f"{lay.tp:>2} {'on' if lay.sequence_parallel else 'off':>3} {lay.attention:9} {lay.precision:5} "
              f"{lay.recompute:9} | {per_token / h:12.3f} {pred:8.3f} {_check(label, per_token / h, pred)} | "
              f"{fixed:12,d} {pred_fixed:10,d} {_check(label + ' fixed', fixed, pred_fixed, offsets)}")
        table[lay] = per_token / h
    return table


def _tp_worker(rank: int, port: int, layouts, results, overrides) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = measure_grid(_cfg(overrides), layouts, dist.group.WORLD)
        if rank == 0:
            results.put(rows)
    finally:
        dist.destroy_process_group()


def measure_tp2(layouts: list[Layout], overrides=LAYER):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_tp_worker, args=(port, layouts, results, overrides), nprocs=2, start_method="spawn")
    return results.get()


def check_targets(table: dict) -> None:
    for (precision, mode), bound in TARGETS.items():
        got = table[Layout(precision=precision, recompute=mode)]
        ok = got <= bound
        print(f"target: {precision} {mode} sdpa tp=1 {got:.3f} B/(sbh) <= {bound}: {'met' if ok else 'MISSED'}")
        if not ok:
            failures.append(f"target {precision} {mode}: {got:.3f} > {bound}")


def check_sequence_parallel(table: dict) -> None:
    """tp=2 keeps R + P/2 of tp=1's R + P (R: replicated norms, residual, matmul inputs); SP divides R."""
    for precision in ("fp32", "bf16"):
        one = table[Layout(precision=precision)]
        for sp in (False, True):
            two = table[Layout(tp=2, sequence_parallel=sp, precision=precision)]
            replicated = 2 * two - one  # R: what tp=2 did not divide
            print(f"sequence parallelism {'on ' if sp else 'off'} {precision}: tp=2 keeps {two:.3f} of tp=1's "
                  f"{one:.3f} B/(sbh); replicated part {replicated:.3f}")
            if sp and abs(replicated) > TOLERANCE * one:
                failures.append(f"SP {precision}: {replicated:.3f} B/(sbh) still replicated at tp=2")


def pipeline_table() -> None:
    cfg = _cfg(PIPE)
    print(f"\npp=2, {cfg.num_layers} layers (h={cfg.hidden_size}), {PIPE_MICRO} micro-batches of "
          f"[{PIPE_SEQ}, {PIPE_BATCH}], sdpa")
    print(f"{'schedule':12} {'v':>2} {'stage':>5} {'dtype':5} {'in flight':>9} | {'peak MiB meas':>13} "
          f"{'pred':>8} {'ratio':>6}")
    for kind, v in (("1f1b", 1), ("interleaved", 2)):
        per_chunk = cfg.num_layers // (2 * v)
        for stage in (0, 1):
            for precision in ("fp32", "bf16"):
                chunks = [torch.nn.Sequential(*(_block(cfg, "none") for _ in range(per_chunk))) for _ in range(v)]
                actions = compute_order(kind, 2, stage, PIPE_MICRO, v)
                measured = replay_peak_bytes(chunks, actions, (PIPE_SEQ, PIPE_BATCH, cfg.hidden_size), precision)
                graphs = in_flight(kind, 2, stage, PIPE_MICRO, v)
                lay = Layout(precision=precision)
                predicted = graphs * per_chunk * layer_activation_bytes(cfg, lay, PIPE_SEQ, PIPE_BATCH)
                ratio = _check(f"pp {kind} stage {stage} {precision}", measured, predicted)
                print(f"{kind:12} {v:>2} {stage:>5} {precision:5} {graphs:>9} | {measured / 2**20:13.3f} "
                      f"{predicted / 2**20:8.3f} {ratio}")


def state_table() -> None:
    print("\nstate bytes per parameter, native engine after one step (ZeRO: tools/bench_zero_memory.py)")
    for precision in ("fp32", "bf16"):
        cfg = load_config("tiny", ["model.num_layers=2", f"train.precision={precision}"])
        measured, params = native_state_bytes(cfg)
        predicted = state_bytes(params, "native")
        parts = " ".join(f"{k} {measured[k] / params:.3f} (pred {predicted[k] / params:.3f})" for k in predicted)
        total, pred_total = sum(measured.values()) / params, sum(predicted.values()) / params
        print(f"{precision}: {parts}; total {total:.3f} B/P, predicted {pred_total:.3f}, "
              f"ratio {_check(f'state {precision}', total, pred_total)}")


def moe_table(quick: bool) -> None:
    cfg = _cfg(MOE)
    print(f"\nMoE block: {cfg.moe_num_experts} experts of width {cfg.moe_ffn_hidden_size}, top-{cfg.moe_top_k}, "
          f"{cfg.moe_shared_experts} shared, dropless; same attention and s as above")
    one = [Layout(precision=p, recompute=r) for p in ("fp32", "bf16") for r in MODES]
    rows = measure_grid(cfg, one)
    if not quick:
        rows += measure_tp2([Layout(tp=2, sequence_parallel=sp, precision=p, recompute=r)
                             for sp in (False, True) for p in ("fp32", "bf16") for r in MODES], MOE)
    print_grid(cfg, rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tp=1 and pp only (no spawned ranks)")
    ap.add_argument("--moe", action="store_true", help="the MoE block's table only")
    args = ap.parse_args()
    if args.moe:
        moe_table(args.quick)
        print("\n" + ("all within 5%" if not failures else "FAILED:\n  " + "\n  ".join(failures)))
        return 1 if failures else 0
    cfg = _cfg(LAYER)
    print(f"one block: h={cfg.hidden_size}, {cfg.num_heads} heads ({cfg.num_kv_heads} kv), FFN "
          f"{cfg.ffn_hidden_size}, s={SEQ}; bytes autograd keeps per (s*b*h) and per micro-batch\n")
    one = [Layout(attention=a, precision=p, recompute=r) for a in ("sdpa", "math") for p in ("fp32", "bf16")
           for r in MODES]
    rows = measure_grid(cfg, one)
    if not args.quick:
        rows += measure_tp2([Layout(tp=2, sequence_parallel=sp, attention="sdpa", precision=p, recompute=r)
                             for sp in (False, True) for p in ("fp32", "bf16") for r in MODES])
    table = print_grid(cfg, rows)
    print()
    check_targets(table)
    if not args.quick:
        check_sequence_parallel(table)
    moe_table(args.quick)
    pipeline_table()
    state_table()
    print("\n" + ("all within 5% and every target met" if not failures else "FAILED:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
