"""Attention on sequence-first tensors: flash-attn, else PyTorch SDPA, else an explicit math path.

Layout: q [s, b, hq, d], k and v [t, b, hkv, d] -> out [s, b, hq * d], with
query head j using kv head j // (hq / hkv) (grouped-query attention).

Backends, chosen per call from the tensors (the first use of each choice is
logged once on the "megalite.kernels" logger, with the reason):

    flash  flash_attn.flash_attn_func / flash_attn_varlen_func: when flash_attn
           imports and the tensors are CUDA fp16/bf16 with head_dim <= 256.
           GQA is native (kv is never expanded).
    sdpa   torch.nn.functional.scaled_dot_product_attention, which picks its own
           flash / cuDNN / memory-efficient / math kernel. GQA through
           enable_gqa (torch >= 2.5) rather than repeating kv; with an explicit
           mask (documents) CUDA may fall back to its math kernel.
    math   softmax(q k^T * scale + mask) v written out in fp32: the oracle the
           other two are tested against, and the path of last resort.

MEGALITE_ATTENTION=flash|sdpa|math forces one; forcing flash where it cannot
run is an error rather than a silent fallback.

Sliding windows (model.attention_window): a query sees itself and the
window - 1 positions before it; flash-attn takes it as window_size=(window - 1, 0),
SDPA and math as a boolean band mask (combined with the document mask when
both apply).

Document masking (data.reset_attention_mask): a packed sample holds several
documents, each ended by an EOD token. megalite.data.documents numbers them per
position (the EOD belongs to the document it ends, as in Megatron's
get_ltor_masks_and_position_ids) as the loader builds each batch; a `DocumentMask`, built once per
micro-batch and shared by every layer, lets a token see only earlier tokens
of its own document: flash-attn runs it as variable-length attention over
cu_seqlens, SDPA and math as a boolean block mask [b, 1, s, s]. Positions
(rotary / learned) are NOT reset at document starts: Megatron keeps that a
separate switch (reset_position_ids) and megalite has no such field, so a
document keeps the absolute positions it has inside the sample.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

BACKENDS = ("flash", "sdpa", "math")
ENV_VAR = "MEGALITE_ATTENTION"
FLASH_MAX_HEAD_DIM = 256
# enable_gqa lets SDPA broadcast kv heads without materialising copies (torch >= 2.5)
_HAS_ENABLE_GQA = TorchVersion(torch.__version__) >= (2, 5)
_HAS_SDPA = hasattr(F, "scaled_dot_product_attention")
_log = logging.getLogger("megalite.kernels")
_logged: set[tuple[str, str]] = set()


# ------------------------------------------------------------ documents
class DocumentMask:
    """Which positions of b packed samples may attend to each other: those of the same document.

    Built once per micro-batch from `doc_ids` [b, s] (megalite.data.documents) and
    handed to every layer; the tensors each backend needs are derived on
    first use and cached, so the per-layer cost is nothing.
    """

    def __init__(self, doc_ids: torch.Tensor):
        if doc_ids.dim() != 2 or doc_ids.is_floating_point() or doc_ids.is_complex():
            raise ValueError(f"doc_ids must be an integer tensor [batch, seq]; got {doc_ids.dtype} "
                             f"{tuple(doc_ids.shape)}")
        self.doc_ids = doc_ids
        self._dense: dict[tuple[bool, int | None], torch.Tensor] = {}
        self._varlen: tuple[torch.Tensor, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(batch, seq) the mask was built for."""
        return tuple(self.doc_ids.shape)

    def dense(self, causal: bool = True, window: int | None = None) -> torch.Tensor:
        """Boolean [b, 1, s, s], True where query i may attend to key j (same document, j <= i if causal,
        and i - j < window if a sliding window is given)."""
        if (causal, window) not in self._dense:
            ids = self.doc_ids
            mask = ids[:, :, None] == ids[:, None, :]  # [b, s, 1] == [b, 1, s] -> [b, s, s]
            if causal:
                mask &= causal_mask(ids.shape[1], ids.shape[1], window, ids.device)
            self._dense[causal, window] = mask.unsqueeze(1)  # -> [b, 1, s, s]: broadcast over heads
        return self._dense[causal, window]

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 [n + 1], max_seqlen) of the n documents of the flattened [b * s] batch.

        A sample's first position always starts a document, so no document
        spans two samples. max_seqlen costs one device sync, once per micro-batch.
        """
        if self._varlen is None:
            ids = self.doc_ids
            b, s = ids.shape
            starts = torch.ones(b, s, dtype=torch.bool, device=ids.device)
            starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
            begin = starts.flatten().nonzero().flatten()  # [n]: flat index of each document's first token
            end = torch.tensor([b * s], device=ids.device, dtype=begin.dtype)
            cu = torch.cat((begin, end)).to(torch.int32)
            self._varlen = (cu, int((cu[1:] - cu[:-1]).max()))
        return self._varlen


# ------------------------------------------------------------- dispatch
@functools.cache
def _flash_module():
    """(flash_attn module or None, why it is unavailable)."""
    try:
        import flash_attn
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or built for another torch/CUDA
        return None, f"flash_attn is not importable ({type(e).__name__}: {e})"
    return flash_attn, ""


def _flash_unusable(device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why flash-attn cannot run on queries of this device type, dtype and head dim, or None when it can."""
    module, why = _flash_module()
    if module is None:
        return why
    if device_type != "cuda":
        return f"the tensors are on {device_type}, flash-attn needs CUDA"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the tensors are {dtype}, flash-attn needs float16 or bfloat16"
    if head_dim > FLASH_MAX_HEAD_DIM:
        return f"head_dim {head_dim} exceeds flash-attn's {FLASH_MAX_HEAD_DIM}"
    return None


