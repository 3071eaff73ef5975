"""Every tensor-parallel collective, as paired autograd functions.

Each public function is a forward collective with the matching backward
collective, so parallel layers never call torch.distributed themselves and
the gradient of every communication is correct by construction:

    function                                  forward                 backward
    copy_to_tp_region                         identity                all-reduce
    reduce_from_tp_region                     all-reduce              identity
    scatter_to_tp_region                      split last dim          all-gather last dim
    gather_from_tp_region                     all-gather last dim     split last dim
    scatter_to_sequence_parallel_region       split dim 0             all-gather dim 0
    gather_from_sequence_parallel_region      all-gather dim 0        reduce-scatter dim 0
    reduce_scatter_to_sequence_parallel_region reduce-scatter dim 0   all-gather dim 0
    sequence_parallel_linear                  all-gather dim 0, x W^T  all-gather again, reduce-scatter dx

The last one is the column-parallel linear under sequence parallelism as one function: it keeps
only this rank's [s/tp, b, in] input for backward and gathers it again there (Megatron's trade: one
more all-gather per linear for 1/tp of the activation memory at every column-parallel input).

`group=None` (or a group of one) means "no tensor parallelism": every
function returns its input unchanged, so a single process runs exactly the
code path of a sharded run. Note this differs from torch.distributed, where
None means the world group. The collectives used work on gloo (CPU tests)
and NCCL alike; gloo lacks reduce-scatter, so there it is an all-reduce
followed by taking this rank's chunk.

Each raw collective reports its payload to `comm` (see comm.py for what a
byte means), so a step's tensor-parallel traffic can be logged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.distributed import comm


def group_size(group) -> int:
    """Ranks in `group`; 1 for None or when torch.distributed is not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside `group`; 0 for None."""
    if group_size(group) == 1:
        return 0
    return dist.get_rank(group)


# ------------------------------------------------------------ raw collectives
def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, in place when `x` is contiguous (no [s, b, h] copy per all-reduce): every caller
    passes a tensor only the collective uses, a row-parallel partial output or a freshly computed gradient."""
    out = x.contiguous()
    comm.record("all_reduce", out)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = group_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {world} tensor-parallel ranks; "
                         f"make it a multiple of {world}")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def all_gather_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's x concatenated along `dim`, in rank order."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x, group=group)
    out = torch.cat(parts, dim=dim)
    comm.record("all_gather", out)
    return out


def _reduce_scatter_first(x: torch.Tensor, group) -> torch.Tensor:
    out, pending = start_reduce_scatter_first(x, group)
    comm.wait(pending)
    return out


def start_reduce_scatter_first(x: torch.Tensor, group):
    """(output, handle to wait on or None): the reduce-scatter of dim 0 launched asynchronously where the
    backend has one (NCCL), so the caller can compute meanwhile; done at once on gloo, which has none."""
    world = group_size(group)
    if x.shape[0] % world:
        raise ValueError(f"cannot reduce-scatter dim 0 of size {x.shape[0]} over {world} ranks; "
                         f"make the sequence length a multiple of the tensor-parallel size {world}")
    comm.record("reduce_scatter", x)
    if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter
        summed = x.contiguous().clone()
        dist.all_reduce(summed, group=group)  # not _all_reduce: it is counted as the reduce-scatter above
        return _split(summed, 0, group), None
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return out, dist.reduce_scatter_tensor(out, x.contiguous(), group=group, async_op=True)


# ------------------------------------------------------- autograd functions
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        if x.requires_grad and (x.is_leaf or x._base is not None):
            # a leaf or a view cannot be summed in place under autograd (never so in the model)
            return _all_reduce(x.clone(), group)
        out = _all_reduce(x, group)
        if out is x:
            ctx.mark_dirty(x)  # summed in place: autograd refuses a later use of the partial sum it replaced
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, 0, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_first(grad, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, 0, ctx.group), None


class _SequenceParallelLinear(torch.autograd.Function):
    """y = all_gather_0(x) W^T + b, saving x (this rank's [s/tp, ...]) rather than the gathered input.

    Under autocast the product runs in the autocast dtype, as F.linear's would: the weight is cast
    here (that copy is what backward keeps) and its gradient handed back in the weight's own dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        dtype = compute_dtype(x)
        ctx.group, ctx.has_bias, ctx.dtypes = group, bias is not None, (x.dtype, weight.dtype)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(all_gather_dim(x, 0, group), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        gathered = all_gather_dim(x, 0, ctx.group)  # again: the price of keeping 1/tp of it
        # the input gradient's reduce-scatter runs (on NCCL) while the weight gradient is computed
        grad_input, pending = start_reduce_scatter_first(grad.matmul(weight), ctx.group)
        grad_weight = grad.reshape(-1, grad.shape[-1]).t().matmul(gathered.reshape(-1, gathered.shape[-1]))
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        comm.wait(pending)
        x_dtype, w_dtype = ctx.dtypes
        grad_bias = None if grad_bias is None else grad_bias.to(w_dtype)
        return grad_input.to(x_dtype), grad_weight.to(w_dtype), grad_bias, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype activations on x's device are computed in: autocast's when it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# ------------------------------------------------------------- public entry
def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a column-parallel region: identity forward, all-reduce of the gradient backward."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a row-parallel region: sum partial results forward, pass the gradient through backward."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the last dim forward; all-gather the gradient backward."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's last-dim chunk forward; keep this rank's gradient chunk backward."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[s, ...] -> this rank's [s/tp, ...] forward; all-gather the gradient along dim 0 backward."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """[s/tp, ...] -> [s, ...] forward; reduce-scatter the gradient along dim 0 backward.

    The backward sums because what follows (a column-parallel layer) gives
    each rank only a partial gradient of the gathered input.
    """
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Partial [s, ...] -> summed [s/tp, ...] forward; all-gather the gradient along dim 0 backward."""
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)


def sequence_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group) -> torch.Tensor:
    """The column-parallel linear of [s/tp, b, in] under sequence parallelism: [s, b, out/tp], with the
    gradient of x reduce-scattered back to [s/tp, b, in]; only x is kept for backward (see the table)."""
    if group_size(group) == 1:
        return F.linear(x, weight, bias)
    return _SequenceParallelLinear.apply(x, weight, bias, group)
