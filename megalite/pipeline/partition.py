"""Split the model's ordered blocks into pipeline stages and build one rank's model.

The whole model is `blocks = [Embedding, TransformerBlock x L, Head]`
(megalite.model.Transformer). With pp ranks and v chunks per rank there are
S = pp*v virtual stages, each a contiguous run of block ids; virtual stage
c*pp + r is chunk c of rank r. The embedding is always in virtual stage 0 and
the head (with the loss) in S-1, because the runs are contiguous and cover
every block. pp = 1 is the one-stage case: one chunk of every block, the whole model.

A rank's model is a Transformer holding only its chunks, under their GLOBAL
names (`blocks.3.attn.qkv.weight`), each weight drawn from (seed, that name)
exactly as the whole model does, so a pp run starts from the pp=1 weights and
its checkpoint names match. With tied embeddings the last stage keeps its own
copy of the token table (named `blocks.{L+1}.weight`, as in the whole model's
state_dict), drawn from the embedding's name so both copies start equal;
`tie_embedding_grads` sums their gradients over the embedding group (first
and last stage) before each optimizer step, which keeps them equal.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.config import ModelConfig, choices
from megalite.distributed import comm
from megalite.model import Transformer, block_parameter_counts

PARTITIONS = choices("parallel.partition")


def partition_uniform(num_layers: int, stages: int) -> list[range]:
    """Block-id ranges of `stages` virtual stages with layers split evenly (earlier stages take the
    remainder); block 0 (embedding) joins the first, block L+1 (head) the last."""
    if num_layers < stages:
        raise ValueError(f"{num_layers} layers cannot fill {stages} pipeline stages (pp * virtual_stages); "
                         "lower pp or virtual_stages")
    base, extra = divmod(num_layers, stages)
    bounds, start = [], 1
    for s in range(stages):
        end = start + base + (s < extra)
        bounds.append([start, end])
        start = end
    bounds[0][0], bounds[-1][1] = 0, num_layers + 2
    return [range(a, b) for a, b in bounds]


def partition_balanced(weights: list[float], stages: int) -> list[range]:
    """Contiguous non-empty ranges of block ids minimising the largest total weight (exact DP)."""
    n = len(weights)
    if n < stages:
        raise ValueError(f"{n} blocks cannot fill {stages} pipeline stages; lower pp or virtual_stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: smallest max-stage weight splitting blocks [0, i) into k stages; cut[k][i] the last cut
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    ranges, i = [], n
    for k in range(stages, 0, -1):
        ranges.append(range(cut[k][i], i))
        i = cut[k][i]
    return ranges[::-1]


def partition_blocks(cfg: ModelConfig, stages: int, partition: str = "uniform", tp_group=None,
                     sequence_parallel: bool = False) -> list[range]:
    """Block-id ranges of the `stages` virtual stages: 'uniform' by layer count, 'balanced' by parameter
    count (embedding and head, with a tied copy, counted in the first and last stage they always join)."""
    if partition == "uniform":
        return partition_uniform(cfg.num_layers, stages)
    if partition == "balanced":
        if cfg.num_layers < stages:  # the bound parallel.partition validation states for both
            raise ValueError(f"{cfg.num_layers} layers cannot fill {stages} pipeline stages (pp * virtual_stages); "
                             "lower pp or virtual_stages")
        return partition_balanced(block_parameter_counts(cfg, tp_group, sequence_parallel), stages)
    raise ValueError(f"parallel.partition={partition!r} is unknown; use one of {PARTITIONS}")


def rank_chunks(ranges: list[range], pp: int, rank: int) -> list[range]:
    """The chunks (virtual stages c*pp + rank, c = 0..v-1) pipeline rank `rank` runs, chunk order."""
    if len(ranges) % pp:
        raise ValueError(f"{len(ranges)} virtual stages are not a multiple of pp={pp}")
    return ranges[rank::pp]


def build_stage_model(cfg: ModelConfig, pp: int, pp_rank: int, virtual_stages: int = 1, tp_group=None,
                      sequence_parallel: bool = False, activation_checkpointing: str | bool = "none",
                      seed: int = 1234, partition: str = "uniform", recompute_num_layers: int = 0,
                      compile_blocks: bool = False, cp_group=None, ep_group=None) -> Transformer:
    """Pipeline rank `pp_rank`'s model: its v chunks of the pp*v-way partition of the blocks (pp=1: all).

    Parameter names are global block ids whatever the partition, so a checkpoint's names do not
    depend on it; which rank holds which names does (resume and reshard need the same partition)."""
    ranges = partition_blocks(cfg, pp * virtual_stages, partition, tp_group, sequence_parallel)
    return Transformer(cfg, tp_group, sequence_parallel, activation_checkpointing, seed,
                       chunks=rank_chunks(ranges, pp, pp_rank), recompute_num_layers=recompute_num_layers,
                       compile_blocks=compile_blocks, cp_group=cp_group, ep_group=ep_group)


def tie_embedding_grads(model: Transformer, embedding_group) -> None:
    """Sum the tied token table's gradient over the first and last stage (call before the optimizer step).

    Each end holds the grad of its own use (lookup, projection); their sum is
    the unsplit model's gradient, and both copies then take the same step.
    A rank without a tied table, or with both uses in one copy, does nothing.
    """
    w = model.tied_weight
    if w is None or embedding_group is None or dist.get_world_size(embedding_group) == 1:
        return
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    comm.record("all_reduce", w.grad, "embedding")
    dist.all_reduce(w.grad, group=embedding_group)