def choose_backend(q: torch.Tensor) -> tuple[str, str]:
    """(backend, reason) for queries q: MEGALITE_ATTENTION if set, else flash, then sdpa, then math."""
    return _choose(q.device.type, q.dtype, q.shape[-1])


def _choose(device_type: str, dtype: torch.dtype, head_dim: int) -> tuple[str, str]:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not one of {BACKENDS}; unset it to choose automatically")
        if forced == "flash" and (why := _flash_unusable(device_type, dtype, head_dim)):
            raise RuntimeError(f"{ENV_VAR}=flash, but {why}; install flash-attn for this torch and run "
                               "fp16/bf16 on CUDA, or unset it")
        if forced == "sdpa" and not _HAS_SDPA:
            raise RuntimeError(f"{ENV_VAR}=sdpa, but torch {torch.__version__} has no "
                               "scaled_dot_product_attention; unset it")
        return forced, f"forced by {ENV_VAR}={forced}"
    why = _flash_unusable(device_type, dtype, head_dim)
    if why is None:
        return "flash", "flash_attn is importable and the tensors are CUDA fp16/bf16"
    if _HAS_SDPA:
        return "sdpa", f"not flash-attn: {why}"
    return "math", f"torch {torch.__version__} has no scaled_dot_product_attention"


