"""The blocks a Transformer is an ordered list of: Embedding, TransformerBlock x L, Head.

Every block maps one tensor to one tensor (tokens [b, s] -> hidden [s, b, h]
-> ... -> local logits [s, b, Vp/tp]), so a pipeline stage is just a slice of
the list. The one side input is an optional `DocumentMask` (packed samples
with data.reset_attention_mask), which `run_blocks` hands to the
transformer blocks only. Under sequence parallelism the hidden states between blocks are
[s/tp, b, h]: each tp rank holds a contiguous chunk of the sequence.

Every block is made by `build_block(cfg, index, settings)`, one constructor
for the whole model and for a pipeline stage alike; `BlockSettings`
(model/settings.py) is the small value that says how the blocks are
parallelised. A transformer block's parts live next door: attention in
model/attention.py, the dense MLP in model/mlp.py, the MoE feed-forward in
model/moe.py. `Transformer` then draws every
weight by its module path (`tensor_parallel.init_model_weights`); built alone,
blocks hold uninitialised linear weights until that is called.

Dropout and the tensor-parallel RNG tracker (`tensor_parallel.random`):
attention-probability dropout acts on this rank's heads, so it draws from
the tracker (a different mask per tp rank). Residual and embedding dropout
act on activations every tp rank holds whole, so they draw from the default
generator (the same mask on every tp rank, which keeps the replicas equal);
under sequence parallelism those activations are per-rank sequence chunks,
so they draw from the tracker too. Blocks built without a tracker use the
default generator, which is only correct without tensor parallelism.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalite.config import (
    ModelConfig,
    attention_window,
    is_moe_layer,
    moe_ffn_hidden_size,
    padded_vocab_size,
)
from megalite.kernels.attention import DocumentMask
from megalite.model.attention import Attention, KVCache
from megalite.model.mlp import MLP
from megalite.model.moe import MoE, MoEState
from megalite.model.norms import make_norm
from megalite.model.settings import (
    BlockSettings,
    need_tracker,
    replay_tracker,
    sharded_rng,
)
from megalite.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    compute_dtype,
    copy_to_tp_region,
    init_shard_,
    mark,
    normal_init,
    scatter_to_sequence_parallel_region,
    sequence_parallel_linear,
)


# ------------------------------------------------------------------ blocks
class Embedding(nn.Module):
    """tokens [b, s] int64 -> hidden [s, b, h] (sequence parallel: [s/tp, b, h]).

    Vocabulary-parallel token embedding (padded rows start at zero and are
    never looked up), plus learned absolute positions when
    cfg.position == 'learned', then dropout.
    """

    def __init__(self, cfg: ModelConfig, par: BlockSettings = BlockSettings()):
        super().__init__()
        need_tracker(cfg, par)
        self.tp_group, self.sequence_parallel, self.max_seq_len = par.tp_group, par.sequence_parallel, cfg.max_seq_len
        self.rng_tracker, self.par = par.rng_tracker, par
        self.init_std = cfg.init_std
        self.word = vocab_table(cfg, par)
        learned = cfg.position == "learned"
        self.position = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.hidden_size)) if learned else None
        self.dropout = nn.Dropout(cfg.dropout)

    def init_weights(self, seed: int, prefix: str) -> None:
        """Draw the (replicated) position table; the token table initialises itself."""
        if self.position is not None:
            init_shard_(self.position, normal_init(self.init_std), seed, f"{prefix}.position", None, 0, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] * self.par.cp > self.max_seq_len:
            raise ValueError(f"tokens must be [batch, seq] with seq <= max_seq_len={self.max_seq_len} (under "
                             f"context parallelism seq * cp); got shape {tuple(tokens.shape)}, cp={self.par.cp}")
        x = self.word(tokens.t())  # [b, s] -> ids [s, b] -> [s, b, h] (SP: [s/tp, b, h])
        if self.position is not None:
            where = self.par.global_positions(tokens.shape[1], tokens.device)  # cp: this rank's chunks
            table = self.position[: tokens.shape[1]] if where is None else self.position[where]
            pos = table.unsqueeze(1)  # [s, h] -> [s, 1, h]
            if self.sequence_parallel:  # this rank's rows; backward all-gathers, so the grad is complete
                pos = scatter_to_sequence_parallel_region(pos, self.tp_group)  # -> [s/tp, 1, h]
            x = x + pos
        x = x.to(compute_dtype(x))  # the residual stream is in the compute dtype (autocast: 16-bit)
        if not (self.training and self.dropout.p):
            return x
        with sharded_rng(self.rng_tracker if self.sequence_parallel else None):  # SP: own sequence chunk
            return self.dropout(x)


def vocab_table(cfg: ModelConfig, par: BlockSettings) -> VocabParallelEmbedding:
    """The vocabulary-parallel token table [Vp/tp, h] (padding rows stay zero and are marked as such)."""
    table = VocabParallelEmbedding(padded_vocab_size(cfg, par.tp), cfg.hidden_size, par.tp_group,
                                   normal_init(cfg.init_std, valid_rows=cfg.vocab_size),
                                   sequence_parallel=par.sequence_parallel, init_seed=None)
    mark(table.weight, valid_rows=cfg.vocab_size)  # rows past it are tp-dependent padding
    return table


class TransformerBlock(nn.Module):
    """Pre-norm block [s, b, h] -> [s, b, h]: x + attn(norm(x)), then x + mlp(norm(x)).

    What backward keeps, by BlockSettings.activation_checkpointing (bytes per s*b*h in
    megalite.memory.model): 'none' every matmul input, q/k/v and the attention output, fc1's
    output, norms' inputs; 'selective' the same less the attention core's internals (the
    probabilities on the math path) and SwiGLU's activation, recomputed in backward from what is
    kept; 'full' only the block input (non-reentrant checkpoint, RNG state replayed so dropout
    masks match).
    """

    def __init__(self, cfg: ModelConfig, par: BlockSettings = BlockSettings(), layer: int = 1):
        """`layer` (1 .. num_layers) picks this block's sliding window (model.global_attention_every)."""
        super().__init__()
        self.recompute_all = par.activation_checkpointing == "full"
        self.rng_tracker = par.rng_tracker
        # residual dropout: the same mask on every tp rank, unless each rank holds its own sequence chunk
        self.residual_rng = par.rng_tracker if par.sequence_parallel else None
        self.norm1 = make_norm(cfg, par.sequence_parallel)
        self.attn = Attention(cfg, par, attention_window(cfg, layer))
        self.norm2 = make_norm(cfg, par.sequence_parallel)
        self.mlp = _moe(cfg, par, layer) if is_moe_layer(cfg, layer) else MLP(cfg, par)
        self.dropout = nn.Dropout(cfg.dropout)

    def _residual_dropout(self, y: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.dropout.p):
            return y
        with sharded_rng(self.residual_rng):
            return self.dropout(y)

    def _forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                 documents: DocumentMask | None = None) -> torch.Tensor:
        x = x + self._residual_dropout(self.attn(self.norm1(x), kv_cache, documents))
        return x + self._residual_dropout(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                documents: DocumentMask | None = None) -> torch.Tensor:
        """x [s, b, h] -> [s, b, h]; `kv_cache` is for incremental decoding, `documents` masks
        attention at document boundaries of packed samples (see Attention.forward)."""
        if kv_cache is not None:
            return self._forward(x, kv_cache, documents)
        if self.recompute_all and torch.is_grad_enabled():
            return checkpoint(self._forward, x, None, documents, use_reentrant=False,
                              **replay_tracker(self.rng_tracker))
        return self._forward(x, None, documents)


