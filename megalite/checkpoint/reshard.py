"""Change the tensor and pipeline layout of a training checkpoint, optimizer state included.

`reshard(CKPT, OUT, tp, pp)` reads a checkpoint the Trainer wrote at any
(tp, pp, dp) with the native engine and writes one the Trainer resumes at
(tp, pp) as if it had trained there: every parameter and its AdamW moments
(exp_avg, exp_avg_sq, and any other per-element state) are assembled from
the source tp shards of the stage that held them, cut at the source's
vocabulary padding, re-padded with zero rows to the new (tp-dependent)
padded size, and cut into the new tp shards of the new stage that holds
them. Per-parameter step counts, the LR schedule, the loss scaler, the
precision, the optimizer's hyperparameters and the data position
(progress: step, consumed samples) are carried over unchanged.

With tied embeddings and pp > 1 the last stage owns a copy of the token
table (`blocks.{L+1}.weight`) with its own optimizer state; going from pp=1
that copy's moments are the table's, going to pp=1 the copy is a state_dict
alias of the table again.

RNG: the per-rank generator states cannot be mapped to another layout (a tp
rank's dropout stream does not split or merge), so every output rank is
re-seeded deterministically with `train.seed + step` (default generators
and the tp tracker, as a fresh run seeded with that value starts). With
dropout 0 the resumed run is unaffected; with dropout it draws new but
reproducible masks.

Data parallelism: the sampler orders samples independently of dp, so the
layout written is (tp, pp, dp) with dp=1 by default, and the resumed run may
use any dp once every rank can find a file: the Trainer loads the file of
its own global rank, so write `dp` replicas (`--dp D`) for a run on
tp*pp*D ranks. (Loading the dp=0 replica of the rank's (tp, pp) cell instead
would make any dp work from one copy; that is a Trainer change.)

Works stage by stage and tensor by tensor: each source rank file is opened
lazily (safetensors, after the manifest's size and sha256 checks), so the
peak memory is one output pipeline stage (all its tp ranks) plus one full
tensor, not the whole model.

Supported inputs: native-engine checkpoints of any tp, pp, virtual stages and
dp (the dp=0 replica is read). DeepSpeed-engine checkpoints (ZeRO 0-3) are
refused by name: their optimizer state lives in ZeRO slices keyed by the
ZeRO grid. The output is a checkpoint root (OUT/step_N, `latest`,
OUT/config.yaml with the new layout), written into OUT.tmp and renamed last.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from megalite.checkpoint import layout as lay
from megalite.checkpoint.io import (MANIFEST, CheckpointError, _publish, _read_json, _rank_files, _resolve,
                                    _verify, _write_rank, step_dir_name)
from megalite.checkpoint.sharding import assemble_full_state
from megalite.checkpoint.state import unflatten

LAZY_PREFIXES = ("/model/", "/engine/optimizer/state/")  # large tensors: read only when a shard needs them


class _Ref:
    """A tensor in an open safetensors file, read on demand."""

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name

    def load(self) -> torch.Tensor:
        return self.handle.get_tensor(self.name)

    @property
    def shape(self) -> list[int]:
        return list(self.handle.get_slice(self.name).get_shape())


class _LazyTensors:
    """The mapping `unflatten` reads: model and optimizer-state tensors become _Refs, the rest is read now."""

    def __init__(self, handle):
        self.handle, self.names = handle, set(handle.keys())

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str):
        return _Ref(self.handle, name) if name.startswith(LAZY_PREFIXES) else self.handle.get_tensor(name)


def _open_rank(d: Path, manifest: dict, rank: int) -> dict:
    """Rank `rank`'s state with lazy model and optimizer tensors, after io's manifest checks."""
    from safetensors import safe_open

    _verify(d, manifest, rank)  # every listed file present with its size; this rank's sha256
    st_name, js_name = _rank_files(rank)
    try:
        handle = safe_open(str(d / st_name), framework="pt")
    except Exception as e:  # safetensors raises its own error types for every malformed file
        raise CheckpointError(f"{d / st_name} is not a readable safetensors file: {e}") from e
    doc = _read_json(d / js_name, "this rank's non-tensor state")
    try:
        return unflatten(_LazyTensors(handle), doc["skeleton"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / js_name} does not fit {d / st_name}: {e}") from e


def _check_layout(layout, world: int, where: Path) -> tuple[int, int, int]:
    """(tp, pp, virtual_stages) of a source checkpoint, refusing layout metadata it cannot read."""
    known = {"tp", "pp", "world_size", "virtual_stages", "order", "partition"}  # the last two: absent in older ones
    if not isinstance(layout, dict) or not {"tp", "pp", "world_size"} <= set(layout) or set(layout) - known:
        raise CheckpointError(f"{where}: unknown layout metadata {layout!r}; expected keys {sorted(known)} "
                              "as the Trainer writes them")
    tp, pp, vs, ws = (layout.get(k, 1) for k in ("tp", "pp", "virtual_stages", "world_size"))
    if not all(isinstance(v, int) and v >= 1 for v in (tp, pp, vs, ws)) or ws != world or world % (tp * pp):
        raise CheckpointError(f"{where}: layout {layout} does not fit the manifest's world_size={world} "
                              "(needs positive ints with tp*pp dividing world_size)")
    return tp, pp, vs


def _check_engine(engine, where: Path) -> None:
    if isinstance(engine, dict) and engine.get("backend") == "deepspeed":
        raise CheckpointError(
            f"{where} was written by the DeepSpeed engine (zero_stage={engine.get('zero_stage')}); reshard "
            "converts native-engine checkpoints only. Resume it at its own layout, or carry its weights to the "
            "new layout without optimizer state: to-hf (consolidates ZeRO slices), then from-hf with "
            "parallel.tp/pp")
    if not isinstance(engine, dict) or not {"optimizer", "schedule", "scaler"} <= set(engine):
        raise CheckpointError(f"{where}: engine state has keys {sorted(engine) if isinstance(engine, dict) else engine}"
                              ", not the native engine's optimizer/schedule/scaler")


class _Source:
    """A verified source checkpoint: its config, layout, and lazy per-(pp, tp) rank states (dp=0)."""

    def __init__(self, checkpoint, config: str | None):
        from megalite.topology import Topology

        self.dir = d = _resolve(checkpoint)
        manifest = _read_json(d / MANIFEST, "the checkpoint manifest")
        world = manifest.get("world_size")
        first = _open_rank(d, manifest, 0)
        self.tp, self.pp, vs = _check_layout(first.get("layout"), world, d)
        self.cfg = lay.run_config(d, config)
        self.cfg = replace(self.cfg, parallel=replace(self.cfg.parallel, tp=self.tp, pp=self.pp, dp=None,
                                                      virtual_stages=vs))
        # The rank order the checkpoint was written with (recorded since it existed; else the run's config).
        order = first["layout"].get("order", self.cfg.parallel.order)
        topo = Topology.from_world(world, tp=self.tp, pp=self.pp, virtual_stages=vs, order=order)
        self.states = {}
        for s in range(self.pp):
            for t in range(self.tp):
                rank = topo.rank(tp=t, pp=s, dp=0)
                state = first if rank == 0 else _open_rank(d, manifest, rank)
                lost = sorted({"model", "shards", "engine", "progress", "layout"} - set(state))
                if lost or state["layout"] != first["layout"]:
                    raise CheckpointError(f"{d}: rank {rank}'s state lacks {lost} or its layout {state.get('layout')} "
                                          "differs from rank 0's; not a checkpoint the Trainer wrote")
                _check_engine(state.get("engine"), d)
                self.states[(s, t)] = state
        self.step = int(manifest.get("step", first["progress"]["step"]))
        self.progress, self.engine = first["progress"], first["engine"]
        self._index_stages()

    def _index_stages(self) -> None:
        """Which stage holds each name, each stage's optimizer index of it, and its tied aliases."""
        self.owner, self.opt_index, self.aliases, self.groups = {}, {}, {}, {}
        for s in range(self.pp):
            model = lay.meta_stage_model(self.cfg, self.pp, s)
            state, where = self.states[(s, 0)], f"{self.dir} (pipeline stage {s})"
            expected = set(model.state_dict())
            for t in range(self.tp):
                got = set(self.states[(s, t)]["model"])
                if expected != got or set(self.states[(s, t)]["shards"] or ()) != expected:
                    missing, extra = sorted(expected - got), sorted(got - expected)
                    raise CheckpointError(f"{where}, tp rank {t}: tensors {missing[:5]} are missing and {extra[:5]} "
                                          "unexpected for the run's config (wrong --config, or shard metadata lost?)")
            names = lay.optimizer_param_names(model, self.cfg.optim.weight_decay)
            groups = state["engine"]["optimizer"]["param_groups"]
            if sum(len(g["params"]) for g in groups) != len(names):
                raise CheckpointError(f"{where}: the optimizer holds {sum(len(g['params']) for g in groups)} "
                                      f"parameters but the config's model has {len(names)} on this stage")
            self.opt_index[s] = {n: i for i, n in enumerate(names)}
            self.aliases.update(lay.tied_aliases(model))
            for name in expected:
                self.owner.setdefault(name, s)
            for g in groups:
                self.groups.setdefault(g.get("name"), {k: v for k, v in g.items() if k != "params"})

    def _assemble(self, name: str, stage: int, shards: list[torch.Tensor]) -> torch.Tensor:
        """Full tensor, vocabulary padding stripped, from the source tp shards of `name` on `stage`."""
        entry = self.states[(stage, 0)]["shards"][name]
        try:
            return assemble_full_state([{name: s} for s in shards], {name: entry}, strip_padding=True)[name]
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{self.dir} (pipeline stage {stage}): {e}") from e

    def weight(self, name: str) -> torch.Tensor:
        """The full (unpadded) model tensor `name`."""
        s = self.owner[name]
        return self._assemble(name, s, [self.states[(s, t)]["model"][name].load() for t in range(self.tp)])

    def optimizer_state(self, name: str) -> dict | None:
        """Parameter `name`'s optimizer state, per-element entries full and unpadded; None before any step."""
        if name not in self.owner:
            raise CheckpointError(f"{self.dir}: tensor '{name}' is missing from every pipeline stage")
        s = self.owner[name]
        index = self.opt_index[s].get(name, self.opt_index[s].get(self.aliases.get(name)))
        if index is None:
            raise CheckpointError(f"{self.dir}: '{name}' is not an optimized parameter of pipeline stage {s}")
        per_tp = [self.states[(s, t)]["engine"]["optimizer"]["state"].get(index) for t in range(self.tp)]
        if all(x is None for x in per_tp):
            return None
        if any(x is None for x in per_tp) or any(set(x) != set(per_tp[0]) for x in per_tp):
            raise CheckpointError(f"{self.dir}: tp ranks of stage {s} disagree on the optimizer state of '{name}'")
        local_shape = self.states[(s, 0)]["model"][name].shape
        out = {}
        for key, ref in per_tp[0].items():
            value = ref.load()
            if list(value.shape) == local_shape:  # per-element: assemble like the weight
                out[key] = self._assemble(name, s, [value] + [per_tp[t][key].load() for t in range(1, self.tp)])
            else:
                out[key] = value.clone()  # the step count (a scalar), identical on every tp rank
        return out



