"""The blocks a Transformer is an ordered list of: Embedding, TransformerBlock x L, Head.

Every block maps one tensor to one tensor (tokens [b, s] -> hidden [s, b, h]
-> ... -> local logits [s, b, Vp/tp]), so a pipeline stage is just a slice of
the list. The one side input is an optional `DocumentMask` (packed samples
with data.reset_attention_mask), which `run_blocks` hands to the
transformer blocks only. Under sequence parallelism the hidden states between blocks are
[s/tp, b, h]: each tp rank holds a contiguous chunk of the sequence.

Every block is made by `build_block(cfg, index, settings)`, one constructor
for the whole model and for a pipeline stage alike; `BlockSettings` is the small
value that says how the blocks are parallelised. `Transformer` then draws every
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

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalite import kernels
from megalite.config import (
    ModelConfig,
    attention_window,
    head_dim,
    is_moe_layer,
    moe_ffn_hidden_size,
    padded_vocab_size,
    resolved_ffn_hidden_size,
)
from megalite.kernels.attention import DocumentMask, attention
from megalite.kernels.ring_attention import positions_of, ring_attention
from megalite.model.moe import MoE, MoEState
from megalite.model.norms import RMSNorm, make_norm
from megalite.model.rope import RotaryTables
from megalite.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    compute_dtype,
    copy_to_tp_region,
    group_rank,
    group_size,
    init_shard_,
    mark,
    normal_init,
    scatter_to_sequence_parallel_region,
    sequence_parallel_linear,
)
from megalite.tensor_parallel.random import TPRngTracker

RECOMPUTE_MODES = ("none", "selective", "full")


def recompute_mode(value: str | bool | None) -> str:
    """train.activation_checkpointing as one of RECOMPUTE_MODES (True/False, the old switch: 'full'/'none')."""
    if value is True or value is False or value is None:
        return "full" if value else "none"
    if value not in RECOMPUTE_MODES:
        raise ValueError(f"activation_checkpointing={value!r} is not one of {', '.join(RECOMPUTE_MODES)}")
    return value


@dataclass(frozen=True)
class BlockSettings:
    """How blocks are parallelised: the one value every block constructor takes.

    tp_group: the tensor-parallel group (None: one process). sequence_parallel: activations
    between blocks are [s/tp, b, h] chunks (only meaningful with tp > 1). activation_checkpointing:
    what transformer blocks recompute in backward instead of keeping (see TransformerBlock;
    True/False mean 'full'/'none'). rng_tracker: the per-tp-rank dropout stream (needed with dropout
    under tp; Transformer makes one). rotary: the rotary tables every layer shares (Transformer
    makes one; model.rope.RotaryTables). cp_group: the context-parallel group (None: the whole
    sequence is here); under it a block sees this rank's two load-balanced chunks of every
    sequence (kernels.ring_attention), so rotary and learned positions look up their global
    positions and attention runs around the ring. moe_state: what the model's MoE layers share with
    the training loop (model.moe.MoEState; Transformer makes one). ep_group: the expert-parallel
    group MoE layers shard their experts over (None: every rank holds all experts).
    """

    tp_group: object = None
    sequence_parallel: bool = False
    activation_checkpointing: str | bool = "none"
    rng_tracker: TPRngTracker | None = None
    rotary: nn.Module | None = None  # rope.RotaryTables shared by the model's layers (None: each its own)
    cp_group: object = None
    moe_state: MoEState | None = None
    ep_group: object = None

    def __post_init__(self):
        object.__setattr__(self, "activation_checkpointing", recompute_mode(self.activation_checkpointing))

    @property
    def tp(self) -> int:
        return group_size(self.tp_group)

    @property
    def cp(self) -> int:
        return group_size(self.cp_group)

    def global_positions(self, local_len: int, device) -> torch.Tensor | None:
        """The global positions of this rank's `local_len` positions of a sequence; None without cp."""
        if self.cp == 1:
            return None
        return positions_of(local_len * self.cp, self.cp, group_rank(self.cp_group)).to(device)


def _sharded_rng(tracker: TPRngTracker | None):
    """Context for dropout on activations that differ per tp rank: the tracker's stream, if any."""
    return tracker.fork() if tracker is not None else nullcontext()


