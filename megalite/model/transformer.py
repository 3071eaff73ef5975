"""The decoder-only Transformer: an ordered list of blocks built from tensor-parallel layers.

    blocks[0]        Embedding          tokens [b, s] -> hidden [s, b, h]
    blocks[1..L]     TransformerBlock   [s, b, h] -> [s, b, h]
    blocks[L+1]      Head               [s, b, h] -> local logits [s, b, Vp/tp]

One class serves the whole model and every pipeline stage: a Transformer holds the blocks of its
`chunks` (contiguous runs of block indices; the whole model is the single chunk 0..L+1), under
their global names (`blocks.3.attn.qkv.weight`), and `forward(x, chunk=c)` runs chunk c. Which
blocks a pipeline rank holds is megalite.pipeline.partition's decision, not the model's. Every
weight is drawn from (seed, its module path), so the starting point does not depend on the
tensor-parallel size, the pipeline layout or the partition.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from megalite.config import (
    ModelConfig,
    choices,
    head_dim,
    is_moe_layer,
    moe_ffn_hidden_size,
    padded_vocab_size,
    resolved_ffn_hidden_size,
)
from megalite.kernels.attention import DocumentMask
from megalite.model.blocks import BlockSettings, build_block, run_blocks, vocab_table
from megalite.model.compiled import compile_blocks as compile_transformer_blocks
from megalite.model.moe import MoEState
from megalite.model.rope import RotaryTables
from megalite.tensor_parallel import group_rank, group_size, init_model_weights, mark, vocab_parallel_cross_entropy
from megalite.tensor_parallel.random import TPRngTracker


def check_model(cfg: ModelConfig, tp: int) -> None:
    """Reject shapes the model cannot build (a config made in code, not validated), naming the value and rule."""
    for key in ("norm", "position", "activation"):
        if getattr(cfg, key) not in choices(f"model.{key}"):
            raise ValueError(f"model.{key}={getattr(cfg, key)!r} is not one of {choices(f'model.{key}')}")
    for key in ("vocab_size", "pad_vocab_to", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"model.{key}={getattr(cfg, key)} must be positive")
    n_kv = cfg.num_kv_heads or cfg.num_heads
    if cfg.head_dim is None and cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"model.hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
    if cfg.num_heads % n_kv:
        raise ValueError(f"model.num_heads={cfg.num_heads} is not a multiple of num_kv_heads={n_kv}")
    if n_kv % tp:
        raise ValueError(f"model.num_kv_heads={n_kv} (num_heads when unset) is not divisible by tp={tp}; "
                         "each tensor-parallel rank needs whole kv heads")
    if resolved_ffn_hidden_size(cfg) % tp:
        raise ValueError(f"ffn hidden size {resolved_ffn_hidden_size(cfg)} is not divisible by tp={tp}; "
                         "set model.ffn_hidden_size")
    if cfg.position == "rope" and head_dim(cfg) % 2:
        raise ValueError(f"rotary needs an even head dim; model.head_dim (or hidden_size/num_heads) = "
                         f"{head_dim(cfg)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout={cfg.dropout} must be in [0, 1)")


def _recompute_first(par: BlockSettings, num_layers: int, position: int) -> BlockSettings:
    """The settings of the transformer block at `position` (0-based) in its chunk: under 'full'
    recompute with `num_layers` > 0 only the chunk's first num_layers blocks recompute (Megatron's
    block method: the rest keep their activations, trading memory for less recompute)."""
    if par.activation_checkpointing == "full" and 0 < num_layers <= position:
        return replace(par, activation_checkpointing="none")
    return par


class Blocks(nn.ModuleDict):
    """The blocks a model holds, keyed by global index ('0' .. str(L+1)); blocks[i] takes an int too,
    negative ones counting from the end of the whole model (blocks[-1] is the head)."""

    def __init__(self, total: int):
        super().__init__()
        self.total = total

    def __getitem__(self, key):
        return super().__getitem__(str(key % self.total) if isinstance(key, int) else key)


class Transformer(nn.Module):
    """Llama/GPT-style decoder (or the chunks of it one pipeline rank runs), tensor-parallel over `tp_group`.

    forward(tokens [b, s], doc_ids=None) -> this rank's logits [s, b, Vp/tp] (Vp = padded
    vocabulary; padded ids get -inf); a pipeline stage's chunk maps what it receives
    (tokens or hidden states [s, b, h]) to what it sends. loss(tokens, labels) -> per-token fp32
    loss [b, s]. Under sequence parallelism hidden states between blocks are [s/tp, b, h].
    `rng_tracker` holds the per-tp-rank dropout stream (seeded from `seed` and the tp rank);
    checkpoint its get_state() to resume exactly. `compile_blocks` (train.compile) compiles every
    transformer block in place with torch.compile; names and weights are unchanged. `cp_group`
    (context parallelism): tokens, doc_ids and the loss's labels are this rank's load-balanced
    chunks of each sequence (kernels.ring_attention.load_balanced_chunks along the sequence).
    `ep_group` (expert parallelism): the ranks an MoE layer's experts are sharded over (model.moe).
    """

    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False,
                 activation_checkpointing: str | bool = "none", seed: int = 1234, chunks: list[range] | None = None,
                 recompute_num_layers: int = 0, compile_blocks: bool = False, cp_group=None, ep_group=None):
        super().__init__()
        tp = group_size(tp_group)
        check_model(cfg, tp)
        self.cfg, self.tp_group = cfg, tp_group
        self.z_loss = 0.0  # the training objective's z-loss coefficient (optim.z_loss, set by the Trainer)
        self.sequence_parallel = sequence_parallel and tp > 1  # a group of one has nothing to split
        self.padded_vocab = padded_vocab_size(cfg, tp)
        last = cfg.num_layers + 1
        self.chunks = [range(0, last + 1)] if chunks is None else [range(r.start, r.stop) for r in chunks]
        self.rng_tracker = TPRngTracker(seed, group_rank(tp_group))
        rotary = RotaryTables(cfg, head_dim(cfg)) if cfg.position == "rope" else None  # one pair for all layers
        self.moe_state = MoEState()  # the MoE layers' aux-loss gradient scale and routing statistics
        par = BlockSettings(tp_group, self.sequence_parallel, activation_checkpointing, self.rng_tracker, rotary,
                            cp_group, self.moe_state, ep_group)
        self.blocks = Blocks(last + 1)
        for chunk in self.chunks:
            for i in chunk:
                block_par = _recompute_first(par, recompute_num_layers, i - max(chunk.start, 1))
                self.blocks[str(i)] = build_block(cfg, i, block_par,
                                                  tied=self._tied_table(par, seed) if i == last else None)
        init_model_weights(self, seed)  # keys are global ids: names, hence weights, match the whole model
        if compile_blocks:  # train.compile: each transformer block compiled in place (megalite.model.compiled)
            if cfg.dropout > 0:
                raise ValueError(f"train.compile=true needs model.dropout=0 (got {cfg.dropout}): compiled dropout "
                                 "does not draw from the tensor-parallel RNG tracker; set model.dropout=0 or "
                                 "train.compile=false")
            if self.sequence_parallel:
                raise ValueError("train.compile=true does not work with sequence parallelism (Dynamo fails tracing "
                                 "the sequence-parallel linear's backward); set parallel.sequence_parallel=false "
                                 "or train.compile=false")
            compile_transformer_blocks(self)

    def _tied_table(self, par: BlockSettings, seed: int):
        """The token table a tied head projects with: the embedding's own when this model holds it,
        else (a last pipeline stage) a copy drawn from the embedding's name, kept equal by summing
        both copies' gradients (pipeline.partition.tie_embedding_grads)."""
        if not self.cfg.tie_embeddings:
            return None
        if "0" in self.blocks:
            return self.blocks["0"].word
        table = vocab_table(self.cfg, par)
        table.init_weights(seed, "blocks.0.word")
        mark(table.weight, pipeline_copy=True)  # the grad norm counts the first stage's copy only
        return table

    @property
    def tied_weight(self) -> nn.Parameter | None:
        """The tied token table this rank holds (the embedding's, or the head's copy), else None."""
        if not self.cfg.tie_embeddings:
            return None
        if "0" in self.blocks:
            return self.blocks["0"].word.weight
        head = str(self.cfg.num_layers + 1)
        return self.blocks[head].weight if head in self.blocks else None

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
        """Run chunk `chunk`'s blocks in order: tokens [b, s] or hidden [s, b, h] in, hidden or logits out.

        `doc_ids` [b, s] (data.documents.document_ids) restricts attention to each token's own
        document of the packed sample; None: plain causal.
        """
        documents = None if doc_ids is None else DocumentMask(doc_ids)
        return run_blocks((self.blocks[i] for i in self.chunks[chunk]), x, documents)

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Local logits [s, b, Vp/tp] and labels [b, s] -> per-token fp32 loss [b, s] (the cross-entropy; its
        gradient includes the z-loss when `z_loss` is set, see tensor_parallel.cross_entropy)."""
        return vocab_parallel_cross_entropy(logits, labels.t(), self.tp_group,
                                            z_loss=self.z_loss if torch.is_grad_enabled() else 0.0).t()

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token fp32 cross-entropy [b, s] of predicting labels [b, s] from tokens [b, s] (whole model;
        attention confined to documents when `doc_ids` is given, see forward)."""
        return self.loss_from_logits(self(tokens, doc_ids), labels)

    def num_parameters(self) -> int:
        """Parameters held by THIS rank (tp shards counted once; tied weights once; a stage's copy counted)."""
        return sum(p.numel() for p in self.parameters())


