"""Laying full tensors out as per-rank checkpoint states at a (tp, pp, dp) layout, offline.

Shared by the Hugging Face import (checkpoint.hf) and the resharder (checkpoint.reshard). A rank's
state is the checkpoint.schema RankState the Trainer saves: its tp shard of its pipeline stage's
tensors, the shard metadata, the engine state, RNG, progress and layout. Stage structure (names,
partition dims, the optimizer's parameter order) comes from the stage model built on the meta
device, so nothing is allocated or initialised. Every shard is a contiguous chunk of the full
tensor (see tensor_parallel.sharding), and vocabulary tables are padded with zero rows to the
layout's tp-dependent size.

Converters write into OUT.tmp and rename it to OUT last (`write_offline`), so a refused or failed
one leaves no half-written output.
"""
from __future__ import annotations

import ctypes
import itertools
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from megalite.checkpoint.io import CheckpointError, fresh_output, publish, step_dir_name, write_extra, write_rank
from megalite.checkpoint.schema import Layout, Progress, RankState
from megalite.config import is_moe_layer, load_config, padded_vocab_size, save_config, to_yaml
from megalite.engine import NativeEngine
from megalite.optim import param_groups
from megalite.pipeline import build_stage_model
from megalite.rng import rng_state, seed_everything
from megalite.tensor_parallel import shard_metadata
from megalite.tensor_parallel.random import TPRngTracker


def run_config(step_dir: Path, config: str | None):
    """The run's Config: `config` if given, else the config.yaml saved inside the step directory, else
    (checkpoints older than that) the one of its run directory or checkpoint root."""
    if config is None:
        places = (step_dir, step_dir.parent.parent, step_dir.parent)
        found = [p / "config.yaml" for p in places if (p / "config.yaml").is_file()]
        if not found:
            raise CheckpointError(f"no config.yaml in or next to {step_dir} (looked in the step directory, its "
                                  "run directory and checkpoint root); pass the run's config with --config")
        config = str(found[0])
    return load_config(config)


def meta_stage_model(cfg, pp: int, pp_rank: int) -> nn.Module:
    """Pipeline rank pp_rank's model at tp=1 on the meta device, built as the Trainer builds it."""
    with torch.device("meta"):  # shapes, names and parameter order only: no memory, no init cost
        return build_stage_model(cfg.model, pp, pp_rank, cfg.parallel.virtual_stages,
                                 partition=cfg.parallel.partition)


def fresh_engine_state(cfg, model: nn.Module) -> dict:
    """The native engine's state_dict before any step (optimizer param groups, schedule, scaler)."""
    return NativeEngine(model, cfg.optim, cfg.train, cfg.train.steps).state_dict()


def optimizer_param_names(model: nn.Module, weight_decay: float) -> list[str]:
    """Parameter names in the optimizer's index order (the keys of its state_dict()['state'])."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in param_groups(model, weight_decay) for p in g["params"]]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with zero rows appended up to `rows` (a vocabulary table's tp-dependent padding)."""
    if t.shape[0] > rows:
        raise CheckpointError(f"a table of {t.shape[0]} rows cannot be padded to {rows}")
    return t if t.shape[0] == rows else torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