def _target_config(cfg, tp: int, pp: int, virtual_stages: int, dp: int):
    """The run's Config at the new layout (dp left to be inferred), refused by name when it cannot build."""
    from megalite.config import ConfigError
    from megalite.preflight import preflight
    from megalite.model.transformer import _check

    for key, value in (("tp", tp), ("pp", pp), ("dp", dp), ("virtual_stages", virtual_stages)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{key}={value!r} must be a positive integer")
    p = cfg.parallel
    schedule = "1f1b" if p.schedule == "interleaved" and virtual_stages == 1 else p.schedule
    out = replace(cfg, parallel=replace(p, tp=tp, pp=pp, dp=None, virtual_stages=virtual_stages,
                                        sequence_parallel=p.sequence_parallel and tp > 1, schedule=schedule))
    try:
        preflight(out, world_size=tp * pp * dp, data=False, engine=False)  # the run's data need not be here
        _check(out.model, tp)
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"cannot lay the model out at tp={tp} pp={pp} virtual_stages={virtual_stages} "
                              f"dp={dp}:\n{e}") from e
    return out


class _StageLayout:
    """Output shard metadata of one pipeline stage and the cutting of full tensors into its tp shards."""

    def __init__(self, meta: dict, tp: int, padded_vocab: int):
        self.tp, self.meta = tp, {}
        for name, entry in meta.items():  # meta was taken at tp=1: fix the tp size and the vocabulary padding
            shape = list(entry["full_shape"])
            if "valid_rows" in entry:
                shape[0] = padded_vocab
            self.meta[name] = {**entry, "tp_size": tp, "full_shape": shape}

    def cut(self, name: str, full: torch.Tensor, where: Path) -> list[torch.Tensor]:
        """The tp shards of an unpadded full tensor `name` (a weight or a per-element optimizer state)."""
        entry = self.meta[name]
        expected = list(entry["full_shape"])
        if "valid_rows" in entry:
            expected[0] = entry["valid_rows"]  # compared before padding: the source's padding is already cut
        if list(full.shape) != expected:
            raise CheckpointError(f"tensor '{name}' has shape {list(full.shape)} in {where}, but the run's config "
                                  f"expects {expected}; wrong --config?")
        if "valid_rows" in entry:
            full = lay.pad_rows(full, entry["full_shape"][0])  # zeros for the padding of the new tp
        return [lay.take_shard(full, entry["partition_dim"], self.tp, t) for t in range(self.tp)]


