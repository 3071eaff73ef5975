"""The plain-PyTorch engine: bucketed data-parallel all-reduce, AdamW, clipping, fp16 scaling.

Precision: the model always holds fp32 parameters, which are the master
weights the optimizer updates. For bf16 and fp16 the trainer runs the
forward pass under `torch.autocast(device_type, dtype=bfloat16|float16)`,
so matmuls run in low precision while parameters, gradients and optimizer
state stay fp32. This costs the memory of fp32 weights but needs no
separate master copy, no dtype bookkeeping in the optimizer, and keeps
bf16 and fp16 on one code path; fp16 adds dynamic loss scaling to keep small
gradients above fp16's underflow threshold.

Gradients are reduced once per global batch, never per micro-batch, so
accumulation costs no communication. With dp > 1 the reduction overlaps
backward by default (gradients.OverlappedAllReduce: a bucket's all_reduce
starts in the last micro-batch's backward as soon as its gradients are
complete, and `step` waits for it); `overlap=False` keeps the blocking
reduction inside `step` (the benchmark's baseline, tools/bench_overlap.py).

Tensor and pipeline parallelism follow the one gradient policy
(megalite.engine.gradients): sequence-parallel partial gradients are summed over
`tp_group` after the data-parallel reduction, and the global grad norm counts
every parameter of the unsharded model once.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megalite.config import OptimConfig, TrainConfig
from megalite.engine.base import Engine, StepResult
from megalite.engine.gradients import (
    DEFAULT_BUCKET_ELEMS,
    GradientPolicy,
    OverlappedAllReduce,
    allreduce_mean,
    clip_to_norm,
)
from megalite.engine.loss_scaler import build_scaler
from megalite.optim import LRSchedule, build_optimizer
from megalite.tensor_parallel import group_size
from megalite.tensor_parallel.sharding import sharding_of


def accumulation_steps(train_cfg: TrainConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step on each dp rank, as the trainer computes them (at least 1)."""
    return max(1, train_cfg.global_batch_size // (train_cfg.micro_batch_size * dp_size))


class NativeEngine(Engine):
    """Plain-PyTorch engine: owns the AdamW optimizer, the LR schedule and the loss scaler.

    `dp_group`: data-parallel ProcessGroup (None or size 1: no gradient
    reduction). `model_parallel_group`: the tp x pp group over which the grad
    norm and the overflow decision are reduced (None: this rank alone).
    `tp_group`: the tensor-parallel group, over which gradients of
    parameters marked `sequence_parallel` are summed and replicated
    parameters are counted once in the grad norm (None: no tensor parallelism).
    `overlap`: with dp > 1, all-reduce buckets during the last micro-batch's backward (False: blocking,
    in `step`). `micro_batches`: backward calls per optimizer step that every parameter receives
    (None: train.global_batch_size / (micro_batch_size x dp), what the trainer runs); the overlapped
    reduction launches a bucket at its parameters' last one.
    """

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, train_cfg: TrainConfig, total_steps: int,
                 dp_group=None, model_parallel_group=None, device_type: str = "cpu",
                 bucket_elems: int = DEFAULT_BUCKET_ELEMS, tp_group=None, overlap: bool = True,
                 micro_batches: int | None = None, expert_groups: tuple = (None, None)):
        low = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
        if low:
            raise ValueError(f"NativeEngine keeps fp32 master weights in the model, but {low[:3]} are "
                             f"{model.get_parameter(low[0]).dtype}; keep the model fp32 and use "
                             "train.precision=bf16/fp16, which runs the forward under autocast")
        if bucket_elems < 1:
            raise ValueError(f"bucket_elems={bucket_elems} must be >= 1")
        self.model = model
        self.precision = train_cfg.precision
        self.scaler = build_scaler(train_cfg.precision, train_cfg.initial_loss_scale,
                                   train_cfg.loss_scale_window, train_cfg.min_loss_scale)
        self.optimizer = build_optimizer(model, optim_cfg, device_type, tp_group)
        self.schedule = LRSchedule(optim_cfg, total_steps)
        self.clip_grad = optim_cfg.clip_grad
        self.dp_group, self.mp_group, self.tp_group = dp_group, model_parallel_group, tp_group
        self.bucket_elems = bucket_elems
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # expert parallelism: (ep group, edp group); experts' gradients are not averaged over dp_group
        self.ep_group, self.edp_group = expert_groups
        self.experts = [p for p in self.params if sharding_of(p).expert_parallel]
        self.gradients = GradientPolicy(self.params, tp_group, model_parallel_group, self.ep_group)
        self.micro_batches = micro_batches or accumulation_steps(train_cfg, group_size(dp_group))
        self.reducer = self._overlapped_reducer(model) if overlap and group_size(dp_group) > 1 else None

    def set_micro_batches(self, m: int) -> None:
        """Backward calls per optimizer step from now on (train.rampup_batch_size changes the batch)."""
        self.micro_batches = m
        if self.reducer is not None:  # it all-reduces a bucket at its parameters' m-th backward
            self.reducer.micro_batches = m

    def _overlapped_reducer(self, model: nn.Module) -> OverlappedAllReduce:
        """Hooks on this engine's parameters; the tied table waits for the pipeline's first+last-stage sum."""
        mine = {id(p) for p in self.params} - {id(p) for p in self.experts}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in mine]  # registration order
        tied = getattr(model, "tied_weight", None)
        return OverlappedAllReduce(named, self.dp_group, self.micro_batches, self.bucket_elems,
                                   deferred=() if tied is None else (tied,))

    @property
    def loss_scale(self) -> float:
        """The scale backward multiplies the loss by (fp16's dynamic scale; 1 for fp32/bf16)."""
        return float(self.scaler.loss_scale)

    def backward(self, loss: torch.Tensor) -> None:
        """Scale (fp16) and backpropagate one micro-batch loss; gradients accumulate."""
        self.scaler.scale(loss).backward()

    def _grads(self) -> list[torch.Tensor]:
        experts = {id(p) for p in self.experts}
        return [p.grad for p in self.params if p.grad is not None and id(p) not in experts]

    def reduce_gradients(self) -> None:
        """Average gradients over the data-parallel group.

        Every dp rank must hold gradients for the same parameters (true for
        replicas running the same model); a parameter without a gradient is
        left out of the reduction. Overlapped: waits for the buckets backward launched and reduces
        the rest. Either way the sequence-parallel partial gradients are then summed over tp.
        """
        if self.reducer is None:
            allreduce_mean(self._grads(), self.dp_group, self.bucket_elems)
        else:
            self.reducer.finish()
        if self.experts:  # each holds the sum over its ep group's tokens: the mean over dp x cp is the
            grads = [p.grad for p in self.experts if p.grad is not None]  # sum over edp / (dp * cp)
            allreduce_mean(grads, self.edp_group, self.bucket_elems, average=False)
            replicas = group_size(self.dp_group)
            for g in grads:
                g.div_(replicas)
        self.gradients.sum_sequence_parallel(self.bucket_elems)

    def _found_inf(self) -> bool:
        """Whether any rank holding a shard of this model saw a non-finite gradient: the tp x pp ranks, and
        with expert parallelism every rank (ep ranks hold different experts, and each has tp/pp peers)."""
        found = self.scaler.found_inf(self.params, self.mp_group)
        if group_size(self.ep_group) > 1:
            flag = torch.tensor([float(found)], device=self.params[0].device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            found = bool(flag.item())
        return found

    def clip_gradients(self) -> float:
        """Global grad norm before clipping; scales gradients down to clip_grad when it is exceeded."""
        norm = self.gradients.grad_norm()
        clip_to_norm(self.params, self.clip_grad, norm)
        return float(norm)

    def step(self) -> StepResult:
        """Reduce over dp, check for inf/nan (skip on overflow), unscale, clip, set lr, step, zero."""
        scale = self.scaler.loss_scale
        self.reduce_gradients()
        # after the dp all-reduce every dp rank sees the same gradients, so only tp/pp ranks
        # (which hold different shards) must agree on the overflow decision
        if self.scaler.update(self._found_inf()):
            self.zero_grad()
            return StepResult(grad_norm=math.nan, skipped=True, lr=self.schedule.current_lr, loss_scale=scale)
        self.scaler.unscale(self.params)
        norm = self.clip_gradients()
        lr = self.schedule.advance()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.zero_grad()
        return StepResult(grad_norm=norm, skipped=False, lr=lr, loss_scale=scale)

    def zero_grad(self) -> None:
        """Drop gradients (set to None, so the next backward allocates instead of adding) and the
        overlapped reduction's count of this global batch."""
        if self.reducer is not None:
            self.reducer.reset()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "precision": self.precision}

    def load_state_dict(self, state: dict) -> None:
        missing = {"optimizer", "schedule", "scaler"} - set(state)
        if missing:
            raise KeyError(f"engine state lacks {sorted(missing)}; is this a NativeEngine checkpoint?")
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