def _moe(cfg: ModelConfig, par: BlockSettings, layer: int) -> MoE:
    """Layer `layer`'s MoE feed-forward: experts replicated over tp, routing statistics summed over
    the ranks that split a micro-batch's tokens (tp under SP, cp); shared experts a dense tp MLP."""
    shared = None
    if cfg.moe_shared_experts:
        shared = MLP(replace(cfg, ffn_hidden_size=cfg.moe_shared_experts * moe_ffn_hidden_size(cfg)), par)
    token_groups = (par.tp_group if par.sequence_parallel else None, par.cp_group if par.cp > 1 else None)
    return MoE(cfg, par.moe_state if par.moe_state is not None else MoEState(), layer, par.sequence_parallel,
               token_groups, par.cp, shared, par.ep_group)


def run_blocks(blocks, x: torch.Tensor, documents: DocumentMask | None = None) -> torch.Tensor:
    """Run `blocks` in order on x (tokens or hidden states); transformer blocks also get `documents`."""
    for block in blocks:
        x = block(x, documents=documents) if isinstance(block, TransformerBlock) else block(x)
    return x


class Head(nn.Module):
    """hidden [s, b, h] (SP: [s/tp, b, h]) -> local logits [s, b, Vp/tp].

    Final norm, then a column-parallel projection to the padded vocabulary,
    or, when `tied` is given, the token embedding's own (identically
    sharded) table. Logits of padded ids (>= vocab_size) are set to -inf so
    they are never predicted and get no gradient.
    """

    def __init__(self, cfg: ModelConfig, par: BlockSettings = BlockSettings(),
                 tied: VocabParallelEmbedding | None = None):
        super().__init__()
        self.tp_group, self.sequence_parallel = par.tp_group, par.sequence_parallel
        self.norm = make_norm(cfg, par.sequence_parallel)
        if tied is None:
            self.output = ColumnParallelLinear(cfg.hidden_size, padded_vocab_size(cfg, par.tp), par.tp_group,
                                               bias=False, sequence_parallel=par.sequence_parallel,
                                               init_method=normal_init(cfg.init_std, valid_rows=cfg.vocab_size),
                                               init_seed=None)
            mark(self.output.weight, valid_rows=cfg.vocab_size)  # padding rows
            rows, start = self.output.out_local, self.output.tp_rank * self.output.out_local
        else:
            self.output = None
            self.weight = tied.weight  # the same Parameter: one tensor, two names in state_dict
            rows, start = tied.rows_local, tied.vocab_start
        # first padded column of this rank's shard, or None when the shard has no padding
        self.pad_from = max(cfg.vocab_size - start, 0) if start + rows > cfg.vocab_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.output is not None:
            logits = self.output(x)  # [s, b, Vp/tp]
        else:
            if self.sequence_parallel:  # [s/tp, b, h] gathered to [s, b, h]; only the local part is kept
                logits = sequence_parallel_linear(x, self.weight, None, self.tp_group)  # [s, b, Vp/tp]
            else:
                logits = F.linear(copy_to_tp_region(x, self.tp_group), self.weight)  # [s, b, Vp/tp]
        if self.pad_from is not None:
            logits[..., self.pad_from:] = float("-inf")  # safe in place: linear's backward does not need its output
        return logits


def build_block(cfg: ModelConfig, index: int, par: BlockSettings = BlockSettings(),
                tied: VocabParallelEmbedding | None = None) -> nn.Module:
    """Block `index` of the model `cfg`: 0 the Embedding, 1..L a TransformerBlock, L+1 the Head.

    `tied` is the token table the head projects with when model.tie_embeddings is set (the
    embedding's own, or a pipeline stage's copy of it); untied heads own an output projection.
    """
    last = cfg.num_layers + 1
    if not 0 <= index <= last:
        raise ValueError(f"block index {index} is outside 0..{last} for model.num_layers={cfg.num_layers}")
    if index == 0:
        return Embedding(cfg, par)
    if index == last:
        return Head(cfg, par, tied=tied if cfg.tie_embeddings else None)
    return TransformerBlock(cfg, par, index)