def block_parameter_counts(cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False) -> list[int]:
    """This tp rank's parameter count of every block 0..L+1 (a tied head counts its table: a stage holds a copy).

    Blocks are built on the meta device, so nothing is allocated or drawn.
    """
    par = BlockSettings(tp_group, sequence_parallel and group_size(tp_group) > 1, False,
                        TPRngTracker(0, group_rank(tp_group)))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    kinds: dict[bool, int] = {}  # dense / MoE layer -> its count (every layer of a kind is alike)
    with torch.device("meta"):
        emb = build_block(cfg, 0, par)
        for i in range(1, cfg.num_layers + 1):
            if is_moe_layer(cfg, i) not in kinds:
                kinds[is_moe_layer(cfg, i)] = count(build_block(cfg, i, par))
        head = build_block(cfg, cfg.num_layers + 1, par, tied=emb.word)
    return [count(emb)] + [kinds[is_moe_layer(cfg, i)] for i in range(1, cfg.num_layers + 1)] + [count(head)]


def matmul_parameters(cfg: ModelConfig) -> int:
    """The whole model's parameters that do matmul work: every layer and the head (whose table does the
    projection, tied or not); the embedding is a lookup. The N of MFU's 6N + 12*L*H*Q*T."""
    return sum(block_parameter_counts(cfg)[1:])


def active_matmul_parameters(cfg: ModelConfig) -> int:
    """matmul_parameters less the routed experts a token does not visit: each MoE layer counts its router,
    its shared experts and top_k of its num_experts experts. The N of MFU's 6N (= matmul_parameters
    for a dense model)."""
    f, h = moe_ffn_hidden_size(cfg), cfg.hidden_size
    expert = (3 if cfg.activation == "swiglu" else 2) * f * h  # fc1 (gate and up, or one) and fc2
    idle = (cfg.moe_num_experts - cfg.moe_top_k) * expert
    return matmul_parameters(cfg) - idle * sum(is_moe_layer(cfg, i) for i in range(1, cfg.num_layers + 1))


def total_parameters(cfg: ModelConfig) -> int:
    """The whole model's parameter count at tp=1 (a tied table once; padded vocabulary rows included)."""
    tied = padded_vocab_size(cfg, 1) * cfg.hidden_size if cfg.tie_embeddings else 0
    return sum(block_parameter_counts(cfg)) - tied
