"""Change the tensor and pipeline layout of a training checkpoint, optimizer state included.

`reshard(CKPT, OUT, tp, pp)` reads a checkpoint the Trainer wrote at any (tp, pp, dp) with the
native engine and writes one the Trainer resumes at (tp, pp) as if it had trained there: every
parameter and its AdamW moments (exp_avg, exp_avg_sq, and any other per-element state) are read
full through the one checkpoint reader (checkpoint.reader: the source tp shards of the stage that
held them joined, the source's vocabulary padding cut), re-padded with zero rows to the new
(tp-dependent) padded size, and cut into the new tp shards of the new stage that holds them
(checkpoint.layout.StagePlan). Per-parameter step counts, the LR schedule, the loss scaler, the
precision, the optimizer's hyperparameters and the data position (progress: step, consumed
samples, data order) are carried over unchanged.

With tied embeddings and pp > 1 the last stage owns a copy of the token table (`blocks.{L+1}.weight`)
with its own optimizer state; going from pp=1 that copy's moments are the table's, going to pp=1
the copy is a state_dict alias of the table again.

RNG: the per-rank generator states cannot be mapped to another layout (a tp rank's dropout stream
does not split or merge), so every output rank is re-seeded deterministically with
`train.seed + step` (default generators and the tp tracker, as a fresh run seeded with that value
starts). With dropout 0 the resumed run is unaffected; with dropout it draws new but reproducible
masks.

Data parallelism: the sampler orders samples independently of dp, so any dp may resume once every
rank finds its file: the Trainer loads the file of its own global rank, so `dp` replicas
(`--dp D`) are written for a run on tp*pp*D ranks. Context parallelism (`--cp C`) is the same:
cp ranks hold the same parameters and optimizer state, so each (tp, pp) cell is written dp * cp
times, and a source at any cp is read from its first replica. Expert parallelism (`--ep E`): each
rank of an ep group gets its share of the experts and of their optimizer state; a source at any ep
is read whole (its ep ranks' experts joined).

Works stage by stage and tensor by tensor: the peak memory is one output pipeline stage (all its
tp ranks) plus one full tensor, not the whole model.

Supported inputs: native-engine checkpoints of any tp, pp, virtual stages and dp (the dp=0
replica is read). DeepSpeed-engine checkpoints (ZeRO 0-3) are refused by name: their optimizer
state lives in ZeRO slices keyed by the ZeRO grid. The output is a checkpoint root (OUT/step_N,
`latest`, OUT/config.yaml with the new layout), written into OUT.tmp and renamed last.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from megalite.checkpoint import layout as lay
from megalite.checkpoint.io import CheckpointError
from megalite.checkpoint.reader import CheckpointReader
from megalite.checkpoint.schema import Progress
from megalite.config import ConfigError
from megalite.model import check_model
from megalite.preflight import preflight


class _Source:
    """A verified native-engine source checkpoint: its reader, its config and its stages' optimizer order."""

    def __init__(self, checkpoint, config: str | None):
        self.reader = reader = CheckpointReader(checkpoint)
        self.dir, layout = reader.dir, reader.layout
        if reader.engine_kind == "deepspeed":
            engine = reader.skeletons[0].get("engine") or {}
            raise CheckpointError(
                f"{self.dir} was written by the DeepSpeed engine (zero_stage={engine.get('zero_stage')}); reshard "
                "converts native-engine checkpoints only. Resume it at its own layout, or carry its weights to the "
                "new layout without optimizer state: `megalite convert to-hf` (consolidates ZeRO slices), then "
                "`megalite convert from-hf` with parallel.tp/pp")
        cfg = lay.run_config(self.dir, config)
        self.cfg = replace(cfg, parallel=replace(cfg.parallel, tp=layout.tp, pp=layout.pp, cp=layout.cp, ep=layout.ep,
                                                 dp=None,
                                                 virtual_stages=layout.virtual_stages, partition=layout.partition,
                                                 order=layout.order))
        self.engine = reader.load(0, "engine")
        for key in ("optimizer", "schedule", "scaler"):
            if key not in self.engine:
                raise CheckpointError(f"{self.dir}: engine state has keys {sorted(self.engine)}, not the native "
                                      "engine's optimizer/schedule/scaler")
        self.progress = Progress.from_dict(reader.load(0, "progress"), self.dir)
        self.step = reader.step
        self._index_stages()

    def _index_stages(self) -> None:
        """Each stage's optimizer index of every name (tied aliases too), checked against the config's model."""
        self.opt_index, self.groups = {}, {}
        for s in range(self.reader.pp):
            model = lay.meta_stage_model(self.cfg, self.reader.pp, s)
            expected = set(model.state_dict())
            for tp in range(self.reader.tp):
                saved = self.reader.skeletons[self.reader.cells[(s, tp)][0]]
                got = set(saved.get("model") or ()) & set(saved.get("shards") or ())
                if expected == got:
                    continue
                raise CheckpointError(f"{self.dir} (pipeline stage {s}, tp rank {tp}): tensors "
                                      f"{sorted(expected - got)[:5]} are missing and {sorted(got - expected)[:5]} "
                                      "unexpected for the run's config (wrong --config, or shard metadata lost?)")
            names = lay.optimizer_param_names(model, self.cfg.optim.weight_decay)
            index = {n: i for i, n in enumerate(names)}
            canonical = {id(p): n for n, p in model.named_parameters()}
            for name, t in model.state_dict(keep_vars=True).items():  # a tied table's second name
                if id(t) in canonical and canonical[id(t)] in index:
                    index.setdefault(name, index[canonical[id(t)]])
            self.opt_index[s] = index
        for g in self.engine["optimizer"]["param_groups"]:
            self.groups.setdefault(g.get("name"), {k: v for k, v in g.items() if k != "params"})
        counted = sum(len(g["params"]) for g in self.engine["optimizer"]["param_groups"])
        if counted != len(lay.optimizer_param_names(lay.meta_stage_model(self.cfg, self.reader.pp, 0),
                                                    self.cfg.optim.weight_decay)):
            raise CheckpointError(f"{self.dir}: the optimizer holds {counted} parameters, not what the config's "
                                  "model has on pipeline stage 0")

    def optimizer_state(self, name: str) -> dict | None:
        return self.reader.optimizer_state(name, self.opt_index)


