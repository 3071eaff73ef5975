"""The plain-PyTorch engine: bucketed data-parallel all-reduce, AdamW, clipping, fp16 scaling.

Precision: the model always holds fp32 parameters, which are the master
weights the optimizer updates. For bf16 and fp16 the trainer runs the
forward pass under `torch.autocast(device_type, dtype=bfloat16|float16)`,
so matmuls run in low precision while parameters, gradients and optimizer
state stay fp32. This costs the memory of fp32 weights but needs no
separate master copy, no dtype bookkeeping in the optimizer, and keeps
bf16 and fp16 on one code path; fp16 adds dynamic loss scaling to keep small
gradients above fp16's underflow threshold.

Gradients are reduced once per global batch (in `step`), never per
micro-batch, so accumulation costs no communication.

Tensor parallelism: under sequence parallelism each tp rank sees its own
chunk of the sequence, so the gradients of replicated parameters marked
`sequence_parallel` (norm gains, row-parallel biases) are partial sums; they
are all-reduced (summed) over `tp_group` after the data-parallel reduction.
The global grad norm sums squares over `model_parallel_group`, counting a
parameter replicated on every tp rank (no `tensor_model_parallel` mark) on
tp rank 0 only, so it equals the norm of the unsharded model.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from megalite.config import OptimConfig, TrainConfig
from megalite.engine.base import Engine, StepResult
from megalite.engine.loss_scaler import build_scaler
from megalite.optim import LRSchedule, build_optimizer
from megalite.tensor_parallel import comm

DEFAULT_BUCKET_ELEMS = 25_000_000


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _buckets(grads: list[torch.Tensor], bucket_elems: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of same-dtype, same-device gradients of about bucket_elems elements."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.dtype, g.device), []).append(g)
    for same in by_kind.values():
        bucket, n = [], 0
        for g in same:
            if bucket and n + g.numel() > bucket_elems:
                yield bucket
                bucket, n = [], 0
            bucket.append(g)
            n += g.numel()
        if bucket:
            yield bucket


def allreduce_mean(grads: list[torch.Tensor], group, bucket_elems: int = DEFAULT_BUCKET_ELEMS,
                   average: bool = True, label: str = "dp") -> None:
    """Average (average=False: sum) `grads` in place over `group`: one all_reduce per flattened bucket.

    `label` names the group in the communication counters (comm.GROUPS).

    Bucketing trades a copy for far fewer collectives: hundreds of small
    parameter tensors would otherwise each pay the collective's latency.
    """
    size = _group_size(group)
    if size == 1:
        return
    for bucket in _buckets(grads, bucket_elems):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        comm.record("all_reduce", flat, label)
        dist.all_reduce(flat, group=group)
        if average:
            flat.div_(size)  # gloo has no AVG op; summing then dividing works on every backend
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def global_grad_norm(grads: list[torch.Tensor], group=None) -> torch.Tensor:
    """L2 norm of all `grads`, with squares summed over `group` (tp/pp ranks) when given."""
    if grads:
        sq = torch.nn.utils.get_total_norm(grads, norm_type=2.0).float().pow(2)
    else:
        sq = torch.zeros((), dtype=torch.float32)
    if _group_size(group) > 1:
        sq = sq.reshape(1)
        dist.all_reduce(sq, group=group)
    return sq.sqrt().reshape(())


class NativeEngine(Engine):
    """Plain-PyTorch engine: owns the AdamW optimizer, the LR schedule and the loss scaler.

    `dp_group`: data-parallel ProcessGroup (None or size 1: no gradient
    reduction). `model_parallel_group`: the tp x pp group over which the grad
    norm and the overflow decision are reduced (None: this rank alone).
    `tp_group`: the tensor-parallel group, over which gradients of
    parameters marked `sequence_parallel` are summed and replicated
    parameters are counted once in the grad norm (None: no tensor parallelism).
    """

    def __init__(self, model: nn.Module, optim_cfg: OptimConfig, train_cfg: TrainConfig, total_steps: int,
                 dp_group=None, model_parallel_group=None, device_type: str = "cpu",
                 bucket_elems: int = DEFAULT_BUCKET_ELEMS, tp_group=None):
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
        self.optimizer = build_optimizer(model, optim_cfg, device_type)
        self.schedule = LRSchedule(optim_cfg, total_steps)
        self.clip_grad = optim_cfg.clip_grad
        self.dp_group, self.mp_group, self.tp_group = dp_group, model_parallel_group, tp_group
        self.bucket_elems = bucket_elems
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.sp_params = [p for p in self.params if getattr(p, "sequence_parallel", False)]
        # replicated parameters contribute to the norm from tp rank 0 only; sharded ones from every rank;
        # a pipeline's second copy of a tied table (last stage) not at all
        tp_rank = dist.get_rank(tp_group) if _group_size(tp_group) > 1 else 0
        self.norm_params = [p for p in self.params if (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
                            and not getattr(p, "pipeline_duplicate", False)]

    def backward(self, loss: torch.Tensor) -> None:
        """Scale (fp16) and backpropagate one micro-batch loss; gradients accumulate."""
        self.scaler.scale(loss).backward()

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def reduce_gradients(self) -> None:
        """Average gradients over the data-parallel group.

        Every dp rank must hold gradients for the same parameters (true for
        replicas running the same model); a parameter without a gradient is
        left out of the reduction.
        """
        allreduce_mean(self._grads(), self.dp_group, self.bucket_elems)
        self.reduce_sequence_parallel_gradients()

    def reduce_sequence_parallel_gradients(self) -> None:
        """Sum the partial gradients of `sequence_parallel` parameters over the tp group.

        Every tp rank must hold a gradient for the same such parameters (they
        run the same blocks); one without a gradient is left out.
        """
        grads = [p.grad for p in self.sp_params if p.grad is not None]
        allreduce_mean(grads, self.tp_group, self.bucket_elems, average=False, label="tp")

    def clip_gradients(self) -> float:
        """Global grad norm before clipping; scales gradients down to clip_grad when it is exceeded."""
        grads = self._grads()
        norm = global_grad_norm([p.grad for p in self.norm_params if p.grad is not None], self.mp_group)
        if self.clip_grad > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_grad, norm.to(grads[0].device))
        return float(norm)

    def step(self) -> StepResult:
        """Reduce over dp, check for inf/nan (skip on overflow), unscale, clip, set lr, step, zero."""
        scale = self.scaler.loss_scale
        self.reduce_gradients()
        # after the dp all-reduce every dp rank sees the same gradients, so only tp/pp ranks
        # (which hold different shards) must agree on the overflow decision
        if self.scaler.update(self.scaler.found_inf(self.params, self.mp_group)):
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
        """Drop gradients (set to None, so the next backward allocates instead of adding)."""
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
