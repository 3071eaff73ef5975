"""Tensor-parallel linear and embedding layers.

Each layer owns one shard of a full weight and says in its docstring which
dim is split and which collectives run forward and backward. All
communication goes through `mappings`, whose functions are no-ops for a group
of one, so tp=1 runs this very code.

Every parameter's layout is one `sharding.Sharding` record: sharded ones carry
their split dim (`partition_dim`, of the tensor as stored); replicated ones whose
gradients are only partial under sequence parallelism carry `sequence_parallel`
(their gradients are summed over the tp group before the optimizer step).
Weights are drawn by `init.init_shard_` from the full tensor, so they do not
depend on the tp size; `init_weights(seed, prefix)` redraws them under a
stable name (the model calls it with each layer's module path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalite.tensor_parallel.init import InitMethod, init_shard_, normal_init
from megalite.tensor_parallel.mappings import (
    copy_to_tp_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
    sequence_parallel_linear,
)
from megalite.tensor_parallel.paired import paired_linear
from megalite.tensor_parallel.sharding import mark


def _divide(n: int, world: int, what: str) -> int:
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {world}; "
                         f"pick a multiple of {world} or a smaller tp")
    return n // world


class _ParallelBase(nn.Module):
    """Shared bits: the group, this rank's coordinates, init by stable name."""

    partition_dim: int = 0

    def __init__(self, tp_group, init_method: InitMethod | None):
        super().__init__()
        self.tp_group = tp_group
        self.tp_size = group_size(tp_group)
        self.tp_rank = group_rank(tp_group)
        self.init_method = init_method or normal_init(0.02)

    def init_weights(self, seed: int, prefix: str) -> None:
        """Draw this rank's shard of the full weight named `<prefix>.weight`; zero the bias."""
        init_shard_(self.weight, self.init_method, seed, f"{prefix}.weight", self.partition_dim,
                    self.tp_rank, self.tp_size)
        if getattr(self, "bias", None) is not None:
            with torch.no_grad():
                self.bias.zero_()


