"""The training loop: one step is micro-batches forward/backward, then the engine's step.

Reads top to bottom: `train_main` turns a command line into a Trainer (config
validated before any process group exists), `Trainer.fit` runs the steps,
evaluates, logs and checkpoints. Parallelism enters only through the
ProcessGroups object handed to the model, the engine and the data loader.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from megalite.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from megalite.checkpoint.io import read_manifest
from megalite.config import Config, ConfigError, load_config, save_config, to_yaml
from megalite.data.loader import build_dataloader, build_datasets
from megalite.engine import build_engine
from megalite.engine.checks import build_cpu_adam
from megalite.kernels.attention import document_ids
from megalite.metrics import MetricsLogger, flops_per_token, peak_flops, peak_memory_gb
from megalite.model import Transformer
from megalite.pipeline import PipelineRunner, build_stage_model
from megalite.preflight import preflight
from megalite.rng import rng_state, seed_everything, set_rng_state
from megalite.tensor_parallel.comm import take_comm_bytes
from megalite.topology import ProcessGroups, Topology, discover, init_distributed
from megalite.topology.failure import FailureGuard, inject_setup_fault, install_fault_injection, placement
from megalite.topology.launcher import device_index


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class StopSignal:
    """SIGTERM/SIGINT ask for a clean stop at the end of the current step (SLURM preemption,
    Ctrl-C); every rank must agree, so the flag is all-reduced before it is acted on."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, device: torch.device):
        self.flag, self.device, self.previous = False, device, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._set) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _set(self, signum, frame):
        self.flag = True

    def received(self) -> bool:
        if not dist.is_initialized():
            return self.flag
        flag = torch.tensor([float(self.flag)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train_main(config: str, overrides: list[str]) -> int:
    """`megalite train CONFIG [overrides]`: the same entry under every launcher."""
    env = discover()
    try:
        cfg = load_config(config, overrides)
        preflight(cfg, world_size=env.world_size)
        if cfg.engine.offload_optimizer:
            build_cpu_adam()  # the explicit build step (validation builds nothing)
    except ConfigError as e:
        print(f"megalite: invalid config:\n{e}", file=sys.stderr)
        return 2
    init_distributed(env, timeout_s=cfg.parallel.timeout_s)
    try:
        # Fixed before setup, so that a rank failing while the Trainer is built leaves its record there.
        cfg = replace(cfg, train=replace(cfg.train, run_dir=str(resolve_run_dir(cfg))))
        where = placement(build_topology(cfg, env.world_size), env.rank)
        # A failing rank records where it was and exits; the others follow within the timeout.
        with FailureGuard(cfg.train.run_dir, where, cfg.parallel.timeout_s) as guard:
            inject_setup_fault(env.rank)  # test-only hooks, inert unless MEGALITE_FAULT_INJECT is set
            cuda = device_index(env, torch.cuda.device_count()) if torch.cuda.is_available() else 0
            trainer = Trainer(cfg, build_groups(cfg, env.world_size), cuda_device=cuda)
            install_fault_injection(trainer)
            guard.attach(lambda: trainer.step)
            trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def build_topology(cfg: Config, world_size: int) -> Topology:
    p = cfg.parallel
    return Topology.from_world(world_size, tp=p.tp, pp=p.pp, dp=p.dp,
                               virtual_stages=p.virtual_stages, order=p.order)


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
    from megalite.data.demo import ensure_demo_data

    demo = ensure_demo_data(log=log)
    return replace(cfg, data=replace(cfg.data, path=[demo.prefix], tokenizer_model=demo.tokenizer_model))


def document_eod(data) -> int | None:
    """The end-of-document id that splits packed samples when data.reset_attention_mask is set, else None."""
    if not data.reset_attention_mask:
        return None
    if not data.tokenizer_model:
        raise ConfigError("data.reset_attention_mask=true needs the tokenizer's end-of-document id; "
                          "set data.tokenizer_model to the tokenizer the data was preprocessed with")
    from megalite.data.tokenizer import build_tokenizer

    return build_tokenizer(data.tokenizer_type, data.tokenizer_model).eod


def data_order_settings(cfg: Config) -> dict:
    """The settings that decide which training sample comes at which step (recorded in every checkpoint).

    train.steps is not among them: the sample order is prefix-stable, so a run may be extended."""
    d, t = cfg.data, cfg.train
    return {"data.path": [str(p) for p in d.path], "data.split": str(d.split), "data.seq_len": int(d.seq_len),
            "data.seed": int(d.seed), "train.global_batch_size": int(t.global_batch_size), "train.seed": int(t.seed)}


def check_data_order(saved: dict | None, current: dict, path) -> None:
    """Refuse to resume with another data order: the run would repeat some samples and skip others.
    Checkpoints written before these settings were recorded (or imported ones) carry none: not checked."""
    if not saved:
        return
    changed = [key for key in saved if key in current and saved[key] != current[key]]
    if changed:
        lines = "; ".join(f"{key} was {saved[key]!r} and is now {current[key]!r}" for key in changed)
        keep = " ".join(f"{key}={_override(saved[key])}" for key in changed)
        raise CheckpointError(f"{path} cannot be resumed: {lines}. These settings decide which training sample "
                              f"comes next, so the run would repeat some samples and skip others. Keep the saved "
                              f"values ({keep}) to resume, or start a new run in a new train.run_dir (or "
                              f"checkpoint.dir)")


def _override(value) -> str:
    return "[" + ",".join(value) + "]" if isinstance(value, list) else str(value)


class Trainer:
    """Owns the model, the engine, the data iterators, the logger and checkpointing."""

    def __init__(self, cfg: Config, groups: ProcessGroups, cuda_device: int = 0):
        self.groups = groups
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.log = print if self.rank == 0 else (lambda *a, **k: None)
        self.cfg = cfg = resolve_data(cfg, self.log)
        self.device = pick_device(cfg.train.device, cuda_device)
        self.run_dir = resolve_run_dir(cfg)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        seed_everything(cfg.train.seed)
        self.model = self._build_model().to(self.device)
        self.engine = build_engine(cfg, self.model, groups, self.device.type)
        self.accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * groups.dp_size)
        self.eod = document_eod(cfg.data)  # None: attention crosses document boundaries (plain causal)
        self.pipeline = None if groups.pp_size == 1 else PipelineRunner(
            self.model, groups, self.engine, self.accum, cfg.data.seq_len, cfg.train.micro_batch_size,
            cfg.parallel.schedule, self.device, self._autocast, eod=self.eod)
        self.datasets = build_datasets(cfg.data, self._samples_needed())
        self.step = 0
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, cfg.train.steps, enabled=self.rank == 0)

    def _build_model(self):
        """The whole Transformer, or with pp > 1 this rank's pipeline stage (same names, same init)."""
        cfg, g = self.cfg, self.groups
        kw = dict(tp_group=g.tp_group, sequence_parallel=cfg.parallel.sequence_parallel,
                  activation_checkpointing=cfg.train.activation_checkpointing, seed=cfg.train.seed)
        if g.pp_size == 1:
            return Transformer(cfg.model, **kw)
        return build_stage_model(cfg.model, g.pp_size, g.pp_rank, g.topology.virtual_stages,
                                 partition=cfg.parallel.partition, **kw)

    def _samples_needed(self) -> dict:
        t = self.cfg.train
        evals = (t.steps // t.eval_interval + 1) if t.eval_interval else 1
        return {"train": t.steps * t.global_batch_size, "valid": evals * t.eval_steps * t.global_batch_size,
                "test": t.eval_steps * t.global_batch_size}

    def _loader(self, split: str, consumed_samples: int):
        t = self.cfg.train
        return build_dataloader(self.datasets[split], t.global_batch_size, t.micro_batch_size,
                                self.groups.dp_rank, self.groups.dp_size, consumed_samples,
                                self.cfg.data.num_workers, seed=t.seed)

    # ----------------------------------------------------------------- loop
    def fit(self, stop_after: int | None = None) -> dict:
        """Train to train.steps (or stop cleanly, with a checkpoint, after step `stop_after`
        or when SIGTERM/SIGINT arrives); returns the last step's metrics."""
        with StopSignal(self.device) as stop:
            return self._fit(stop, stop_after)

    def _fit(self, stop: "StopSignal", stop_after: int | None) -> dict:
        self.maybe_resume()
        t = self.cfg.train
        train_iter = iter(self._loader("train", self.step * t.global_batch_size))
        self.log(f"training {self.model.num_parameters() / 1e6:.2f}M parameters for {t.steps} steps "
                 f"on {self.device} ({t.precision}); run directory {self.run_dir}")
        last, final, saved = {}, {}, False
        while self.step < t.steps:
            self.step += 1
            last = self.train_step(train_iter)
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
        precision = self.cfg.train.precision
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _micro_loss(self, batch) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]  # [b, s] each
        doc_ids = None if self.eod is None else document_ids(inputs, self.eod)  # [b, s]
        with self._autocast():
            return self.model.loss(inputs, labels, doc_ids).mean()

    def train_step(self, train_iter) -> dict:
        start = time.perf_counter()
        take_comm_bytes()  # count only this step's traffic, not evaluation's
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        if self.pipeline is not None:  # every stage reads the batch; the loss comes from the last
            loss_sum = self.pipeline.train_batch([next(train_iter) for _ in range(self.accum)])
        else:
            for _ in range(self.accum):
                loss = self._micro_loss(next(train_iter)) / self.accum
                self.engine.backward(loss)
                loss_sum += loss.detach()
        result = self.engine.step()
        loss = self._dp_mean(loss_sum)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss} at step {self.step}; last good checkpoint: "
                                   f"{latest_checkpoint(self.ckpt_dir) or 'none saved yet'}")
        return self._step_metrics(loss, result, time.perf_counter() - start)

    def _dp_mean(self, value: torch.Tensor) -> float:
        if self.groups.dp_size > 1:
            value = value.clone()
            dist.all_reduce(value, group=self.groups.dp_group)
            value /= self.groups.dp_size
        return float(value)

    def _step_metrics(self, loss: float, result, seconds: float) -> dict:
        t, m = self.cfg.train, self.cfg.model
        tokens_per_s = t.global_batch_size * self.cfg.data.seq_len / seconds
        flops = flops_per_token(self.model.flop_params() * self.groups.tp_size * self.groups.pp_size,
                                m.num_layers, m.num_heads, m.hidden_size // m.num_heads, self.cfg.data.seq_len)
        peak = peak_flops(self.device, t.precision)
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {"loss": loss, "lr": result.lr, "grad_norm": result.grad_norm, "loss_scale": result.loss_scale,
                "skipped": result.skipped, "tokens_per_s": tokens_per_s,
                "mfu": flops * tokens_per_s / (peak * world) if peak else None,
                "step_time_s": seconds, "peak_mem_gb": peak_memory_gb(self.device),
                "consumed_samples": self.step * t.global_batch_size,
                **{f"comm_{key}_bytes": n for key, n in take_comm_bytes().items()}}

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> dict:
        """Mean loss (and perplexity) over the first eval_steps global batches of `split`."""
        self.model.eval()
        it, total = iter(self._loader(split, 0)), torch.zeros((), device=self.device)
        n = self.cfg.train.eval_steps * self.accum
        if self.pipeline is not None:
            for _ in range(self.cfg.train.eval_steps):
                total += self.pipeline.eval_batch([next(it) for _ in range(self.accum)])
        else:
            for _ in range(n):
                total += self._micro_loss(next(it))
        loss = self._dp_mean(total / n)
        return {f"{split}_loss": loss, f"{split}_ppl": math.exp(min(loss, 50.0))}

    # ---------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        p = self.groups
        return {"model": self.model.state_dict(), "shards": self.engine.shard_metadata(),
                "engine": self.engine.state_dict(),
                "rng": {**rng_state(), "tp_tracker": self.model.rng_tracker.get_state()},
                "progress": {"step": self.step, "consumed_samples": self.step * self.cfg.train.global_batch_size,
                             "data_order": data_order_settings(self.cfg)},
                "layout": {"tp": p.tp_size, "pp": p.pp_size, "world_size": p.topology.world_size,
                           "virtual_stages": p.topology.virtual_stages, "order": p.topology.order,
                           "partition": self.cfg.parallel.partition}}

    def save(self) -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        path = save_checkpoint(self.ckpt_dir, self.step, self.rank, self._state(), world_size=world,
                               barrier=dist.barrier if dist.is_initialized() else None,
                               keep_last=self.cfg.checkpoint.keep_last,
                               extra_files={"config.yaml": to_yaml(self.cfg)})
        self.log(f"step {self.step}: checkpoint saved to {path}")

    def maybe_resume(self) -> None:
        resume = self.cfg.train.resume
        if resume == "none":
            return
        path = latest_checkpoint(self.ckpt_dir) if resume == "auto" else resume
        if path is None:
            return
        self._check_world_size(read_manifest(path)["world_size"], path)
        state = load_checkpoint(path, self.rank)
        self._check_layout(state["layout"], path)
        check_data_order(state["progress"].get("data_order"), data_order_settings(self.cfg), path)
        self.model.load_state_dict(state["model"])
        self.engine.load_state_dict(state["engine"])
        set_rng_state(state["rng"])
        self.model.rng_tracker.set_state(state["rng"]["tp_tracker"])
        self.step = int(state["progress"]["step"])
        self.log(f"resumed from {path} at step {self.step}")

    def _reshard_hint(self, path) -> str:
        p = self.groups
        return (f"python tools/convert_checkpoint.py reshard {path} OUT --tp {p.tp_size} --pp {p.pp_size} "
                f"--dp {p.dp_size} --virtual-stages {p.topology.virtual_stages}")

    def _check_world_size(self, saved: int, path) -> None:
        # Each rank loads its own file: another rank count would read files of another layout.
        world = self.groups.topology.world_size
        if saved != world:
            raise CheckpointError(f"{path} was written by {saved} ranks but this run has {world}; resume with "
                                  f"{saved} ranks, or write a copy for this layout first: {self._reshard_hint(path)}")

    def _check_layout(self, layout: dict, path) -> None:
        p = self.groups
        vp = layout.get("virtual_stages", 1)  # each rank's blocks depend on pp and virtual stages
        if (layout["tp"], layout["pp"], vp) != (p.tp_size, p.pp_size, p.topology.virtual_stages):
            raise CheckpointError(f"{path} was written with tp={layout['tp']} pp={layout['pp']} virtual_stages="
                                  f"{vp} but this run uses tp={p.tp_size} pp={p.pp_size} virtual_stages="
                                  f"{p.topology.virtual_stages}; resume with that layout, or convert it first: "
                                  f"{self._reshard_hint(path)}")
        # which blocks a stage holds, and which rank holds which coordinates (older checkpoints: defaults)
        for key, now, default in (("partition", self.cfg.parallel.partition, "uniform"),
                                  ("order", p.topology.order, p.topology.order)):
            saved = layout.get(key, default)
            if saved != now:
                raise CheckpointError(f"{path} was written with parallel.{key}={saved} but this run uses "
                                      f"parallel.{key}={now}; resume with parallel.{key}={saved}")