def _replay_tracker(tracker: TPRngTracker | None) -> dict:
    """checkpoint() kwargs that replay the tracker like the default generators, so recomputed dropout
    draws the same masks. Inside torch.compile (train.compile) none: Dynamo turns the checkpoint into
    a graph region whose backward AOTAutograd plans itself, it cannot trace this context_fn, and
    train.compile refuses dropout, so there is no mask to replay."""
    if tracker is None or torch.compiler.is_compiling():
        return {}
    return {"context_fn": tracker.checkpoint_context}


def _need_tracker(cfg: ModelConfig, par: BlockSettings) -> None:
    if par.rng_tracker is None and cfg.dropout > 0 and par.tp > 1:
        raise ValueError(f"model.dropout={cfg.dropout} with tensor parallelism needs an rng_tracker "
                         "(TPRngTracker), or every tp rank draws the same attention-dropout mask; "
                         "build the model through Transformer, which passes one")


# ------------------------------------------------------------------ blocks
class Embedding(nn.Module):
    """tokens [b, s] int64 -> hidden [s, b, h] (sequence parallel: [s/tp, b, h]).

    Vocabulary-parallel token embedding (padded rows start at zero and are
    never looked up), plus learned absolute positions when
    cfg.position == 'learned', then dropout.
    """

    def __init__(self, cfg: ModelConfig, par: BlockSettings = BlockSettings()):
        super().__init__()
        _need_tracker(cfg, par)
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
        with _sharded_rng(self.rng_tracker if self.sequence_parallel else None):  # SP: own sequence chunk
            return self.dropout(x)


def vocab_table(cfg: ModelConfig, par: BlockSettings) -> VocabParallelEmbedding:
    """The vocabulary-parallel token table [Vp/tp, h] (padding rows stay zero and are marked as such)."""
    table = VocabParallelEmbedding(padded_vocab_size(cfg, par.tp), cfg.hidden_size, par.tp_group,
                                   normal_init(cfg.init_std, valid_rows=cfg.vocab_size),
                                   sequence_parallel=par.sequence_parallel, init_seed=None)
    mark(table.weight, valid_rows=cfg.vocab_size)  # rows past it are tp-dependent padding
    return table


class KVCache:
    """One layer's rotated keys and values of the tokens seen so far, [t, b, hkv/tp, d] each (inference)."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def offset(self) -> int:
        """Number of cached positions (the position of the next token)."""
        return 0 if self.k is None else self.k.shape[0]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' k, v [s, b, hkv/tp, d]; returns all cached k, v."""
        self.k = k if self.k is None else torch.cat((self.k, k))
        self.v = v if self.v is None else torch.cat((self.v, v))
        return self.k, self.v


class _SplitQKV(torch.autograd.Function):
    """qkv [s, b, hkv, r + 2, d] -> own copies of q [s, b, hkv*r, d], k and v [s, b, hkv, d] (a view would
    keep the whole qkv output alive for attention's backward). Backward writes the three gradients into
    one buffer, where autograd's slicing would zero-fill a whole qkv-sized gradient for each and add them."""

    @staticmethod
    def forward(ctx, qkv, r):
        s, b, g, _, d = qkv.shape
        ctx.r = r
        return (qkv[:, :, :, :r].reshape(s, b, g * r, d), qkv[:, :, :, r].contiguous(),
                qkv[:, :, :, r + 1].contiguous())

    @staticmethod
    def backward(ctx, dq, dk, dv):  # never None: autograd materializes unused outputs' gradients as zeros
        s, b, g, d = dk.shape
        out = dk.new_empty(s, b, g, ctx.r + 2, d)
        out[:, :, :, :ctx.r] = dq.view(s, b, g, ctx.r, d)
        out[:, :, :, ctx.r] = dk
        out[:, :, :, ctx.r + 1] = dv
        return out, None