def _backend(device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    backend, reason = _choose(device_type, dtype, head_dim)
    _log_once(backend, reason)
    return backend


def mark_backend_choice_constant() -> None:
    """Let torch.compile run the backend choice at trace time and bake the answer in (it depends only
    on what a compiled graph is specialised on: device, dtype, head dim; and on the environment), so
    the choice (an import attempt, an environment variable, a log line) is no graph break. See
    kernels.mark_choices_constant, which calls it."""
    torch.compiler.assume_constant_result(_backend)  # marks the function itself (it returns the same one)


def _log_once(backend: str, reason: str) -> None:
    if (backend, reason) not in _logged:
        _logged.add((backend, reason))
        _log.info("attention backend: %s (%s)", backend, reason)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, dropout_p: float = 0.0,
              scale: float | None = None, documents: DocumentMask | None = None,
              window: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [s, b, hq, d], k/v [t, b, hkv, d] -> [s, b, hq * d].

    hq must be a multiple of hkv; query head j uses kv head j // (hq/hkv).
    `scale` defaults to 1/sqrt(d). Dropout applies to the attention
    probabilities; pass 0.0 in eval. t >= s: the queries are the LAST s of
    the t positions (incremental decoding), so the causal mask is aligned
    bottom-right. `documents` (t == s only) also confines every query to
    its own document. `window` (causal only) is a sliding window: a query
    sees itself and the window - 1 positions before it.
    """
    _check_shapes(q, k, v, documents)
    if window is not None and (not causal or window < 1):
        raise ValueError(f"a sliding window needs causal attention and window >= 1; got window={window}, "
                         f"causal={causal}")
    impl = _IMPLS[_backend(q.device.type, q.dtype, q.shape[-1])]
    return impl(q, k, v, causal, dropout_p, scale, documents, window)


def _check_shapes(q, k, v, documents) -> None:
    s, b, hq, d = q.shape
    if k.shape != v.shape or k.shape[1] != b or k.shape[3] != d or k.shape[0] < s:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree; "
                         "expected q [s, b, hq, d] and k, v [t, b, hkv, d] with t >= s")
    if hq % k.shape[2]:
        raise ValueError(f"{hq} query heads cannot share {k.shape[2]} kv heads; hq must be a multiple of hkv")
    if documents is not None and (documents.shape != (b, s) or k.shape[0] != s):
        raise ValueError(f"document mask of shape {documents.shape} does not fit q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}: it needs [b, s] = [{b}, {s}] and as many keys as queries")


def causal_mask(s: int, t: int, window: int | None, device) -> torch.Tensor:
    """Boolean [s, t]: query i sits at position t - s + i and may see keys j <= t - s + i, and with a
    sliding window only those with t - s + i - j < window."""
    position, key = torch.arange(t - s, t, device=device)[:, None], torch.arange(t, device=device)[None, :]
    allowed = key <= position
    return allowed if window is None else allowed & (position - key < window)


def _mask(s: int, t: int, causal: bool, documents: DocumentMask | None, device,
          need_causal: bool, window: int | None = None) -> torch.Tensor | None:
    """Boolean [b or 1, 1, s, t], True = may attend; None when no mask is needed (or, unless
    `need_causal`, when a plain causal s == t mask is left to the kernel's is_causal)."""
    if documents is not None:
        return documents.dense(causal, window)
    if not causal or (t == s and not need_causal and window is None):
        return None
    return causal_mask(s, t, window, device)[None, None]


# ------------------------------------------------------------- backends
def _math(q, k, v, causal, dropout_p, scale, documents, window) -> torch.Tensor:
    s, b, hq, d = q.shape
    t, hkv = k.shape[0], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.float().permute(1, 2, 0, 3).reshape(b, hkv, hq // hkv, s, d)  # [s, b, hq, d] -> [b, hkv, r, s, d]
    kg, vg = (x.float().permute(1, 2, 0, 3) for x in (k, v))  # [t, b, hkv, d] -> [b, hkv, t, d]
    scores = torch.einsum("bgrsd,bgtd->bgrst", qg, kg) * scale  # kv shared by the r heads of a group, no copy
    mask = _mask(s, t, causal, documents, q.device, need_causal=True, window=window)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))  # [b|1, 1, s, t] -> [b|1, 1, 1, s, t]
    probs = scores.softmax(dim=-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    out = torch.einsum("bgrst,bgtd->bgrsd", probs, vg)  # [b, hkv, r, s, d]
    return out.reshape(b, hq, s, d).permute(2, 0, 1, 3).reshape(s, b, hq * d).to(q.dtype)  # -> [s, b, hq*d]


def _sdpa(q, k, v, causal, dropout_p, scale, documents, window) -> torch.Tensor:
    s, b, hq, d = q.shape
    t, hkv = k.shape[0], k.shape[2]
    qh, kh, vh = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [., b, h, d] -> [b, h, ., d]
    kwargs = {}
    if hq != hkv:
        if _HAS_ENABLE_GQA:
            kwargs["enable_gqa"] = True
        else:  # torch < 2.5 only: SDPA needs as many kv heads as query heads
            kh = kh.repeat_interleave(hq // hkv, dim=1)  # [b, hkv, t, d] -> [b, hq, t, d]
            vh = vh.repeat_interleave(hq // hkv, dim=1)
    mask = _mask(s, t, causal, documents, q.device, need_causal=False, window=window)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=causal and mask is None, scale=scale, **kwargs)  # [b, hq, s, d]
    return out.permute(2, 0, 1, 3).reshape(s, b, hq * d)  # [b, hq, s, d] -> [s, b, hq, d] -> [s, b, hq*d]


def _flash(q, k, v, causal, dropout_p, scale, documents, window) -> torch.Tensor:
    fa = _flash_module()[0]
    s, b, hq, d = q.shape
    span = (-1, -1) if window is None else (window - 1, 0)  # keys i - (window - 1) .. i
    if documents is None:  # flash-attn's causal mask is bottom-right aligned, as decoding needs
        out = fa.flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), dropout_p,
                                 softmax_scale=scale, causal=causal, window_size=span)  # [b, s, hq, d]
        return out.transpose(0, 1).reshape(s, b, hq * d)  # -> [s, b, hq, d] -> [s, b, hq*d]
    cu, longest = documents.varlen()
    # [s, b, h, d] -> [b, s, h, d] -> [b*s, h, d]: sample-major, so each document is contiguous
    qp, kp, vp = (x.transpose(0, 1).reshape(b * s, x.shape[2], d) for x in (q, k, v))
    out = fa.flash_attn_varlen_func(qp, kp, vp, cu, cu, longest, longest, dropout_p, softmax_scale=scale,
                                    causal=causal, window_size=span)  # [b*s, hq, d]
    return out.view(b, s, hq, d).transpose(0, 1).reshape(s, b, hq * d)  # -> [s, b, hq*d]


_IMPLS = {"flash": _flash, "sdpa": _sdpa, "math": _math}
