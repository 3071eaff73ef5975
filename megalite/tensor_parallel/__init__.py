"""Tensor parallelism: paired collectives, parallel layers, vocab-parallel loss, sharded init, and the
one sharding record every parameter carries.

A `tp_group` of None (or of size one) turns every collective into a no-op, so
the same layers serve single-process runs.
"""
from megalite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.tensor_parallel.init import full_weight, init_model_weights, init_shard_, normal_init, param_seed
from megalite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megalite.tensor_parallel.mappings import (
    compute_dtype,
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
    sequence_parallel_linear,
)
from megalite.tensor_parallel.sharding import REPLICATED, Sharding, in_grad_norm, mark, shard_metadata, sharding_of

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "copy_to_tp_region", "reduce_from_tp_region", "scatter_to_tp_region", "gather_from_tp_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "sequence_parallel_linear", "compute_dtype",
    "group_size", "group_rank",
    "full_weight", "init_model_weights", "init_shard_", "normal_init", "param_seed",
    "REPLICATED", "Sharding", "in_grad_norm", "mark", "shard_metadata", "sharding_of",
]
