"""Causal self-attention: fused QKV (column-parallel), rotary, the attention kernel (ring attention
under context parallelism), output (row-parallel); and the KV cache of incremental decoding."""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalite import kernels
from megalite.config import ModelConfig, head_dim
from megalite.kernels.attention import DocumentMask, attention
from megalite.kernels.ring_attention import ring_attention
from megalite.model.norms import RMSNorm
from megalite.model.rope import RotaryTables
from megalite.model.settings import BlockSettings, need_tracker, replay_tracker, sharded_rng
from megalite.tensor_parallel import ColumnParallelLinear, RowParallelLinear, normal_init


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
        need_tracker(cfg, par)
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
                             **replay_tracker(self.rng_tracker))
        else:
            out = self._core(q, k, v, dropout_p, documents)  # [s, b, hq/tp * d]
        return self.proj(out)  # [s, b, h] (SP: [s/tp, b, h])

    def _core(self, q, k, v, dropout_p: float, documents: DocumentMask | None) -> torch.Tensor:
        """The attention kernel on this rank's heads -> [s, b, hq/tp * d]."""
        if self.par.cp > 1:  # exact over the cp group's whole sequence; dropout refused by the config
            doc_ids = None if documents is None else documents.doc_ids
            return ring_attention(q, k, v, self.par.cp_group, causal=True, doc_ids=doc_ids, window=self.window)
        with sharded_rng(self.rng_tracker) if dropout_p else nullcontext():  # this rank's heads: own mask
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
