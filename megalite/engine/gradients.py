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

The native engine's data-parallel all-reduce runs either blocking, after backward (`allreduce_mean`),
or overlapped with backward (`OverlappedAllReduce`): the same buckets' sums, launched as soon as the
global batch's last gradient of a bucket exists.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megalite.distributed import comm
from megalite.tensor_parallel import in_grad_norm, sharding_of

DEFAULT_BUCKET_ELEMS = 25_000_000


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _buckets(grads: list[torch.Tensor], bucket_elems: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of same-dtype, same-device gradients (or parameters) of about bucket_elems elements."""
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


class OverlappedAllReduce:
    """Averages data-parallel gradients in buckets while backward is still running.

    Why: the blocking reduction waits for all of backward and then sends every gradient; here a
    bucket's all_reduce starts as soon as its last gradient of the global batch exists, so the
    communication of the late layers' gradients hides behind the backward of the early ones.

    `named_params`: (name, parameter) in registration order. They are bucketed in reverse (about the
    order backward produces them, as torch DDP and Megatron do), `bucket_elems` elements a bucket.
    A post-accumulate-grad hook counts each parameter's accumulations; a bucket launches when every
    one of its parameters has had `micro_batches` of them, i.e. in the global batch's last backward
    through it, whenever the schedule runs that (under an interleaved pipeline each chunk's last
    backward comes at its own time). Accumulation micro-batches therefore communicate nothing.

    Launching concatenates the bucket's gradients into one new flat buffer [n] and makes each p.grad
    a view of it, so the reduced values need no copy back; the old gradients are freed, so this
    holds no more memory than the blocking path (one bucket's copy at a time until it launches, then
    the grads themselves). The buffer is per step, not persistent: a persistent one would need p.grad
    allocated (zeros) before the first micro-batch, which turns "no gradient" (None, skipped by the
    norm and by AdamW) into a zero gradient that AdamW would step on.

    `finish()` waits for the launched buckets and divides them by the group size; a bucket that never
    launched (a parameter without a gradient, or fewer backward calls than `micro_batches`) is
    reduced there synchronously, its missing gradients left out as the blocking path does. Every dp
    rank runs the same model and schedule, so all ranks launch the same buckets in the same order
    and leave out the same parameters: the flat layouts agree without zero padding. `deferred`
    parameters (the tied table that the pipeline sums over its first and last stage after backward)
    are never launched early, only reduced in `finish()`, after that sum, as in the blocking order.

    Results: each element is the same all_reduce sum divided by the same size as in the blocking
    path. With 2 ranks the sum a + b is bitwise the blocking one whatever the bucket layout; with more
    ranks gloo's ring may add an element's terms in another order when its offset in the bucket
    differs (a few ulps).
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], group, micro_batches: int,
                 bucket_elems: int = DEFAULT_BUCKET_ELEMS, deferred: tuple = ()):
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches} must be >= 1 (backward calls per optimizer step)")
        self.group, self.size, self.micro_batches = group, _group_size(group), micro_batches
        self.bucket_elems = bucket_elems
        deferred_ids = {id(p) for p in deferred}
        self.names = {id(p): n for n, p in named_params}
        self.deferred = [p for _, p in named_params if id(p) in deferred_ids]
        early = [p for _, p in reversed(named_params) if id(p) not in deferred_ids]
        self.buckets: list[list[torch.nn.Parameter]] = list(_buckets(early, bucket_elems))
        self.bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self.handles = [self._register(p) for p in early]
        self.reset()

    def _register(self, p: torch.nn.Parameter):
        this = weakref.ref(self)  # the hook must not keep a dropped engine's reducer alive

        def hook(param: torch.nn.Parameter) -> None:
            reducer = this()
            if reducer is not None:
                reducer._accumulated(param)

        return p.register_post_accumulate_grad_hook(hook)

    def reset(self) -> None:
        """Forget this global batch: no accumulation counted, nothing launched (waits for in-flight work)."""
        comm.wait(*(work for _, work in getattr(self, "launched", {}).values()))
        self.counts: dict[int, int] = {}         # id(param) -> accumulations this global batch
        self.ready = [0] * len(self.buckets)     # bucket -> parameters with all their accumulations
        self.launched: dict[int, tuple] = {}     # bucket -> (flat [n], async work)

    def _accumulated(self, p: torch.nn.Parameter) -> None:
        n = self.counts[id(p)] = self.counts.get(id(p), 0) + 1
        if n > self.micro_batches:
            raise RuntimeError(
                f"parameter {self.names[id(p)]} received gradient {n} of this global batch, but the engine "
                f"expects {self.micro_batches} backward call(s) per step and all-reduces a bucket at its "
                f"parameters' last one, so later gradients would be lost; pass NativeEngine(micro_batches={n}) "
                "(or set train.global_batch_size to micro_batch_size x accumulation x dp), or overlap=False")
        if n == self.micro_batches:
            b = self.bucket_of[id(p)]
            self.ready[b] += 1
            if self.ready[b] == len(self.buckets[b]):
                self._launch(b)

    def _launch(self, b: int) -> None:
        """Start bucket b's all_reduce; its p.grad become views of the flat buffer being summed."""
        bucket = self.buckets[b]
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # [sum of numels]
        offset = 0
        for p in bucket:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        comm.record("all_reduce", flat, "dp")
        self.launched[b] = (flat, dist.all_reduce(flat, group=self.group, async_op=True))

    def finish(self) -> None:
        """Wait for and average the launched buckets, reduce the rest now; then reset for the next batch."""
        for b, bucket in enumerate(self.buckets):
            if b in self.launched:
                flat, work = self.launched.pop(b)
                comm.wait(work)
                flat.div_(self.size)  # gloo has no AVG op; the p.grad views see the mean
            else:
                whole = sum(p.numel() for p in bucket)  # one collective for what the bucket holds
                allreduce_mean([p.grad for p in bucket if p.grad is not None], self.group, whole)
        allreduce_mean([p.grad for p in self.deferred if p.grad is not None], self.group, self.bucket_elems)
        self.reset()

    def remove(self) -> None:
        """Unregister the hooks (the parameters then accumulate gradients as if no reducer existed)."""
        self.reset()
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _summed_norm(norm: torch.Tensor, group) -> torch.Tensor:
    """A per-rank norm's square summed over `group`, square-rooted."""
    if _group_size(group) == 1:
        return norm
    sq = norm.square().reshape(1)
    dist.all_reduce(sq, group=group)
    return sq.sqrt().reshape(())


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

    `tp_group` / `mp_group`: the tensor-parallel and model-parallel (tp x pp) groups (None: one rank);
    `ep_group`: the expert-parallel group whose ranks hold different experts (their squares add up).
    """

    def __init__(self, params: list[torch.nn.Parameter], tp_group=None, mp_group=None, ep_group=None):
        self.tp_group, self.mp_group, self.ep_group = tp_group, mp_group, ep_group
        tp_rank = dist.get_rank(tp_group) if _group_size(tp_group) > 1 else 0
        self.sequence_parallel = [p for p in params if sharding_of(p).sequence_parallel and p.requires_grad]
        self.in_norm = [p for p in params if in_grad_norm(p, tp_rank) and not sharding_of(p).expert_parallel]
        self.experts_in_norm = [p for p in params if in_grad_norm(p, tp_rank) and sharding_of(p).expert_parallel]

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
        if not self.experts_in_norm:
            return global_grad_norm([p.grad for p in self.in_norm if p.grad is not None], self.mp_group)
        dense = global_grad_norm([p.grad for p in self.in_norm if p.grad is not None])
        experts = global_grad_norm([p.grad for p in self.experts_in_norm if p.grad is not None], self.ep_group)
        return _summed_norm(torch.sqrt(dense.square() + experts.to(dense.device).square()), self.mp_group)


def clip_to_norm(params: list[torch.nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Scale every gradient of `params` by max_norm / norm when norm exceeds max_norm (0 disables)."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm.to(grads[0].device))
