"""The training loop: one step is a schedule run over the micro-batches, then the engine's step.

Reads top to bottom: `train_main` turns a command line into a Trainer (the config passes
pre-flight before any process group exists), `Trainer.fit` runs the steps, evaluates, logs and
checkpoints. There is one training path: the Trainer always drives the pipeline runner, and a
run without pipeline parallelism is a one-stage pipeline whose schedule is the gradient-
accumulation loop. Parallelism enters only through the ProcessGroups object handed to the model,
the engine, the runner and the data loader.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from megalite.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megalite.checkpoint.resume import (
    check_before_resume,
    data_order,
    resume_point,
)
from megalite.checkpoint.schema import Layout, Progress, RankState
from megalite.config import (
    Config,
    ConfigError,
    head_dim,
    load_config,
    samples_per_split,
    save_config,
    seq_len_at,
    to_yaml,
)
from megalite.config.batch_rampup import batch_size_at, parse_rampup
from megalite.data.demo import ensure_demo_data
from megalite.data.loader import build_dataloader, build_datasets
from megalite.data.seq_warmup import cut_batches
from megalite.data.tokenizer import build_tokenizer
from megalite.distributed import device_index, discover, init_distributed
from megalite.distributed.comm import take_comm_bytes
from megalite.distributed.failure import FailureGuard, placement
from megalite.distributed.faults import fault_from_env
from megalite.distributed.run_lock import lock_for_all_ranks
from megalite.distributed.stop import StopSignal
from megalite.engine import StepResult, build_engine
from megalite.engine.checks import build_cpu_adam
from megalite.metrics import MetricsLogger, flops_per_token, peak_flops, peak_memory_gb
from megalite.model import active_matmul_parameters, matmul_parameters, total_parameters
from megalite.pipeline import PipelineRunner, build_stage_model, schedule_kind
from megalite.preflight import preflight
from megalite.rng import rng_state, seed_everything, set_rng_state
from megalite.stability import Stability, skip_ahead
from megalite.topology import ProcessGroups, Topology

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision ->


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def train_main(config: str, overrides: list[str]) -> int:
    """`megalite train CONFIG [overrides]`: the same entry under every launcher."""
    env = discover()
    try:
        cfg = load_config(config, overrides)
        preflight(cfg, world_size=env.world_size)
        if cfg.engine.offload_optimizer:
            build_cpu_adam()  # the explicit build step (checking a config builds nothing)
    except ConfigError as e:
        print(f"megalite: invalid config:\n{e}", file=sys.stderr)
        return 2
    init_distributed(env, timeout_s=cfg.parallel.timeout_s)
    lock = None
    try:
        # Fixed before setup, so that a rank failing while the Trainer is built leaves its record there.
        cfg = replace(cfg, train=replace(cfg.train, run_dir=str(resolve_run_dir(cfg))))
        # Before anything is written (a failure record included): one run per run directory.
        run_dir = Path(cfg.train.run_dir)
        lock = lock_for_all_ranks([run_dir, checkpoint_root(cfg, run_dir)], env.rank, broadcast_from_rank0)
        where = placement(build_topology(cfg, env.world_size), env.rank)
        fault = fault_from_env(env.rank)  # None unless a failure test planned one for this rank
        # A failing rank records where it was and exits; the others follow within the timeout.
        with FailureGuard(cfg.train.run_dir, where, cfg.parallel.timeout_s) as guard:
            if fault is not None:
                fault.at_setup()
            cuda = device_index(env, torch.cuda.device_count()) if torch.cuda.is_available() else 0
            trainer = Trainer(cfg, build_groups(cfg, env.world_size), cuda_device=cuda,
                              step_hooks=[fault.before_step] if fault is not None else (),
                              save_hooks=[fault.during_save] if fault is not None else ())
            guard.attach(lambda: trainer.step)
            trainer.fit()
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def checkpoint_root(cfg: Config, run_dir: Path) -> Path:
    """checkpoint.dir, else RUN_DIR/checkpoints."""
    return Path(cfg.checkpoint.dir or run_dir / "checkpoints")


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (itself in a one-process run)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_topology(cfg: Config, world_size: int) -> Topology:
    p = cfg.parallel
    return Topology.from_world(world_size, tp=p.tp, pp=p.pp, dp=p.dp,
                               virtual_stages=p.virtual_stages, order=p.order, cp=p.cp, ep=p.ep)


def build_groups(cfg: Config, world_size: int) -> ProcessGroups:
    topo = build_topology(cfg, world_size)
    return ProcessGroups.build(topo) if dist.is_initialized() else ProcessGroups.single()


def pick_device(name: str, cuda_device: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(cuda_device)
    return torch.device("cuda", cuda_device)


def resolve_run_dir(cfg: Config) -> Path:
    """cfg.train.run_dir, else runs/<timestamp> chosen by rank 0 and shared with the others."""
    run_dir = [cfg.train.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))]
    if dist.is_initialized():
        dist.broadcast_object_list(run_dir, src=0)
    return Path(run_dir[0])


def resolve_data(cfg: Config, log) -> Config:
    """With no data path the demo corpus is built (once, cached) and used."""
    if cfg.data.path:
        return cfg
    demo = ensure_demo_data(log=log)
    return replace(cfg, data=replace(cfg.data, path=[demo.prefix], tokenizer_model=demo.tokenizer_model))


def document_eod(data) -> int | None:
    """The end-of-document id that splits packed samples when data.reset_attention_mask is set, else None."""
    if not data.reset_attention_mask:
        return None
    if not data.tokenizer_model:
        raise ConfigError("data.reset_attention_mask=true needs the tokenizer's end-of-document id; "
                          "set data.tokenizer_model to the tokenizer the data was preprocessed with")
    return build_tokenizer(data.tokenizer_type, data.tokenizer_model).eod


class Trainer:
    """Owns the model, the engine, the schedule runner, the data iterators, the logger and checkpointing.

    `step_hooks` are called with the step number at the start of every step, `save_hooks` with the
    step and the phase of each save (checkpoint.io.PhaseHook); the failure tests plant their faults
    this way. Nothing is written before the run directory is locked (rank 0 holds the lock until fit
    ends) and the checkpoint to resume from has passed every check that does not load it.
    """

    def __init__(self, cfg: Config, groups: ProcessGroups, cuda_device: int = 0,
                 step_hooks: Iterable[Callable[[int], None]] = (),
                 save_hooks: Iterable[Callable[[int, str], None]] = ()):
        self.groups, self.step_hooks, self.save_hooks = groups, list(step_hooks), list(save_hooks)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.log = print if self.rank == 0 else (lambda *a, **k: None)
        self.cfg = cfg = resolve_data(cfg, self.log)
        self.device = pick_device(cfg.train.device, cuda_device)
        self.run_dir = resolve_run_dir(cfg)
        self.ckpt_dir = checkpoint_root(cfg, self.run_dir)
        self.lock = lock_for_all_ranks([self.run_dir, self.ckpt_dir], self.rank, broadcast_from_rank0)
        g = groups
        self.layout = Layout(g.tp_size, g.pp_size, g.topology.world_size, g.topology.virtual_stages,
                             g.topology.order, cfg.parallel.partition, g.cp_size, g.ep_size)
        self._checked_resume: Path | None = None
        self.check_resume()
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        seed_everything(cfg.train.seed)
        p = cfg.parallel
        self.model = build_stage_model(cfg.model, g.pp_size, g.pp_rank, g.topology.virtual_stages, g.tp_group,
                                       p.sequence_parallel, cfg.train.activation_checkpointing, cfg.train.seed,
                                       p.partition, cfg.train.recompute_num_layers,
                                       cfg.train.compile, g.cp_group, g.ep_group).to(self.device)
        self.model.z_loss = cfg.optim.z_loss
        self.engine = build_engine(cfg, self.model, groups, self.device.type)
        self.accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * groups.dp_size)
        self.eod = document_eod(cfg.data)  # None: attention crosses document boundaries (plain causal)
        self.runner = PipelineRunner(self.model, groups, self.engine, self.accum, cfg.data.seq_len,
                                     cfg.train.micro_batch_size, p.schedule, self.device, self._autocast,
                                     self.compute_dtype)
        self.datasets = build_datasets(cfg.data, samples_per_split(cfg))
        self.step = 0
        self.data_position = 0  # samples of the training order read or skipped (megalite.stability)
        self.stability = Stability(cfg.train, self.log)
        self.rampup = parse_rampup(cfg.train.rampup_batch_size, cfg.train.global_batch_size)
        self._iter_batch = 0  # the global batch the training iterator was built for
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.train.steps, enabled=self.rank == 0)
        # MFU's FLOPs per token at a sequence length (the attention term grows with it: a warm-up's vary)
        # MoE: the parameters a token's matmuls touch (its top_k experts), not all of them
        self.flops_per_token = functools.partial(flops_per_token, active_matmul_parameters(cfg.model),
                                                 cfg.model.num_layers,
                                                 cfg.model.num_heads, head_dim(cfg.model))

    @property
    def batch_now(self) -> int:
        """The global batch of the next step: train.global_batch_size, or its ramp's (train.rampup_batch_size)."""
        return batch_size_at(self.data_position, self.rampup, self.cfg.train.global_batch_size)

    def _train_iter(self):
        """Micro-batches of the training order from data_position (past any skipped range), in global batches
        of the current size; a ramp counts them from here, where the size was set."""
        self.data_position = skip_ahead(self.data_position, self.stability.ranges)
        self._iter_batch, t = self.batch_now, self.cfg.train
        if self.rampup is None:
            return iter(self._loader("train", self.data_position))
        return iter(build_dataloader(self.datasets["train"], self._iter_batch, t.micro_batch_size,
                                     self.groups.dp_rank, self.groups.dp_size, 0, self.cfg.data.num_workers,
                                     seed=t.seed, eod=self.eod, first_sample=self.data_position))

    def _loader(self, split: str, consumed_samples: int):
        t = self.cfg.train
        return build_dataloader(self.datasets[split], t.global_batch_size, t.micro_batch_size,
                                self.groups.dp_rank, self.groups.dp_size, consumed_samples,
                                self.cfg.data.num_workers, seed=t.seed, eod=self.eod)

    def describe(self) -> list[str]:
        """What was set up, in the words of the config: the first lines a run prints."""
        cfg, g, t = self.cfg, self.groups, self.cfg.train
        kind = schedule_kind(cfg.parallel.schedule, g.topology.virtual_stages)
        tokens = t.global_batch_size * cfg.data.seq_len
        cp = (f" cp={g.cp_size}" if g.cp_size > 1 else "") + (f" ep={g.ep_size}" if g.ep_size > 1 else "")
        return [f"megalite: {g.topology.world_size} rank(s) on {self.device} ({t.precision}): tp={g.tp_size}{cp} "
                f"pp={g.pp_size} dp={g.dp_size}, engine {cfg.engine.backend}"
                f"{f' ZeRO-{cfg.engine.zero_stage}' if cfg.engine.backend == 'deepspeed' else ''}, schedule {kind} "
                f"over {self.accum} micro-batch(es) of {t.micro_batch_size}",
                f"megalite: {total_parameters(cfg.model) / 1e6:.2f}M parameters "
                f"({matmul_parameters(cfg.model) / 1e6:.2f}M in matmuls{self._active_note()}, "
                f"{self.model.num_parameters() / 1e6:.2f}M on this rank); "
                f"{tokens:,} tokens per step ({t.global_batch_size} x {cfg.data.seq_len}) for {t.steps} steps",
                f"megalite: run directory {self.run_dir} (config.yaml, metrics.jsonl, checkpoints in {self.ckpt_dir})"]

    def _active_note(self) -> str:
        """', 0.52M active per token' for an MoE model (what MFU counts), else ''."""
        m = self.cfg.model
        return f", {active_matmul_parameters(m) / 1e6:.2f}M active per token" if m.moe_num_experts else ""

    # ----------------------------------------------------------------- loop
    def fit(self, stop_after: int | None = None) -> dict:
        """Train to train.steps (or stop cleanly, with a checkpoint, after step `stop_after`
        or when SIGTERM/SIGINT arrives); returns the last step's metrics. The run lock is held
        throughout and released at the end."""
        if self.lock is None and self.rank == 0:
            self.lock = lock_for_all_ranks([self.run_dir, self.ckpt_dir], 0)
        try:
            with StopSignal(self.device) as stop:
                return self._fit(stop, stop_after)
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def _fit(self, stop: StopSignal, stop_after: int | None) -> dict:
        for line in self.describe():
            self.log(line)
        self.maybe_resume()
        t = self.cfg.train
        train_iter, last, final, saved = None, {}, {}, False
        while self.step < t.steps:
            if (train_iter is None or skip_ahead(self.data_position, self.stability.ranges) != self.data_position
                    or self.batch_now != self._iter_batch):
                train_iter = self._train_iter()
            self.step += 1
            for hook in self.step_hooks:
                hook(self.step)
            last = self.train_step(train_iter)
            if last is None:  # rolled back to the latest checkpoint: the data after the spike, at its step
                train_iter = None
                continue
            if self.step % self.cfg.logging.interval == 0 or self.step == t.steps:
                self.metrics.log(self.step, last)
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps):
                final = self.evaluate()
                self.metrics.log(self.step, final)
            interval = self.cfg.checkpoint.interval
            saved = bool(interval) and self.step % interval == 0
            if saved:
                self.save()
            if self.step == stop_after or stop.received():
                self.log(f"stopping cleanly after step {self.step}")
                break
        if not saved:  # the end of training (or a clean stop) always leaves a checkpoint
            self.save()
        self.metrics.close()
        return {**last, **final}

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of activations and of everything between blocks (pipeline sends included)."""
        return COMPUTE_DTYPES[self.cfg.train.precision]

    @property
    def seq_len_now(self) -> int:
        """This step's training sequence length (data.seq_len, or its warm-up's data.seq_len_schedule)."""
        return seq_len_at(self.cfg.data.seq_len_schedule, self.cfg.data.seq_len, self.step)

    def train_step(self, train_iter) -> dict:
        start = time.perf_counter()
        take_comm_bytes()  # count only this step's traffic, not evaluation's
        self.model.train()
        batch = self.batch_now
        accum = batch // (self.cfg.train.micro_batch_size * self.groups.dp_size)
        self.runner.set_micro_batches(accum)
        if hasattr(self.engine, "set_micro_batches"):
            self.engine.set_micro_batches(accum)
        batches = cut_batches([next(train_iter) for _ in range(accum)], self.seq_len_now)
        self.data_position += batch
        loss_sum = self.runner.train_batch(batches)
        action = self.stability.action
        loss = self._dp_mean(loss_sum) if action == "skip" else None  # known before the update
        if loss is not None and self.stability.loss_before_update(self.step, loss, self.device):
            self.engine.zero_grad()
            result = StepResult(grad_norm=math.nan, skipped=True, lr=self.engine.schedule.current_lr,
                                loss_scale=getattr(self.engine, "loss_scale", 1.0))
        else:
            result = self.engine.step()
        loss = self._dp_mean(loss_sum) if loss is None else loss
        if action in ("log", "rollback") or (action == "skip" and not result.skipped):
            values = {"grad_norm": result.grad_norm} if action == "skip" else {"loss": loss,
                                                                               "grad_norm": result.grad_norm}
            spike = self.stability.after_update(self.step, values, self.device, world=action != "skip")
            if spike and action == "rollback":
                self.rollback(spike)
                return None
            if spike:
                self.log(f"step {self.step}: spike: {spike}" + (" (the update was applied: a grad-norm spike is "
                                                                "seen inside the optimizer step)" if action == "skip"
                                                                else ""))
        if not math.isfinite(loss) and action in ("off", "log"):  # 'skip' dropped the update, 'rollback' returned
            raise TrainingDiverged(f"loss is {loss} at step {self.step}; last good checkpoint: "
                                   f"{latest_checkpoint(self.ckpt_dir) or 'none saved yet'}")
        return {**self._step_metrics(loss, result, time.perf_counter() - start, batch), **self.runner.moe_metrics()}

    def rollback(self, spike: str) -> None:
        """Reload the latest checkpoint, record the samples read since it as skipped, continue after them."""
        path, s = latest_checkpoint(self.ckpt_dir), self.stability
        if path is None or s.rollbacks >= s.max_rollbacks:
            why = ("no checkpoint has been saved to roll back to" if path is None else
                   f"train.stability_max_rollbacks={s.max_rollbacks} rollbacks were spent")
            raise TrainingDiverged(f"step {self.step}: spike ({spike}) and {why}; skipped so far: {s.ranges}")
        end, spiked_at = self.data_position, self.step
        progress = self._load(path)
        s.rollbacks += 1
        s.record_skip(progress.consumed_samples, end)
        s.detector.forget_after(self.step)
        self.data_position = end
        t = self.cfg.train
        if t.stability_rollback_lr_steps and t.stability_rollback_lr_scale != 1.0:  # step carefully past it
            self.engine.schedule.damp(self.step + t.stability_rollback_lr_steps, t.stability_rollback_lr_scale)
        self.log(f"step {spiked_at}: spike: {spike}; rolled back to {path} (step {self.step}), skipping samples "
                 f"[{progress.consumed_samples}, {end}) (rollback {s.rollbacks} of {s.max_rollbacks})")
        if self.rank == 0:
            _write_skipped(self.run_dir, s.ranges)

    def _dp_mean(self, value: torch.Tensor) -> float:
        if self.groups.dp_size > 1:
            value = value.clone()
            dist.all_reduce(value, group=self.groups.dp_group)
            value /= self.groups.dp_size
        return float(value)

    def _step_metrics(self, loss: float, result, seconds: float, batch: int) -> dict:
        t = self.cfg.train
        tokens_per_s = batch * self.cfg.data.seq_len / seconds
        peak = peak_flops(self.device, t.precision)
        world = self.groups.topology.world_size
        return {"loss": loss, "lr": result.lr, "grad_norm": result.grad_norm, "loss_scale": result.loss_scale,
                "skipped": result.skipped, "seq_len": self.seq_len_now, "tokens_per_s": tokens_per_s,
                "mfu": self.flops_per_token(self.seq_len_now) * tokens_per_s / (peak * world) if peak else None,
                "step_time_s": seconds, "peak_mem_gb": peak_memory_gb(self.device),
                "consumed_samples": self.data_position, **({"global_batch_size": batch} if self.rampup else {}),
                **{f"comm_{key}_bytes": n for key, n in take_comm_bytes().items()}}

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> dict:
        """Mean loss (and perplexity) over the first eval_steps global batches of `split`."""
        self.model.eval()
        self.runner.set_micro_batches(self.accum)  # evaluations read whole global batches, ramp or not
        it, total = iter(self._loader(split, 0)), torch.zeros((), device=self.device)
        for _ in range(self.cfg.train.eval_steps):
            for value in self.runner.eval_batch([next(it) for _ in range(self.accum)]):
                total += value
        loss = self._dp_mean(total / (self.cfg.train.eval_steps * self.accum))
        return {f"{split}_loss": loss, f"{split}_ppl": math.exp(min(loss, 50.0))}

    # ---------------------------------------------------------- checkpoints
    def _state(self) -> RankState:
        return RankState(model=self.model.state_dict(), shards=self.engine.shard_metadata(),
                         engine=self.engine.state_dict(),
                         rng={**rng_state(), "tp_tracker": self.model.rng_tracker.get_state()},
                         progress=Progress(self.step, self.data_position, data_order(self.cfg),
                                           [list(r) for r in self.stability.ranges]),
                         layout=self.layout)

    def save(self) -> None:
        path = save_checkpoint(self.ckpt_dir, self.step, self.rank, self._state().to_dict(),
                               world_size=self.layout.world_size,
                               barrier=dist.barrier if dist.is_initialized() else None,
                               keep_last=self.cfg.checkpoint.keep_last,
                               extra_files={"config.yaml": to_yaml(self.cfg)}, on_phase=self._save_phase)
        self.log(f"step {self.step}: checkpoint saved to {path}")

    def check_resume(self) -> Path | None:
        """The checkpoint train.resume names, having passed every check short of loading it; None to start
        afresh. Runs before anything is written, and again only if the answer changed by the time fit starts."""
        path = resume_point(self.ckpt_dir, self.cfg.train.resume)
        if path is not None and path != self._checked_resume:
            check_before_resume(path, self.rank, self.layout, data_order(self.cfg))
        self._checked_resume = path
        return path

    def _save_phase(self, phase: str) -> None:
        for hook in self.save_hooks:
            hook(self.step, phase)

    def maybe_resume(self) -> None:
        path = self.check_resume()  # world size, files, layout and data order: checked, not again
        if path is None:
            return
        progress = self._load(path)
        self.data_position = progress.consumed_samples
        self.stability.ranges = sorted({*self.stability.ranges, *(tuple(r) for r in progress.skipped_samples)})
        self.log(f"resumed from {path} at step {self.step}")

    def _load(self, path: Path) -> Progress:
        """Model, engine, RNG and step from checkpoint `path`; returns its progress record."""
        state = RankState.from_dict(load_checkpoint(path, self.rank, verified=True), path)
        self.model.load_state_dict(state.model)
        self.engine.load_state_dict(state.engine)
        set_rng_state(state.rng)
        self.model.rng_tracker.set_state(state.rng["tp_tracker"])
        self.step = state.progress.step
        return state.progress


def _write_skipped(run_dir: Path, ranges: list) -> None:
    """run_dir/skipped_samples.json: the sample ranges the run skipped, for people and inspect_data."""
    (run_dir / "skipped_samples.json").write_text(json.dumps([list(r) for r in ranges]) + "\n")