def _optimizer_states(src: _Source, cfg, model, plan: _StageLayout) -> list[dict]:
    """Every output tp rank's AdamW `state` dict (index -> entries) for one stage's parameters."""
    per_rank: list[dict] = [{} for _ in range(plan.tp)]
    for index, name in enumerate(lay.optimizer_param_names(model, cfg.optim.weight_decay)):
        state = src.optimizer_state(name)
        if state is None:  # a checkpoint from before the first step has no moments yet
            continue
        for t in range(plan.tp):
            per_rank[t][index] = {}
        for key, value in state.items():
            shards = plan.cut(name, value, src.dir) if value.dim() else [value.clone() for _ in range(plan.tp)]
            for t, shard in enumerate(shards):
                per_rank[t][index][key] = shard
    return per_rank


def _stage_states(src: _Source, cfg, stage: int, world: int) -> list[dict]:
    """The checkpoint state of every output tp rank of pipeline stage `stage` (Trainer._state's layout)."""
    from megalite.checkpoint.sharding import shard_metadata
    from megalite.model.transformer import _padded_vocab

    p = cfg.parallel
    model = lay.meta_stage_model(cfg, p.pp, stage)
    plan = _StageLayout(shard_metadata(model, 1), p.tp, _padded_vocab(cfg.model, p.tp))
    weights: list[dict] = [{} for _ in range(p.tp)]
    for name in plan.meta:  # tensor by tensor: one full tensor in memory at a time
        for t, shard in enumerate(plan.cut(name, src.weight(name), src.dir)):
            weights[t][name] = shard
    moments = _optimizer_states(src, cfg, model, plan)
    fresh = lay.fresh_engine_state(cfg, model)
    groups = [{**g, **src.groups.get(g.get("name"), {}), "params": g["params"]}  # source hyperparameters
              for g in fresh["optimizer"]["param_groups"]]
    carried = {k: src.engine[k] for k in ("schedule", "scaler", "precision") if k in src.engine}
    layout = {"tp": p.tp, "pp": p.pp, "world_size": world, "virtual_stages": p.virtual_stages, "order": p.order,
              "partition": p.partition}
    return [{"model": weights[t], "shards": plan.meta,
             "engine": {**fresh, **carried, "optimizer": {"state": moments[t], "param_groups": groups}},
             "rng": lay.fresh_rng(cfg.train.seed + src.step, t),  # per-rank streams do not map across layouts
             "progress": dict(src.progress), "layout": layout} for t in range(p.tp)]