class ColumnParallelLinear(_ParallelBase):
    """y = x W^T + b with W [out, in] split along out (dim 0 of the stored weight).

    Each rank holds W[r*out/tp:(r+1)*out/tp] and the matching bias chunk and
    produces that slice of the output features.
    Forward: input copied in (sequence_parallel: all-gathered along dim 0
    from [s/tp, b, in] to [s, b, in], keeping only the [s/tp, b, in] part for
    backward, which gathers it again); output stays split, [.., out/tp],
    unless gather_output, which all-gathers the last dim.
    Backward: the input gradient is all-reduced (sequence_parallel:
    reduce-scattered back to [s/tp, b, in]).
    paired_output: the weight's rows alternate between two kinds (SwiGLU's gate and up) and forward
    returns them apart, (even, odd) features, each [.., out/(2 tp)] and contiguous (see `paired`).
    """

    partition_dim = 0

    def __init__(self, in_features: int, out_features: int, tp_group=None, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 init_method: InitMethod | None = None, init_seed: int | None = 0, paired_output: bool = False):
        super().__init__(tp_group, init_method)
        self.in_features, self.out_features = in_features, out_features
        self.out_local = _divide(out_features, self.tp_size, "out_features")
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.paired_output = paired_output
        if paired_output and (gather_output or self.out_local % 2):
            raise ValueError(f"paired_output needs this rank's features ({self.out_local}) even and no gather_output")
        self.weight = nn.Parameter(torch.empty(self.out_local, in_features))
        mark(self.weight, partition_dim=0)
        self.bias = nn.Parameter(torch.empty(self.out_local)) if bias else None
        if self.bias is not None:
            mark(self.bias, partition_dim=0)
        if init_seed is not None:
            self.init_weights(init_seed, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.paired_output:  # the same communication as below, in `paired`'s one function
            sp = self.sequence_parallel and self.tp_size > 1
            x = x if sp else copy_to_tp_region(x, self.tp_group)
            return paired_linear(x, self.weight, self.bias, self.tp_group if sp else None)
        if self.sequence_parallel:  # [s/tp, b, in] gathered to [s, b, in]; only the local part is kept
            y = sequence_parallel_linear(x, self.weight, self.bias, self.tp_group)
        else:
            y = F.linear(copy_to_tp_region(x, self.tp_group), self.weight, self.bias)  # [..., out/tp]
        return gather_from_tp_region(y, self.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (this rank: out {self.out_local}, "
                f"shard {self.tp_rank}/{self.tp_size}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_ParallelBase):
    """y = x W^T + b with W [out, in] split along in (dim 1 of the stored weight).

    Each rank holds W[:, r*in/tp:(r+1)*in/tp] and multiplies its chunk of the
    input features, giving a partial sum of the full output; the bias is
    replicated and added once, after the sum.
    Forward: input must already be split ([.., in/tp]) unless
    input_is_parallel=False, which scatters the last dim; the partial outputs
    are all-reduced (sequence_parallel: reduce-scattered along dim 0 to
    [s/tp, b, out]).
    Backward: the output gradient passes through (sequence_parallel: is
    all-gathered along dim 0); under sequence parallelism the bias gradient
    is partial (marked `sequence_parallel`).
    """

    partition_dim = 1

    def __init__(self, in_features: int, out_features: int, tp_group=None, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 init_method: InitMethod | None = None, init_seed: int | None = 0):
        super().__init__(tp_group, init_method)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear with sequence_parallel=True needs input_is_parallel=True")
        self.in_features, self.out_features = in_features, out_features
        self.in_local = _divide(in_features, self.tp_size, "in_features")
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local))
        mark(self.weight, partition_dim=1)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if self.bias is not None and sequence_parallel:
            mark(self.bias, sequence_parallel=True)
        if init_seed is not None:
            self.init_weights(init_seed, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group)  # [..., in] -> [..., in/tp]
        return self.reduce(F.linear(x, self.weight))  # [s, b, out], summed over ranks in reduce

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """This rank's partial product [s, b, out] -> the summed output (SP: [s/tp, b, out]) plus bias.

        Public so a caller that computes the product itself (the MLP fusing SwiGLU into it) shares
        the reduction; the bias is added in the activations' dtype (a 16-bit stream stays 16-bit).
        """
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)  # -> [s/tp, b, out]
        else:
            y = reduce_from_tp_region(partial, self.tp_group)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (this rank: in {self.in_local}, "
                f"shard {self.tp_rank}/{self.tp_size}), bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(_ParallelBase):
    """Embedding lookup with the table [V, h] split along the vocabulary (dim 0).

    Rank r holds rows [r*V/tp, (r+1)*V/tp). Each rank looks up the ids it
    owns, writes zeros for the others, and the partial results are summed.
    Forward: all-reduce (sequence_parallel: reduce-scatter along dim 0, so
    feed sequence-first ids [s, b] to get [s/tp, b, h]).
    Backward: the gradient passes through (sequence_parallel: all-gathered
    along dim 0) and each rank accumulates only its own rows. Ids outside
    [0, V) are not checked (that would cost a device sync per step); on a
    sharded table they silently embed to zero.
    """

    partition_dim = 0

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group=None,
                 init_method: InitMethod | None = None, sequence_parallel: bool = False,
                 init_seed: int | None = 0):
        super().__init__(tp_group, init_method)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.rows_local = _divide(num_embeddings, self.tp_size, "num_embeddings (padded vocabulary)")
        self.vocab_start = self.tp_rank * self.rows_local
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(self.rows_local, embedding_dim))
        mark(self.weight, partition_dim=0)
        if init_seed is not None:
            self.init_weights(init_seed, type(self).__name__)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            local = ids - self.vocab_start
            outside = (local < 0) | (local >= self.rows_local)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [*ids.shape, h]
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(ids, self.weight)  # [*ids.shape, h]
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)  # [s, b, h] -> [s/tp, b, h]
        return reduce_from_tp_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (this rank: rows {self.vocab_start}.."
                f"{self.vocab_start + self.rows_local - 1}, shard {self.tp_rank}/{self.tp_size}), "
                f"sequence_parallel={self.sequence_parallel}")
