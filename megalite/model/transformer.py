"""The decoder-only Transformer: an ordered list of blocks built from tensor-parallel layers.

    blocks[0]        Embedding          tokens [b, s] -> hidden [s, b, h]
    blocks[1..L]     TransformerBlock   [s, b, h] -> [s, b, h]
    blocks[L+1]      Head               [s, b, h] -> local logits [s, b, Vp/tp]

No pipeline code lives here; a pipeline stage runs a slice of `blocks`.
Every weight is drawn from (seed, its module path), so the starting point
does not depend on the tensor-parallel size or on which ranks build which
blocks, as long as block indices are kept.
"""
from __future__ import annotations

import torch
from torch import nn

from megalite.config import ModelConfig, padded_vocab_size, resolved_ffn_hidden_size
from megalite.kernels.attention import DocumentMask
from megalite.model.blocks import Embedding, Head, TransformerBlock, run_blocks
from megalite.tensor_parallel import group_rank, group_size, init_model_weights, vocab_parallel_cross_entropy
from megalite.tensor_parallel.random import TPRngTracker

_CHOICES = {"norm": ("rmsnorm", "layernorm"), "position": ("rope", "learned"), "activation": ("swiglu", "gelu")}


def _padded_vocab(cfg: ModelConfig, tp: int) -> int:
    """vocab_size rounded up to a multiple of pad_vocab_to * tp (megalite.config.padded_vocab_size)."""
    return padded_vocab_size(cfg, tp)


def _ffn_size(cfg: ModelConfig) -> int:
    """MLP inner width by the config's one rule (megalite.config.resolved_ffn_hidden_size).

    Kept under this name for the modules that import it (checkpoint conversion,
    pipeline partitioning); never a rule of its own.
    """
    return resolved_ffn_hidden_size(cfg)


def _check(cfg: ModelConfig, tp: int) -> None:
    """Reject shapes the model cannot build, naming the value and the rule."""
    for key, allowed in _CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"model.{key}={getattr(cfg, key)!r} is not one of {allowed}")
    for key in ("vocab_size", "pad_vocab_to", "hidden_size", "num_layers", "num_heads", "max_seq_len"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"model.{key}={getattr(cfg, key)} must be positive")
    n_kv = cfg.num_kv_heads or cfg.num_heads
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"model.hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
    if cfg.num_heads % n_kv:
        raise ValueError(f"model.num_heads={cfg.num_heads} is not a multiple of num_kv_heads={n_kv}")
    if n_kv % tp:
        raise ValueError(f"model.num_kv_heads={n_kv} (num_heads when unset) is not divisible by tp={tp}; "
                         "each tensor-parallel rank needs whole kv heads")
    if _ffn_size(cfg) % tp:
        raise ValueError(f"ffn hidden size {_ffn_size(cfg)} is not divisible by tp={tp}; set model.ffn_hidden_size")
    if cfg.position == "rope" and (cfg.hidden_size // cfg.num_heads) % 2:
        raise ValueError(f"rotary needs an even head dim; hidden_size/num_heads = "
                         f"{cfg.hidden_size // cfg.num_heads}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout={cfg.dropout} must be in [0, 1)")


class Transformer(nn.Module):
    """Llama/GPT-style decoder, tensor-parallel over `tp_group` (None: a single process).

    forward(tokens [b, s], doc_ids=None) -> this rank's logits [s, b, Vp/tp] (Vp = padded
    vocabulary; padded ids get -inf). loss(tokens, labels) -> per-token fp32
    loss [b, s]. Under sequence parallelism hidden states between blocks
    are [s/tp, b, h] and parameters marked `sequence_parallel` need their
    gradients all-reduced over the tp group before the optimizer step.
    `rng_tracker` holds the per-tp-rank dropout stream (seeded from `seed`
    and the tp rank); checkpoint its get_state() to resume exactly.
    """

    def __init__(self, cfg: ModelConfig, tp_group=None, sequence_parallel: bool = False,
                 activation_checkpointing: bool = False, seed: int = 1234):
        super().__init__()
        tp = group_size(tp_group)
        _check(cfg, tp)
        self.cfg, self.tp_group = cfg, tp_group
        self.sequence_parallel = sequence_parallel and tp > 1  # a group of one has nothing to split
        self.padded_vocab = _padded_vocab(cfg, tp)
        sp, ffn = self.sequence_parallel, _ffn_size(cfg)
        self.rng_tracker = TPRngTracker(seed, group_rank(tp_group))
        embedding = Embedding(cfg, self.padded_vocab, tp_group, sp, self.rng_tracker)
        layers = [TransformerBlock(cfg, ffn, tp_group, sp, activation_checkpointing, self.rng_tracker)
                  for _ in range(cfg.num_layers)]
        head = Head(cfg, self.padded_vocab, tp_group, sp, tied=embedding.word if cfg.tie_embeddings else None)
        self.blocks = nn.ModuleList([embedding, *layers, head])
        init_model_weights(self, seed)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] int64 -> local logits [s, b, Vp/tp].

        `doc_ids` [b, s] (kernels.attention.document_ids) restricts attention to
        each token's own document of the packed sample; None: plain causal.
        """
        documents = None if doc_ids is None else DocumentMask(doc_ids)
        return run_blocks(self.blocks, tokens, documents)

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Local logits [s, b, Vp/tp] and labels [b, s] -> per-token fp32 loss [b, s]."""
        return vocab_parallel_cross_entropy(logits, labels.t(), self.tp_group).t()  # [s, b] -> [b, s]

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token fp32 cross-entropy [b, s] of predicting labels [b, s] from tokens [b, s]
        (attention confined to documents when `doc_ids` is given, see forward)."""
        return self.loss_from_logits(self(tokens, doc_ids), labels)

    def num_parameters(self) -> int:
        """Parameters held by THIS rank (tp shards counted once; tied weights once)."""
        return sum(p.numel() for p in self.parameters())

    def flop_params(self) -> int:
        """This rank's parameters that do matmul work: all but the lookup tables.

        The token table is left out unless tied, in which case it is counted
        once, as the head; a learned position table is always left out.
        Feeds MFU's 6N + 12*L*H*Q*T (multiply by tp * pp for the whole model;
        replicated norm gains are then overcounted, a negligible error).
        """
        embedding = self.blocks[0]
        n = self.num_parameters()
        if not self.cfg.tie_embeddings:
            n -= embedding.word.weight.numel()
        if embedding.position is not None:
            n -= embedding.position.numel()
        return n
