"""Laying a full model out as per-rank checkpoint states at a (tp, pp, dp) layout.

Shared by the Hugging Face import (checkpoint.hf) and the resharder
(checkpoint.reshard). A rank's state is what `Trainer._state` saves: its tp
shard of its pipeline stage's tensors, the shard metadata, the engine state,
RNG, progress and layout. Stage structure (names, partition dims, the
optimizer's parameter order) comes from the stage model built on the meta
device, so nothing is allocated or initialised. Every shard is a contiguous
chunk of the full tensor (see checkpoint.sharding), and vocabulary tables are
padded with zero rows to the layout's tp-dependent size.

Conversions write into OUT.tmp and rename it to OUT last (`fresh_dir` /
`publish_dir`), so a refused or failed one leaves no half-written output.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from megalite.checkpoint.io import CheckpointError


def run_config(step_dir: Path, config: str | None):
    """The run's Config: `config` if given, else the config.yaml saved inside the step directory, else
    (checkpoints older than that) the one of its run directory or checkpoint root."""
    from megalite.config import load_config

    if config is None:
        places = (step_dir, step_dir.parent.parent, step_dir.parent)
        found = [p / "config.yaml" for p in places if (p / "config.yaml").is_file()]
        if not found:
            raise CheckpointError(f"no config.yaml in or next to {step_dir} (looked in the step directory, its "
                                  "run directory and checkpoint root); pass the run's config with --config")
        config = str(found[0])
    return load_config(config)


def fresh_dir(out_dir) -> tuple[Path, Path]:
    """(OUT, OUT.tmp): refuses a non-empty OUT; OUT.tmp is created empty (a stale one is removed)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output {out} exists and is not empty; choose a new directory")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return out, tmp


def publish_dir(tmp: Path, out: Path) -> None:
    """Make the finished OUT.tmp visible as OUT (one rename)."""
    if out.exists():
        out.rmdir()  # empty (checked by fresh_dir)
    tmp.rename(out)


def meta_stage_model(cfg, pp: int, pp_rank: int) -> nn.Module:
    """Pipeline rank pp_rank's model at tp=1 on the meta device, built as the Trainer builds it."""
    from megalite.model import Transformer
    from megalite.pipeline import build_stage_model

    with torch.device("meta"):  # shapes, names and parameter order only: no memory, no init cost
        return Transformer(cfg.model) if pp == 1 else build_stage_model(
            cfg.model, pp, pp_rank, cfg.parallel.virtual_stages, partition=cfg.parallel.partition)


def fresh_engine_state(cfg, model: nn.Module) -> dict:
    """The native engine's state_dict before any step (optimizer param groups, schedule, scaler)."""
    from megalite.engine import build_engine
    from megalite.topology import ProcessGroups

    return build_engine(cfg, model, ProcessGroups.single(), "cpu").state_dict()


def stage_skeleton(cfg, pp: int, pp_rank: int):
    """(shard metadata at tp=1, fresh native engine state) of pipeline rank pp_rank's model."""
    from megalite.checkpoint.sharding import shard_metadata

    model = meta_stage_model(cfg, pp, pp_rank)
    return shard_metadata(model, 1), fresh_engine_state(cfg, model)


def optimizer_param_names(model: nn.Module, weight_decay: float) -> list[str]:
    """Parameter names in the optimizer's index order (the keys of its state_dict()['state'])."""
    from megalite.optim import param_groups

    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in param_groups(model, weight_decay) for p in g["params"]]


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """state_dict name -> parameter name, for the extra state_dict names of tied parameters."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {name: canonical[id(t)] for name, t in model.state_dict(keep_vars=True).items()
            if id(t) in canonical and canonical[id(t)] != name}


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with zero rows appended up to `rows` (a vocabulary table's tp-dependent padding)."""
    if t.shape[0] > rows:
        raise CheckpointError(f"a table of {t.shape[0]} rows cannot be padded to {rows}")
    return t if t.shape[0] == rows else torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


def take_shard(full: torch.Tensor, partition_dim: int | None, tp: int, tp_rank: int) -> torch.Tensor:
    """tp rank tp_rank's piece of `full` (a copy): the contiguous chunk along partition_dim, or all of it."""
    return full.clone() if partition_dim is None else full.chunk(tp, dim=partition_dim)[tp_rank].clone()


def fresh_rng(seed: int, tp_rank: int) -> dict:
    """The RNG state a run seeded with `seed` starts from on tp rank tp_rank (this process's is left as is)."""
    import random

    import numpy as np

    from megalite.rng import rng_state, seed_everything
    from megalite.tensor_parallel.random import TPRngTracker

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


def layout_full(full: dict, cfg) -> dict:
    """The full tensors at this layout: vocabulary tables zero-padded to its (tp-dependent) padded size."""
    from megalite.model.transformer import _padded_vocab

    vp, vocab = _padded_vocab(cfg.model, cfg.parallel.tp), cfg.model.vocab_size
    out = dict(full)
    for name, t in full.items():
        if t.dim() == 2 and t.shape[0] == vocab and (name.startswith("blocks.0.word") or name.endswith(
                (f"blocks.{cfg.model.num_layers + 1}.weight", "output.weight"))):
            out[name] = pad_rows(t, vp)
    return out


def rank_state(full: dict, meta: dict, engine: dict, cfg, tp_rank: int, world: int) -> dict:
    """One rank's checkpoint state as Trainer._state lays it out: its tp shard of its stage's tensors.

    `full` holds the layout's full tensors (`layout_full`); `meta`, `engine` come from `stage_skeleton`.
    The RNG state is this process's current one (the caller seeds it).
    """
    from megalite.rng import rng_state
    from megalite.tensor_parallel.random import TPRngTracker

    p, tp = cfg.parallel, cfg.parallel.tp
    meta = {name: {**entry, "tp_size": tp, "full_shape": list(full[name].shape)} for name, entry in meta.items()}
    model = {name: take_shard(full[name], entry["partition_dim"], tp, tp_rank) for name, entry in meta.items()}
    return {"model": model, "shards": meta, "engine": engine,
            "rng": {**rng_state(), "tp_tracker": TPRngTracker(cfg.train.seed, tp_rank).get_state()},
            "progress": {"step": 0, "consumed_samples": 0},
            "layout": {"tp": tp, "pp": p.pp, "world_size": world, "virtual_stages": p.virtual_stages,
                       "order": p.order, "partition": p.partition}}
