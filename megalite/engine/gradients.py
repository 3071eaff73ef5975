"""Gradients between backward and the optimizer step: reductions, the global norm, and the one
gradient policy both engines follow.

The policy comes from each parameter's sharding record (megalite.tensor_parallel.sharding):
- under sequence parallelism each tp rank sees its own chunk of the sequence, so the gradient of
  a replicated parameter marked `sequence_parallel` (norm gains, row-parallel biases) is a partial
  sum, summed over the tp group;
- the global grad norm sums squares over the model-parallel (tp x pp) group, counting a sharded
  parameter on every tp rank, a replicated one on tp rank 0 only and a pipeline copy of a tied
  table not at all, so it equals the norm of the unsharded model.
The native engine applies it after its data-parallel all-reduce; the DeepSpeed engine sums the
sequence-parallel gradients in hooks (before ZeRO's own reduction) and uses the norm at ZeRO-0.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from megalite.distributed import comm
from megalite.tensor_parallel import in_grad_norm, sharding_of

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


class GradientPolicy:
    """Which of `params` need a tensor-parallel sum and which count in the global norm.

    `tp_group` / `mp_group`: the tensor-parallel and model-parallel (tp x pp) groups (None: one rank).
    """

    def __init__(self, params: list[torch.nn.Parameter], tp_group=None, mp_group=None):
        self.tp_group, self.mp_group = tp_group, mp_group
        tp_rank = dist.get_rank(tp_group) if _group_size(tp_group) > 1 else 0
        self.sequence_parallel = [p for p in params if sharding_of(p).sequence_parallel and p.requires_grad]
        self.in_norm = [p for p in params if in_grad_norm(p, tp_rank)]

    def sum_sequence_parallel(self, bucket_elems: int = DEFAULT_BUCKET_ELEMS) -> None:
        """Sum the partial gradients of `sequence_parallel` parameters over the tp group (bucketed).

        Every tp rank must hold a gradient for the same such parameters (they run the same blocks);
        one without a gradient is left out.
        """
        grads = [p.grad for p in self.sequence_parallel if p.grad is not None]
        allreduce_mean(grads, self.tp_group, bucket_elems, average=False, label="tp")

    def sequence_parallel_hooks(self) -> list:
        """Per-parameter hooks that sum each sequence-parallel gradient over tp as autograd produces it
        (for an engine whose own backward reduces gradients before megalite could); handles returned."""
        if _group_size(self.tp_group) == 1:
            return []
        group = self.tp_group

        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()  # the incoming tensor may be shared with other graph nodes
            comm.record("all_reduce", grad)
            dist.all_reduce(grad, group=group)
            return grad

        return [p.register_hook(hook) for p in self.sequence_parallel]

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients, equal to the unsharded model's."""
        return global_grad_norm([p.grad for p in self.in_norm if p.grad is not None], self.mp_group)


def clip_to_norm(params: list[torch.nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Scale every gradient of `params` by max_norm / norm when norm exceeds max_norm (0 disables)."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.to(grads[0].device))
