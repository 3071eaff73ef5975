"""Causal (grouped-query) attention on sequence-first tensors, via PyTorch SDPA.

scaled_dot_product_attention picks flash / memory-efficient / math kernels
by itself; this wrapper only converts the [s, b, heads, d] layout the model
uses and handles grouped-query attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

# enable_gqa lets SDPA broadcast kv heads without materialising copies (torch >= 2.5)
_HAS_ENABLE_GQA = TorchVersion(torch.__version__) >= (2, 5)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v for q [s, b, hq, d], k/v [s, b, hkv, d] -> [s, b, hq*d].

    hq must be a multiple of hkv; query head j uses kv head j // (hq/hkv).
    `scale` defaults to 1/sqrt(d). Dropout applies to the attention
    probabilities; pass 0.0 in eval.
    """
    s, b, hq, d = q.shape
    hkv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (s, b) or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree; "
                         "expected q [s, b, hq, d] and k, v [s, b, hkv, d]")
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} kv heads; hq must be a multiple of hkv")
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [s, b, h, d] -> [b, h, s, d]
    kwargs = {}
    if hq != hkv:
        if _HAS_ENABLE_GQA:
            kwargs["enable_gqa"] = True
        else:
            kh = kh.repeat_interleave(hq // hkv, dim=1)  # [b, hkv, s, d] -> [b, hq, s, d]
            vh = vh.repeat_interleave(hq // hkv, dim=1)
    out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout_p, is_causal=causal, scale=scale,
                                         **kwargs)  # [b, hq, s, d]
    return out.permute(2, 0, 1, 3).reshape(s, b, hq * d)  # [b, hq, s, d] -> [s, b, hq, d] -> [s, b, hq*d]
