"""The full fp32 model from a checkpoint, without the cluster (or DeepSpeed) that wrote it.

A ZeRO checkpoint holds, on every rank, only that rank's slice of each
parameter's fp32 master (engine state "params": name -> start, numel, shape,
master), and with tensor parallelism each parameter is itself a tp shard.
`consolidate_fp32` reads every rank's files (safetensors + JSON, nothing is
unpickled), joins the data-parallel slices of each (pipeline stage, tp rank)
back into whole local tensors, then joins the tp shards with
`assemble_full_state`. A checkpoint of the native engine or of ZeRO-0 has
whole local weights in its "model" state and takes the second step only.
The Hugging Face export builds on the result.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from megalite.checkpoint.io import MANIFEST, CheckpointError, latest_checkpoint, load_checkpoint
from megalite.checkpoint.sharding import assemble_full_state



def _step_dir(checkpoint_dir) -> Path:
    """A step directory as given, or the one a checkpoint root's `latest` names."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory; give a checkpoint root or a step_XXXXXXXX directory")
    latest = latest_checkpoint(d) if (d / "latest").exists() else None
    return Path(latest) if latest else d


def _world_size(d: Path) -> int:
    if (d / MANIFEST).is_file():
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        if "world_size" in manifest:
            return int(manifest["world_size"])
    ranks = sorted(d.glob("rank_*.safetensors"))
    if not ranks:
        raise CheckpointError(f"{d} holds no rank_*.safetensors files: not a megalite checkpoint step directory")
    return len(ranks)


def _join_dp_slices(states: list[dict], where: str) -> dict[str, torch.Tensor]:
    """Whole local (tp-sharded) fp32 tensors from the ZeRO slices of every dp rank of one (pp, tp) cell."""
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = defaultdict(int)
    for state in states:
        for name, entry in state["engine"]["params"].items():
            shape = [int(s) for s in entry["shape"]]
            if name not in out:
                out[name] = torch.zeros(shape, dtype=torch.float32).reshape(-1)
            start, numel = int(entry["start"]), int(entry["numel"])
            out[name][start:start + numel] = entry["master"].float().reshape(-1)
            filled[name] += numel
    for name, flat in out.items():
        if filled[name] != flat.numel():
            raise CheckpointError(f"{where}: '{name}' has {filled[name]} of {flat.numel()} elements across the dp "
                                  "ranks' ZeRO slices; is a rank's file missing or from another checkpoint?")
    shapes = {name: [int(s) for s in e["shape"]] for state in states for name, e in state["engine"]["params"].items()}
    return {name: flat.reshape(shapes[name]) for name, flat in out.items()}


def _local_state(states: list[dict], where: str) -> dict[str, torch.Tensor]:
    """One (pp, tp) cell's whole local model: ZeRO masters where present, else the saved model weights."""
    engine = states[0].get("engine", {})
    model = {k: v.float() for k, v in states[0]["model"].items()}
    if engine.get("backend") != "deepspeed" or "params" not in engine:
        return model
    masters = _join_dp_slices(states, where)
    merged = {**model, **masters}  # buffers come from the model state; parameters from the fp32 masters
    for alias, name in engine.get("aliases", {}).items():
        merged[alias] = masters[name]  # the second state_dict name of a tied parameter
    return merged


def consolidate_fp32(checkpoint_dir, strip_padding: bool = False) -> dict[str, torch.Tensor]:
    """name -> full fp32 tensor of the model in a megalite checkpoint (root or step directory).

    Works for the native engine and DeepSpeed ZeRO-0..3, any tp and dp; with
    pp > 1 each stage's parameters keep their stage-local names (merged into
    one dict). `strip_padding` drops the padded vocabulary rows.
    """
    d = _step_dir(checkpoint_dir)
    cells: dict[tuple[int, int], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for rank in range(_world_size(d)):
        state = load_checkpoint(d, rank)
        engine = state.get("engine", {})
        coords = engine.get("coords") or _coords_from_layout(state, rank)
        cells[(coords["pp"], coords["tp"])][coords["dp"]].append(state)
    full: dict[str, torch.Tensor] = {}
    for pp in sorted({pp for pp, _ in cells}):
        tps = sorted(tp for p, tp in cells if p == pp)
        locals_, meta = [], None
        for tp in tps:
            by_dp = cells[(pp, tp)]
            states = [by_dp[dp][0] for dp in sorted(by_dp)]
            locals_.append(_local_state(states, f"{d} (pp={pp}, tp={tp})"))
            meta = meta or states[0].get("shards") or states[0].get("engine", {}).get("shard_metadata")
        if meta is None:
            raise CheckpointError(f"{d} has no shard metadata ('shards'); it was written by an older megalite")
        full.update(assemble_full_state(locals_, meta, strip_padding=strip_padding))
    return full


def _coords_from_layout(state: dict, rank: int) -> dict:
    """(tp, pp, dp) of `rank` for checkpoints whose engine state does not record them (native engine)."""
    from megalite.topology.grid import Topology

    layout = state["layout"]
    topo = Topology.from_world(int(layout["world_size"]), tp=int(layout["tp"]), pp=int(layout["pp"]),
                               virtual_stages=int(layout.get("virtual_stages", 1)),
                               order=layout.get("order", "tp-dp-pp"))  # older checkpoints: the default order
    c = topo.coords(rank)
    return {"tp": c.tp, "pp": c.pp, "dp": c.dp}
