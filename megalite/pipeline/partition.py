"""Split the model's ordered blocks into pipeline stages and build one rank's stage.

The unsplit model is `blocks = [Embedding, TransformerBlock x L, Head]`
(megalite.model.Transformer). With pp ranks and v chunks per rank there are
S = pp*v virtual stages, each a contiguous run of block ids; virtual stage
c*pp + r is chunk c of rank r. The embedding is always in virtual stage 0 and
the head (with the loss) in S-1, because the runs are contiguous and cover
every block.

A `StageModel` holds only its rank's blocks, under their GLOBAL names
(`blocks.3.attn.qkv.weight`), and draws each weight from (seed, that name)
exactly as the unsplit model does, so a pp run starts from the pp=1 weights
and its checkpoint names match. With tied embeddings the last stage keeps its
own copy of the token table (named `blocks.{L+1}.weight`, as in the unsplit
state_dict), drawn from the embedding's name so both copies start equal;
`tie_embedding_grads` sums their gradients over the embedding group (first
and last stage) before each optimizer step, which keeps them equal.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megalite.config import ModelConfig, choices
from megalite.kernels.attention import DocumentMask
from megalite.model.blocks import Embedding, Head, TransformerBlock, run_blocks
from megalite.model.transformer import _check, _ffn_size, _padded_vocab
from megalite.tensor_parallel import (VocabParallelEmbedding, group_rank, group_size, init_model_weights,
                                      normal_init, vocab_parallel_cross_entropy)
from megalite.tensor_parallel import comm
from megalite.tensor_parallel.random import TPRngTracker

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


def block_parameter_counts(cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False) -> list[int]:
    """This tp rank's parameter count of every block (the head counts a tied table too: it holds a copy).

    Blocks are built on the meta device, so nothing is allocated or drawn.
    """
    tp = group_size(tp_group)
    padded, ffn, sp = _padded_vocab(cfg, tp), _ffn_size(cfg), sequence_parallel and tp > 1
    tracker = TPRngTracker(0, group_rank(tp_group))
    with torch.device("meta"):
        emb = Embedding(cfg, padded, tp_group, sp, tracker)
        layer = TransformerBlock(cfg, ffn, tp_group, sp, False, tracker)
        head = Head(cfg, padded, tp_group, sp, tied=emb.word if cfg.tie_embeddings else None)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return [count(emb)] + [count(layer)] * cfg.num_layers + [count(head)]


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


class StageModel(nn.Module):
    """The blocks of one pipeline rank under their global names; `forward(chunk, x)` runs one chunk.

    `chunks[c]` is the range of global block ids of chunk c; `pp` the number
    of pipeline ranks. `tied_weight` is
    the token table this rank shares with the other end of the pipeline
    (None when embeddings are untied, or on a middle stage).
    """

    def __init__(self, cfg: ModelConfig, chunks: list[range], pp: int, tp_group=None,
                 sequence_parallel: bool = False, activation_checkpointing: bool = False, seed: int = 1234):
        super().__init__()
        self.pp = pp
        tp = group_size(tp_group)
        _check(cfg, tp)
        self.cfg, self.tp_group, self.chunks = cfg, tp_group, [range(r.start, r.stop) for r in chunks]
        self.sequence_parallel = sp = sequence_parallel and tp > 1
        self.padded_vocab, ffn, last = _padded_vocab(cfg, tp), _ffn_size(cfg), cfg.num_layers + 1
        self.rng_tracker = TPRngTracker(seed, group_rank(tp_group))
        self.blocks = nn.ModuleDict()
        for i in (i for r in self.chunks for i in r):
            if i == 0:
                block = Embedding(cfg, self.padded_vocab, tp_group, sp, self.rng_tracker)
            elif i == last:
                block = Head(cfg, self.padded_vocab, tp_group, sp, tied=self._tied_table(seed, sp))
            else:
                block = TransformerBlock(cfg, ffn, tp_group, sp, activation_checkpointing, self.rng_tracker)
            self.blocks[str(i)] = block
        init_model_weights(self, seed)  # keys are global ids: names, hence weights, match the unsplit model

    def _tied_table(self, seed: int, sp: bool):
        """The token table the head projects with, when tied: the embedding's own on a stage holding
        both, else a copy drawn from the embedding's name (kept in sync by `tie_embedding_grads`)."""
        if not self.cfg.tie_embeddings:
            return None
        if "0" in self.blocks:
            return self.blocks["0"].word
        table = VocabParallelEmbedding(self.padded_vocab, self.cfg.hidden_size, self.tp_group,
                                       normal_init(self.cfg.init_std, valid_rows=self.cfg.vocab_size),
                                       sequence_parallel=sp, init_seed=None)
        table.init_weights(seed, "blocks.0.word")
        table.weight.valid_rows = self.cfg.vocab_size
        table.weight.pipeline_duplicate = True  # the grad norm counts the first stage's copy only
        return table

    @property
    def tied_weight(self) -> nn.Parameter | None:
        """The tied token table on the first or last stage (embedding's if held, else the head's copy)."""
        if not self.cfg.tie_embeddings:
            return None
        if "0" in self.blocks:
            return self.blocks["0"].word.weight
        head = self.blocks[str(self.cfg.num_layers + 1)] if str(self.cfg.num_layers + 1) in self.blocks else None
        return None if head is None else head.weight

    def forward(self, chunk: int, x: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run chunk `chunk`'s blocks in order: tokens or hidden [s, b, h] in, hidden or logits out.

        `doc_ids` [b, s] of the micro-batch confines attention to documents (Transformer.forward)."""
        documents = None if doc_ids is None else DocumentMask(doc_ids)
        return run_blocks((self.blocks[str(i)] for i in self.chunks[chunk]), x, documents)

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Local logits [s, b, Vp/tp] and labels [b, s] -> per-token fp32 loss [b, s] (last stage)."""
        return vocab_parallel_cross_entropy(logits, labels.t(), self.tp_group).t()  # [s, b] -> [b, s]

    def num_parameters(self) -> int:
        """Parameters held by THIS rank (a tied copy on the last stage included)."""
        return sum(p.numel() for p in self.parameters())

    def flop_params(self) -> int:
        """This rank's share of the whole model's matmul parameters: their total / pp.

        Stages differ (embedding, head) and the trainer's MFU multiplies this
        by tp * pp, so the average is what yields the whole model's count:
        every layer plus the head (its table, tied or not, does the matmul
        work; the embedding is a lookup), as Transformer.flop_params counts.
        """
        counts = block_parameter_counts(self.cfg, self.tp_group, self.sequence_parallel)
        return sum(counts[1:]) // self.pp


def build_stage_model(cfg: ModelConfig, pp: int, pp_rank: int, virtual_stages: int = 1, tp_group=None,
                      sequence_parallel: bool = False, activation_checkpointing: bool = False,
                      seed: int = 1234, partition: str = "uniform") -> StageModel:
    """Pipeline rank `pp_rank`'s StageModel: its v chunks of the pp*v-way partition of the blocks.

    Parameter names are global block ids whatever the partition, so a checkpoint's names do not
    depend on it; which rank holds which names does (resume and reshard need the same partition)."""
    ranges = partition_blocks(cfg, pp * virtual_stages, partition, tp_group, sequence_parallel)
    return StageModel(cfg, rank_chunks(ranges, pp, pp_rank), pp, tp_group, sequence_parallel,
                      activation_checkpointing, seed)


def tie_embedding_grads(model: StageModel, embedding_group) -> None:
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