class Attention(nn.Module):
    """Causal self-attention: fused QKV (column-parallel), rotary, attention kernel, output (row-parallel).

    Fused QKV weight layout (rows of the [(hq + 2*hkv) * d, h] matrix): one
    slab per kv group g = 0..hkv-1, each slab [q heads g*r .. g*r+r-1, k_g,
    v_g] with r = hq/hkv, i.e. viewed as [hkv, r + 2, d, h]. A tp rank owns
    hkv/tp whole consecutive slabs, so its shard is contiguous and the full
    matrix is the same for every tp size. (Hugging Face export must
    de-interleave q, k and v.)
    """

    def __init__(self, cfg: ModelConfig, par: BlockSettings = BlockSettings(), window: int | None = None):
        super().__init__()
        _need_tracker(cfg, par)
        self.rng_tracker, self.par = par.rng_tracker, par
        self.window = window  # sliding window of this layer (config.attention_window), None = global
        tp_group, sequence_parallel, tp = par.tp_group, par.sequence_parallel, par.tp
        n_kv = cfg.num_kv_heads or cfg.num_heads
        self.head_dim = head_dim(cfg)
        self.q_per_kv, self.kv_local = cfg.num_heads // n_kv, n_kv // tp
        self.dropout = cfg.dropout
        self.recompute_core = par.activation_checkpointing == "selective"
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # residual-branch outputs add up over 2L branches
        self.qkv = ColumnParallelLinear(cfg.hidden_size, (cfg.num_heads + 2 * n_kv) * self.head_dim, tp_group,
                                        bias=cfg.bias or cfg.qkv_bias, sequence_parallel=sequence_parallel,
                                        init_method=normal_init(cfg.init_std), init_seed=None)
        self.proj = RowParallelLinear(cfg.num_heads * self.head_dim, cfg.hidden_size, tp_group, bias=cfg.bias,
                                      sequence_parallel=sequence_parallel, init_method=normal_init(out_std),
                                      init_seed=None)
        if cfg.qk_norm:  # gains shared by this rank's heads, so their gradients are partial sums over tp
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, sequence_parallel=tp > 1)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, sequence_parallel=tp > 1)
        self.qk_norm = cfg.qk_norm
        self.rope = cfg.position == "rope"
        if self.rope:
            # the model's one table pair (Transformer shares it across layers), else this layer's own
            self.rotary = par.rotary if par.rotary is not None else RotaryTables(cfg, self.head_dim)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                documents: DocumentMask | None = None) -> torch.Tensor:
        """x [s, b, h] -> [s, b, h]. With `kv_cache` (inference only) x holds the tokens after the
        cached ones: rotary starts at the cache's offset and attention also sees the cached keys.
        `documents` confines each token to its own document of a packed sample (the mask covers
        the whole sequence, which attention sees even under sequence parallelism)."""
        qkv = self.qkv(x)  # [s, b, (hq + 2hkv)/tp * d]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.kv_local, self.q_per_kv + 2, self.head_dim)  # -> [s, b, hkv/tp, r + 2, d]
        q, k, v = _SplitQKV.apply(qkv, self.q_per_kv)  # [s, b, hq/tp, d], [s, b, hkv/tp, d] x 2
        if self.qk_norm:  # per head, before rotary (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        if kv_cache is not None:
            if documents is not None:
                raise ValueError("document masking is for training on packed samples; "
                                 "incremental decoding with a KVCache takes none")
            return self.proj(self._cached_attention(q, k, v, kv_cache))
        if self.rope:
            cos, sin = self.rotary(s * self.par.cp)  # cp: the tables of the whole sequence ...
            where = self.par.global_positions(s, cos.device)
            if where is not None:  # ... at this rank's positions
                cos, sin = cos[where], sin[where]
            q = kernels.apply_rotary(q, cos, sin)
            k = kernels.apply_rotary(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0
        if self.recompute_core and torch.is_grad_enabled():  # selective: keep q, k, v, not the probabilities
            out = checkpoint(self._core, q, k, v, dropout_p, documents, use_reentrant=False,
                             **_replay_tracker(self.rng_tracker))
        else:
            out = self._core(q, k, v, dropout_p, documents)  # [s, b, hq/tp * d]
        return self.proj(out)  # [s, b, h] (SP: [s/tp, b, h])

    def _core(self, q, k, v, dropout_p: float, documents: DocumentMask | None) -> torch.Tensor:
        """The attention kernel on this rank's heads -> [s, b, hq/tp * d]."""
        if self.par.cp > 1:  # exact over the cp group's whole sequence; dropout refused by the config
            doc_ids = None if documents is None else documents.doc_ids
            return ring_attention(q, k, v, self.par.cp_group, causal=True, doc_ids=doc_ids, window=self.window)
        with _sharded_rng(self.rng_tracker) if dropout_p else nullcontext():  # this rank's heads: own mask
            return attention(q, k, v, causal=True, dropout_p=dropout_p, documents=documents, window=self.window)

    def _cached_attention(self, q, k, v, cache: KVCache) -> torch.Tensor:
        """Attention of new queries [s, b, hq/tp, d] over cached + new keys/values -> [s, b, hq/tp * d]."""
        offset = cache.offset
        if self.rope:  # positions offset .. offset+s-1
            cos, sin = self.rotary(offset + q.shape[0])
            q = kernels.apply_rotary(q, cos[offset:], sin[offset:])
            k = kernels.apply_rotary(k, cos[offset:], sin[offset:])
        k, v = cache.append(k, v)  # [t, b, hkv/tp, d], t = offset + s
        # the queries are the last s of t positions: attention aligns the causal mask bottom-right
        return attention(q, k, v, causal=True, window=self.window)  # [s, b, hq/tp * d]


def _swiglu_grad(d_act: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d_gate, d_up) of silu(gate) * up for d_act; the same ops autograd would run (mul's,
    then silu's backward), so the same bits."""
    return torch.ops.aten.silu_backward(d_act * up, gate), d_act * F.silu(gate)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only (gate, up) for backward (autograd would also keep silu(gate),
    [.., f]): silu is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, d_act):
        return _swiglu_grad(d_act, *ctx.saved_tensors)


class _SwiGLULinear(torch.autograd.Function):
    """This rank's fc2 partial product swiglu(gate, up) W^T, keeping (gate, up) and W only (selective
    recompute): the activation [.., f] fc2's backward needs is recomputed. The product runs in the
    inputs' dtype (under autocast, fc1's 16-bit output), as F.linear under autocast would."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        w = weight.to(gate.dtype)  # the 16-bit copy autocast would have made; what backward keeps
        ctx.save_for_backward(gate, up, w)
        ctx.weight_dtype = weight.dtype
        with torch.autocast(gate.device.type, enabled=False):
            return F.linear(F.silu(gate) * up, w)  # [.., h]

    @staticmethod
    def backward(ctx, d_out):
        gate, up, w = ctx.saved_tensors
        act = F.silu(gate) * up  # [.., f], recomputed
        d_out = d_out.to(w.dtype)
        d_w = d_out.reshape(-1, d_out.shape[-1]).t().matmul(act.reshape(-1, act.shape[-1]))  # [h, f]
        return (*_swiglu_grad(d_out.matmul(w), gate, up), d_w.to(ctx.weight_dtype))


class MLP(nn.Module):
    """SwiGLU or GELU MLP: column-parallel up projection, row-parallel down projection.

    SwiGLU fuses gate and up into one weight whose rows alternate
    (gate_0, up_0, gate_1, up_1, ...), so any contiguous tp shard holds
    matching gate/up pairs and the full matrix does not depend on tp. Backward keeps fc1's output
    and fc2's input; under selective recompute SwiGLU's activation (fc2's input) is recomputed.
    """

    def __init__(self, cfg: ModelConfig, par: BlockSettings = BlockSettings()):
        super().__init__()
        tp_group, sequence_parallel, ffn = par.tp_group, par.sequence_parallel, resolved_ffn_hidden_size(cfg)
        self.swiglu = cfg.activation == "swiglu"
        self.recompute_act = self.swiglu and par.activation_checkpointing == "selective"
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, 2 * ffn if self.swiglu else ffn, tp_group, bias=cfg.bias,
                                        sequence_parallel=sequence_parallel,
                                        init_method=normal_init(cfg.init_std), init_seed=None,
                                        paired_output=self.swiglu)  # -> (gate, up)
        self.fc2 = RowParallelLinear(ffn, cfg.hidden_size, tp_group, bias=cfg.bias,
                                     sequence_parallel=sequence_parallel, init_method=normal_init(out_std),
                                     init_seed=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.swiglu:
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # [s, b, h] (SP: [s/tp, b, h])
        gate, up = self.fc1(x)  # fc1's alternating rows apart: [s, b, f/tp] each, contiguous
        if self.recompute_act and torch.is_grad_enabled():
            return self.fc2.reduce(_SwiGLULinear.apply(gate, up, self.fc2.weight))
        return self.fc2(_SwiGLU.apply(gate, up))


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
        with _sharded_rng(self.residual_rng):
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
                              **_replay_tracker(self.rng_tracker))
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