def take_shard(full: torch.Tensor, partition_dim: int | None, tp: int, tp_rank: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """tp rank tp_rank's piece of `full` (a copy, in `dtype` if given): the contiguous chunk along
    partition_dim, or all of it."""
    piece = full if partition_dim is None else full.chunk(tp, dim=partition_dim)[tp_rank]
    return piece.to(dtype or piece.dtype, copy=True)


def fresh_rng(seed: int, tp_rank: int) -> dict:
    """The RNG state a run seeded with `seed` starts from on tp rank tp_rank (this process's is left as is)."""
    outer = rng_state()
    try:
        seed_everything(seed)
        state = rng_state()
    finally:  # a converter must not change the caller's random streams
        random.setstate(outer["python"])
        np.random.set_state(outer["numpy"])
        torch.set_rng_state(outer["torch"])
        if "cuda" in outer:
            torch.cuda.set_rng_state(outer["cuda"])
    return {**state, "tp_tracker": TPRngTracker(seed, tp_rank).get_state()}


class StagePlan:
    """One pipeline stage of the output layout: its shard metadata, and full tensors cut into its tp shards."""

    def __init__(self, cfg, stage: int):
        p = cfg.parallel
        self.model = meta_stage_model(cfg, p.pp, stage)
        self.tp, self.meta = p.tp, {}
        padded = padded_vocab_size(cfg.model, p.tp)
        for name, entry in shard_metadata(self.model, 1).items():  # at tp=1: fix the tp size and the padding
            shape = list(entry["full_shape"])
            if "valid_rows" in entry:
                shape[0] = padded
            self.meta[name] = {**entry, "tp_size": p.tp, "full_shape": shape}

    def _padded(self, name: str, full: torch.Tensor, where) -> torch.Tensor:
        """An unpadded full tensor `name` checked against the stage's shape and padded to this layout's rows."""
        entry = self.meta[name]
        expected = list(entry["full_shape"])
        if "valid_rows" in entry:
            expected[0] = entry["valid_rows"]  # compared before padding: a source's own padding is already cut
        if list(full.shape) != expected:
            raise CheckpointError(f"tensor '{name}' has shape {list(full.shape)} in {where}, but the run's config "
                                  f"expects {expected}; wrong --config?")
        if "valid_rows" in entry:
            full = pad_rows(full, entry["full_shape"][0])  # zeros for the padding of this layout's tp
        return full

    def cut(self, name: str, full: torch.Tensor, where) -> list[torch.Tensor]:
        """The tp shards of an unpadded full tensor `name` (a weight or a per-element optimizer state)."""
        full = self._padded(name, full, where)
        return [take_shard(full, self.meta[name]["partition_dim"], self.tp, t) for t in range(self.tp)]

    def weights(self, read, where) -> list[dict]:
        """Every tp rank's model state from `read(name)` -> the full unpadded tensor, one tensor at a time."""
        per_rank: list[dict] = [{} for _ in range(self.tp)]
        for name in self.meta:
            for t, shard in enumerate(self.cut(name, read(name), where)):
                per_rank[t][name] = shard
        return per_rank

    def rank_weights(self, read, where, tp_rank: int, dtype: torch.dtype | None = None) -> dict:
        """tp rank tp_rank's model state alone (each shard cast to `dtype` if given): each full tensor is
        read, cut and dropped before the next, so one rank's shards plus one full tensor are held (a
        stream of ranks reads each tensor tp times)."""
        return {name: take_shard(self._padded(name, read(name), where), self.meta[name]["partition_dim"], self.tp,
                                 tp_rank, dtype) for name in self.meta}


def return_freed_memory() -> None:
    """Hand the heap's freed blocks back to the OS (glibc's malloc_trim; a no-op elsewhere).

    A rank's shards of a few MB to a few tens of MB land in glibc's heap, not in mappings of their
    own, and glibc keeps them after they are freed; without this each rank written offline leaves
    its memory resident under the next one's.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def layout_of(cfg, dp: int) -> Layout:
    """The Layout a run of `cfg` has on tp * cp * pp * dp ranks."""
    p = cfg.parallel
    return Layout(p.tp, p.pp, p.tp * p.cp * p.pp * dp, p.virtual_stages, p.order, p.partition, p.cp, p.ep)


def expert_share(state: RankState, cfg, model: nn.Module, ep: int, ep_rank: int) -> RankState:
    """`state` (whole experts) as ep rank ep_rank of `ep` holds it: each MoE layer's fc1/fc2, their
    AdamW moments and their shard metadata cut to experts [ep_rank * E/ep, (ep_rank + 1) * E/ep)."""
    names = {f"blocks.{i}.mlp.{w}" for i in range(1, cfg.model.num_layers + 1) if is_moe_layer(cfg.model, i)
             for w in ("fc1", "fc2")}
    def cut(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(ep, dim=0)[ep_rank].clone()
    weights = {k: cut(v) if k in names else v for k, v in state.model.items()}
    shards = {k: {**v, "full_shape": [v["full_shape"][0] // ep, *v["full_shape"][1:]], "expert_parallel": True}
              if k in names else v for k, v in state.shards.items()}
    order = optimizer_param_names(model, cfg.optim.weight_decay)
    moments = {}
    for index, entry in state.engine["optimizer"]["state"].items():
        expert = order[int(index)] in names
        moments[index] = {k: cut(v) if expert and v.dim() else v for k, v in entry.items()}
    engine = {**state.engine, "optimizer": {**state.engine["optimizer"], "state": moments}}
    return RankState(weights, shards, engine, state.rng, state.progress, state.layout)


def rank_states(plan: StagePlan, model: list[dict], engine: list[dict], layout: Layout, progress: Progress,
                rng_seed: int) -> list[RankState]:
    """The RankState of every tp rank of one output stage (model and engine states per tp rank); every
    rank's RNG is a fresh run's seeded with `rng_seed` (per-rank streams do not map across layouts)."""
    return [RankState(model[t], plan.meta, engine[t], fresh_rng(rng_seed, t), progress, layout)
            for t in range(plan.tp)]


def write_offline(out_root, cfg, layout: Layout, step: int, stages, copies: dict[str, Path] | None = None) -> Path:
    """A checkpoint root OUT (OUT/step_N, `latest`, OUT/config.yaml) from `stages`: for each pipeline
    stage in order, its tp ranks' RankStates (a list, or a generator that makes each when asked), each
    written for all dp (and cp) replicas of `layout`, each with its share of the experts under expert
    parallelism (an import's lazy states are then made whole once per rank). `copies` maps names under
    OUT to files copied there (an imported model's tokenizer).

    Written into OUT.tmp and renamed last; a refused or failed write leaves nothing at OUT.
    """
    topo, world = layout.topology, layout.world_size
    with fresh_output(out_root) as tmp_root:
        tmp = tmp_root / (step_dir_name(step) + ".tmp")
        tmp.mkdir()
        for stage, states in enumerate(stages):
            ranks = iter(states)
            for t in range(layout.tp):  # not enumerate(states): its reused result tuple keeps the last rank alive
                state = next(ranks)
                for dp, cp in itertools.product(range(topo.dp), range(topo.cp)):
                    rank = topo.rank(tp=t, pp=stage, dp=dp, cp=cp)
                    if layout.ep > 1:  # this rank's share of the experts (stages of materialized states only)
                        held = topo.group_of(rank, "ep").index(rank)
                        share = expert_share(state, cfg, meta_stage_model(cfg, layout.pp, stage), layout.ep, held)
                        write_rank(tmp, rank, share.to_dict())
                    else:
                        write_rank(tmp, rank, state.to_dict())
                del state  # a lazy `states` then makes the next rank's tensors after this rank's are gone
                return_freed_memory()
        write_extra(tmp, {"config.yaml": to_yaml(cfg)})
        publish(tmp_root, tmp, tmp_root / step_dir_name(step), step, world)
        save_config(cfg, tmp_root / "config.yaml")
        for name, source in (copies or {}).items():
            (tmp_root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp_root / name)
    return Path(out_root)