def reshard(checkpoint, out_root, tp: int, pp: int, dp: int = 1, virtual_stages: int = 1,
            config: str | None = None) -> Path:
    """Write `checkpoint` (a root or step directory) at layout (tp, pp, virtual_stages) into a new root `out_root`.

    `dp` replicas of every (tp, pp) cell are written, for a resumed run on tp*pp*dp ranks. `config` is the
    run's config.yaml (default: found next to the checkpoint). Returns out_root, which then holds
    step_N/, `latest` and config.yaml (the run's config at the new layout, dp inferred): resume with
    `megalite train OUT/config.yaml train.resume=OUT train.run_dir=...`. Every refusal is a CheckpointError
    naming the problem; nothing is left at out_root (or out_root.tmp) when one is raised.
    """
    from megalite.config import save_config
    from megalite.topology import Topology

    src = _Source(checkpoint, config)
    cfg = _target_config(src.cfg, tp, pp, virtual_stages, dp)
    world = tp * pp * dp
    topo = Topology.from_world(world, tp=tp, pp=pp, virtual_stages=virtual_stages, order=cfg.parallel.order)
    out, tmp_root = lay.fresh_dir(out_root)
    try:
        tmp = tmp_root / (step_dir_name(src.step) + ".tmp")
        tmp.mkdir()
        for stage in range(pp):
            for t, state in enumerate(_stage_states(src, cfg, stage, world)):
                for r in range(dp):
                    _write_rank(tmp, topo.rank(tp=t, pp=stage, dp=r), state)
        _publish(tmp_root, tmp, tmp_root / step_dir_name(src.step), src.step, world)
        save_config(cfg, tmp_root / "config.yaml")
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    lay.publish_dir(tmp_root, out)
    return out