def _target_config(cfg, tp: int, pp: int, virtual_stages: int, dp: int, cp: int = 1, ep: int = 1):
    """The run's Config at the new layout (dp left to be inferred), refused by name when it cannot build."""
    for key, value in (("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep), ("dp", dp), ("virtual_stages", virtual_stages)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{key}={value!r} must be a positive integer")
    p = cfg.parallel
    schedule = "1f1b" if p.schedule == "interleaved" and virtual_stages == 1 else p.schedule
    out = replace(cfg, parallel=replace(p, tp=tp, pp=pp, cp=cp, ep=ep, dp=None, virtual_stages=virtual_stages,
                                        sequence_parallel=p.sequence_parallel and tp > 1, schedule=schedule))
    try:
        preflight(out, world_size=tp * cp * pp * dp, data=False, engine=False)  # the run's data need not be here
        check_model(out.model, tp)
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"cannot lay the model out at tp={tp} cp={cp} ep={ep} pp={pp} virtual_stages="
                              f"{virtual_stages} dp={dp}:\n{e}") from e
    return out


def _optimizer_states(src: _Source, cfg, plan: lay.StagePlan) -> list[dict]:
    """Every output tp rank's AdamW `state` dict (index -> entries) for one stage's parameters."""
    per_rank: list[dict] = [{} for _ in range(plan.tp)]
    for index, name in enumerate(lay.optimizer_param_names(plan.model, cfg.optim.weight_decay)):
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


def _stage_states(src: _Source, cfg, stage: int, layout) -> list:
    """The RankState of every output tp rank of pipeline stage `stage`."""
    plan = lay.StagePlan(cfg, stage)
    weights = plan.weights(src.reader.read, src.dir)  # tensor by tensor: one full tensor in memory at a time
    moments = _optimizer_states(src, cfg, plan)
    fresh = lay.fresh_engine_state(cfg, plan.model)
    groups = [{**g, **src.groups.get(g.get("name"), {}), "params": g["params"]}  # source hyperparameters
              for g in fresh["optimizer"]["param_groups"]]
    carried = {k: src.engine[k] for k in ("schedule", "scaler", "precision") if k in src.engine}
    engines = [{**fresh, **carried, "optimizer": {"state": moments[t], "param_groups": groups}}
               for t in range(plan.tp)]
    return lay.rank_states(plan, weights, engines, layout, src.progress, cfg.train.seed + src.step)


def reshard(checkpoint, out_root, tp: int, pp: int, dp: int = 1, virtual_stages: int = 1,
            config: str | None = None, cp: int = 1, ep: int = 1) -> Path:
    """Write `checkpoint` (a root or step directory) at layout (tp, cp, pp, virtual_stages) into a new root
    `out_root`.

    `dp` x `cp` replicas of every (tp, pp) cell are written (cp ranks hold the same parameters and
    optimizer state), for a resumed run on tp*cp*pp*dp ranks. `config` is the
    run's config.yaml (default: found next to the checkpoint). Returns out_root, which then holds
    step_N/, `latest` and config.yaml (the run's config at the new layout, dp inferred): resume with
    `megalite train OUT/config.yaml train.resume=OUT train.run_dir=...`. Every refusal is a CheckpointError
    naming the problem; nothing is left at out_root (or out_root.tmp) when one is raised.
    """
    src = _Source(checkpoint, config)
    cfg = _target_config(src.cfg, tp, pp, virtual_stages, dp, cp, ep)
    layout = lay.layout_of(cfg, dp)
    stages = (_stage_states(src, cfg, stage, layout) for stage in range(pp))  # one stage in memory at a time
    return lay.write_offline(out_root, cfg, layout, src.step, stages)
