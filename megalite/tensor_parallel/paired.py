"""A column-parallel linear whose output rows alternate between two kinds, returned as two tensors.

SwiGLU's fc1 stores gate and up rows interleaved (gate_0, up_0, gate_1, up_1, ...), so that any
contiguous tp shard holds whole pairs and the full matrix does not depend on tp. One matmul
against it yields an interleaved [.., 2f] output whose halves must then be copied apart (silu and
the product run element by element on stride-2 views) and whose gradient must be interleaved
again. Here the weight's even and odd rows are two strided views, W.view(f, 2, in)[:, 0] and
[:, 1]; BLAS takes a row stride of 2*in as it is, so two matmuls write gate and up contiguous with
no copy of the activation or the weight, and backward writes both halves of the weight gradient
into their interleaved rows directly (mm's out= accepts a row stride). On a CPU (a microbenchmark
of T=1024 tokens, h=256, f=768) forward took 12.5 ms instead of 17.3 and backward's matmuls 15.1
instead of 20.3 against one matmul plus the split; tools/bench_vs_hf.py shows its share of the
whole step (issue 15's closing note). The forward products are the
same dot products, so gate and up are bitwise those of the single matmul; the input gradient sums
the two halves' contributions separately (a different order of the same terms).
"""
from __future__ import annotations

import torch

from megalite.distributed import comm
from megalite.tensor_parallel.mappings import all_gather_dim, compute_dtype, start_reduce_scatter_first


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Even and odd rows (dim 0) of a [2f, ...] tensor as strided views [f, ...]."""
    pairs = t.view(-1, 2, *t.shape[1:])
    return pairs[:, 0], pairs[:, 1]


class _PairedLinear(torch.autograd.Function):
    """(x W_even^T + b_even, x W_odd^T + b_odd), x all-gathered along dim 0 first when `sp_group` is
    given (sequence parallelism: only this rank's x is kept, gathered again in backward, and the
    input gradient reduce-scattered). Under autocast the products run in the autocast dtype, as
    F.linear's would; the gradients are handed back in the inputs' own dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, sp_group):
        dtype = compute_dtype(x)
        ctx.sp_group, ctx.has_bias, ctx.dtypes = sp_group, bias is not None, (x.dtype, weight.dtype)
        x, weight = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x, weight)  # a 16-bit weight copy under autocast, as F.linear keeps
        full = x if sp_group is None else all_gather_dim(x, 0, sp_group)
        w_even, w_odd = _halves(weight)
        b_even, b_odd = (None, None) if bias is None else _halves(bias.to(dtype))
        with torch.autocast(x.device.type, enabled=False):
            return (torch.nn.functional.linear(full, w_even, b_even),
                    torch.nn.functional.linear(full, w_odd, b_odd))

    @staticmethod
    def backward(ctx, d_even, d_odd):
        x, weight = ctx.saved_tensors
        full = x if ctx.sp_group is None else all_gather_dim(x, 0, ctx.sp_group)
        w_even, w_odd = _halves(weight)
        n_in, n_half = weight.shape[-1], w_even.shape[0]
        d_even = d_even.to(x.dtype).reshape(-1, n_half)
        d_odd = d_odd.to(x.dtype).reshape(-1, n_half)
        d_x = d_even.matmul(w_even).addmm_(d_odd, w_odd).view(*full.shape)
        pending = None
        if ctx.sp_group is not None:  # its reduce-scatter runs (on NCCL) while the weight gradient is computed
            d_x, pending = start_reduce_scatter_first(d_x, ctx.sp_group)
        flat = full.reshape(-1, n_in)
        if torch.compiler.is_compiling():  # Dynamo refuses a strided out=; Inductor fuses the stack anyway
            d_w = torch.stack((d_even.t().mm(flat), d_odd.t().mm(flat)), dim=1).view(weight.shape)
        else:
            d_w = torch.empty_like(weight)
            for d_half, out in zip((d_even, d_odd), _halves(d_w)):
                torch.mm(d_half.t(), flat, out=out)  # straight into the interleaved rows
        d_b = torch.stack((d_even.sum(0), d_odd.sum(0)), dim=-1).flatten() if ctx.has_bias else None
        comm.wait(pending)
        x_dtype, w_dtype = ctx.dtypes
        return d_x.to(x_dtype), d_w.to(w_dtype), None if d_b is None else d_b.to(w_dtype), None


def paired_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  sp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(even, odd) output features of x W^T + b for W [2f, in] with alternating rows: each [.., f],
    contiguous. `sp_group`: all-gather x [s/tp, ..] along dim 0 first (sequence parallelism)."""
    if weight.shape[0] % 2:
        raise ValueError(f"paired_linear needs an even number of output rows, got weight {tuple(weight.shape)}")
    return _PairedLinear.apply(x, weight, bias, sp_group)
