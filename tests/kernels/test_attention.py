"""Attention dispatch: SDPA and flash-attn against the explicit math path; GQA; document masking.

Tolerances (tests/tolerance.py, relative to the compared values): fp32 on CPU,
SDPA vs math rtol 1e-5 with a floor of 1e-5 * max|want| (both do the same math
in fp32, only the summation order differs: measured max|diff| ~1e-7 of
max|want|). Flash-attn (GPU, bf16) vs math on the bf16 inputs: rtol 1.6e-2 (two
bf16 ulps, 2 * 2^-7) with a floor of 8e-3 * max|want| (one ulp of the largest
value, for outputs that cancel to ~0).
"""
import importlib
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from megalite.data.documents import document_ids
from megalite.kernels.attention import ENV_VAR, DocumentMask, attention, choose_backend
from tests.tolerance import assert_close

attn_mod = importlib.import_module("megalite.kernels.attention")  # the package attribute is the function
RTOL, ATOL_FRAC = 1e-5, 1e-5  # fp32, same math in another summation order: a few ulps (1.2e-7), ~100x margin
SHAPES = [(7, 3, 6, 2, 12), (5, 2, 4, 4, 8), (9, 1, 3, 1, 6)]  # (s, b, hq, hkv, d): GQA, MHA, MQA; odd sizes


def _qkv(s, b, hq, hkv, d, seed=0, t=None, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = s if t is None else t
    q = torch.randn(s, b, hq, d, generator=g)
    k, v = torch.randn(t, b, hkv, d, generator=g), torch.randn(t, b, hkv, d, generator=g)
    return [x.to(device, dtype).requires_grad_() for x in (q, k, v)]


def _run(backend, monkeypatch, *args, **kwargs):
    monkeypatch.setenv(ENV_VAR, backend)
    return attention(*args, **kwargs)


def _naive(q, k, v, mask):
    """Textbook attention with kv repeated per head, mask [s, t] or None, fp64: the math path's own check."""
    s, b, hq, d = q.shape
    r = hq // k.shape[2]
    qh = q.double().permute(1, 2, 0, 3)  # [b, hq, s, d]
    kh, vh = (x.double().permute(1, 2, 0, 3).repeat_interleave(r, dim=1) for x in (k, v))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vh).permute(2, 0, 1, 3).reshape(s, b, hq * d)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_math_path_is_textbook_attention(shape, causal, monkeypatch):
    q, k, v = _qkv(*shape)
    s = shape[0]
    mask = torch.ones(s, s, dtype=torch.bool).tril() if causal else None
    got = _run("math", monkeypatch, q, k, v, causal=causal)
    assert_close(got.double(), _naive(q, k, v, mask), RTOL, ATOL_FRAC, "math vs fp64 textbook")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_equals_math_outputs_and_gradients(shape, causal, monkeypatch):
    outs, grads = [], []
    for backend in ("sdpa", "math"):
        q, k, v = _qkv(*shape)
        out = _run(backend, monkeypatch, q, k, v, causal=causal, scale=0.3)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outs.append(out.detach())
        grads.append([x.grad for x in (q, k, v)])
    assert_close(outs[0], outs[1], RTOL, ATOL_FRAC, "output")
    for a, b, name in zip(*grads, "qkv"):
        assert_close(a, b, RTOL, ATOL_FRAC, f"d{name}")


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_queries_after_a_cache_see_every_earlier_key(backend, monkeypatch):
    """t > s (decoding): the s queries are the last positions; equal to the last rows of a full run."""
    s, t = 3, 8
    q, k, v = _qkv(t, 2, 4, 2, 8, seed=1)
    full = _run(backend, monkeypatch, q, k, v, causal=True)
    tail = _run(backend, monkeypatch, q[-s:], k, v, causal=True)
    assert_close(tail, full[-s:], RTOL, ATOL_FRAC, "last rows")


def test_gqa_does_not_repeat_kv(monkeypatch):
    seen = {}
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.update(kv_heads=k.shape[1], enable_gqa=kwargs.get("enable_gqa"))
        return real_sdpa(q, k, v, **kwargs)

    def no_repeat(*args, **kwargs):
        raise AssertionError("kv was repeated for GQA")

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_repeat)
    monkeypatch.setattr(torch, "repeat_interleave", no_repeat)
    q, k, v = _qkv(6, 2, 8, 2, 4)
    for backend in ("sdpa", "math"):
        _run(backend, monkeypatch, q, k, v).sum().backward()
    assert seen == {"kv_heads": 2, "enable_gqa": True}


def test_automatic_choice_on_cpu_is_sdpa_and_logged_once(monkeypatch, caplog):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(attn_mod, "_logged", set())
    q, k, v = _qkv(4, 1, 2, 2, 8)
    backend, why = choose_backend(q)
    assert backend == "sdpa" and ("flash_attn" in why or "cpu" in why), why
    with caplog.at_level(logging.INFO, logger="megalite.kernels"):
        attention(q, k, v)
        attention(q, k, v)
    lines = [r.getMessage() for r in caplog.records if r.name == "megalite.kernels"]
    assert lines == [f"attention backend: sdpa ({why})"]


def test_forcing_a_backend_and_bad_values(monkeypatch):
    q, k, v = _qkv(4, 1, 2, 2, 8)
    monkeypatch.setenv(ENV_VAR, "math")
    assert choose_backend(q) == ("math", f"forced by {ENV_VAR}=math")
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match="'fast' is not one of"):
        attention(q, k, v)
    monkeypatch.setenv(ENV_VAR, "flash")  # CPU fp32: flash-attn cannot run, and says why
    with pytest.raises(RuntimeError, match="MEGALITE_ATTENTION=flash, but"):
        attention(q, k, v)


def test_shape_errors_name_the_rule():
    q, k, v = _qkv(4, 1, 6, 4, 8)
    with pytest.raises(ValueError, match="multiple of hkv"):
        attention(q, k, v)
    q, k, v = _qkv(4, 2, 4, 2, 8)
    with pytest.raises(ValueError, match="does not fit"):
        attention(q, k, v, documents=DocumentMask(torch.zeros(2, 5, dtype=torch.int64)))


# ------------------------------------------------------------ documents
EOD = 0
PACKED = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4, 3],  # documents of lengths 3, 4, 2
                       [0, 5, 5, 5, 5, 5, 5, 5, 0]])  # 1, 8 (a sample may start with an EOD)


def test_document_ids_start_a_document_after_each_eod():
    assert document_ids(PACKED, EOD).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1]]
    cu, longest = DocumentMask(document_ids(PACKED, EOD)).varlen()
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 7, 9, 10, 18] and longest == 8


def test_dense_mask_is_causal_within_documents():
    mask = DocumentMask(document_ids(PACKED, EOD)).dense()[0, 0]  # [s, s]
    assert mask[3].tolist() == [False] * 3 + [True] + [False] * 5  # first token of document 1 sees itself only
    assert mask[6].tolist() == [False] * 3 + [True] * 4 + [False] * 2
    assert not mask.triu(1).any()


def _segments(row):
    ids = document_ids(row[None], EOD)[0].tolist()
    return [(start, start + ids.count(d)) for d, start in ((d, ids.index(d)) for d in sorted(set(ids)))]


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_each_document_attends_as_if_alone(backend, monkeypatch):
    s, b, hq, hkv, d = PACKED.shape[1], PACKED.shape[0], 6, 2, 8
    q, k, v = _qkv(s, b, hq, hkv, d, seed=2)
    packed = _run(backend, monkeypatch, q, k, v, documents=DocumentMask(document_ids(PACKED, EOD)))
    plain = _run(backend, monkeypatch, q, k, v)
    for i in range(b):
        for start, end in _segments(PACKED[i]):
            alone = _run(backend, monkeypatch, *(x[start:end, i:i + 1] for x in (q, k, v)))
            assert_close(packed[start:end, i:i + 1], alone, RTOL, ATOL_FRAC, f"sample {i} document {start}:{end}")
    assert not torch.allclose(packed, plain, atol=1e-3)  # the mask did change later documents


def test_document_gradients_sdpa_equal_math(monkeypatch):
    documents = DocumentMask(document_ids(PACKED, EOD))
    grads = []
    for backend in ("sdpa", "math"):
        q, k, v = _qkv(PACKED.shape[1], PACKED.shape[0], 4, 2, 8, seed=3)
        _run(backend, monkeypatch, q, k, v, documents=documents).pow(2).sum().backward()
        grads.append([x.grad for x in (q, k, v)])
    for a, b, name in zip(*grads, "qkv"):
        assert_close(a, b, RTOL, ATOL_FRAC, f"d{name}")


# ------------------------------------------------------------ sliding window
def _band(s: int, t: int, window: int) -> torch.Tensor:
    """[s, t] by definition, one query at a time: query i (position t - s + i) sees keys
    max(0, pos - window + 1) .. pos."""
    mask = torch.zeros(s, t, dtype=torch.bool)
    for i in range(s):
        pos = t - s + i
        mask[i, max(0, pos - window + 1):pos + 1] = True
    return mask


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [1, 3])
def test_sliding_window_is_the_band_of_the_last_window_keys(backend, shape, window, monkeypatch):
    s = shape[0]
    for t in (s, s + 4):  # training, and new queries after 4 cached keys (decoding)
        q, k, v = _qkv(*shape, t=t)
        got = _run(backend, monkeypatch, q, k, v, window=window)
        assert_close(got.double(), _naive(q, k, v, _band(s, t, window)), RTOL, ATOL_FRAC, f"{backend} t={t}")
    assert_close(_run(backend, monkeypatch, q, k, v, window=t), _run(backend, monkeypatch, q, k, v), RTOL, ATOL_FRAC,
                 "a window as long as the keys is no window")


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_sliding_window_within_documents_and_its_gradients(backend, monkeypatch):
    s, b, hq, hkv, d, window = PACKED.shape[1], PACKED.shape[0], 4, 2, 8, 2
    documents = DocumentMask(document_ids(PACKED, EOD))
    q, k, v = _qkv(s, b, hq, hkv, d, seed=5)
    got = _run(backend, monkeypatch, q, k, v, documents=documents, window=window)
    for i in range(b):  # each document on its own, with the same window
        for start, end in _segments(PACKED[i]):
            alone = _naive(*(x[start:end, i:i + 1] for x in (q, k, v)), _band(end - start, end - start, window))
            assert_close(got[start:end, i:i + 1].double(), alone, RTOL, ATOL_FRAC, f"sample {i} doc {start}:{end}")
    got.pow(2).sum().backward()
    mine = [x.grad for x in (q, k, v)]
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    mask = documents.dense(True, window)  # [b, 1, s, s]
    want = torch.stack([_naive(*(x[:, i:i + 1] for x in (q2, k2, v2)), mask[i, 0])[:, 0] for i in range(b)], 1)
    want.pow(2).sum().backward()
    for a, w, name in zip(mine, (q2.grad, k2.grad, v2.grad), "qkv"):
        assert_close(a.double(), w, RTOL, ATOL_FRAC, f"d{name}")


def test_sliding_window_needs_causal_attention_and_a_positive_width():
    q, k, v = _qkv(4, 1, 2, 2, 4)
    for kwargs in ({"window": 0}, {"window": 2, "causal": False}):
        with pytest.raises(ValueError, match="sliding window needs causal attention and window >= 1"):
            attention(q, k, v, **kwargs)


# ------------------------------------------------------------------ GPU
def _needs_flash():
    if attn_mod._flash_module()[0] is None:
        pytest.skip("flash_attn is not importable")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(129, 2, 8, 2, 64), (77, 3, 4, 4, 128)])
@pytest.mark.parametrize("with_documents", [False, True])
@pytest.mark.parametrize("window", [None, 17], ids=["global", "window17"])
def test_flash_and_cuda_sdpa_equal_math(shape, with_documents, window, monkeypatch):
    s, b = shape[:2]
    tokens = torch.randint(1, 50, (b, s), generator=torch.Generator().manual_seed(0))
    tokens[:, ::23] = EOD
    documents = DocumentMask(document_ids(tokens.cuda(), EOD)) if with_documents else None
    q, k, v = _qkv(*shape, seed=4, dtype=torch.bfloat16, device="cuda")
    want = _run("math", monkeypatch, q, k, v, documents=documents, window=window).float()
    backends = ["sdpa"] + ([] if attn_mod._flash_module()[0] is None else ["flash"])
    for backend in backends:
        got = _run(backend, monkeypatch, q, k, v, documents=documents, window=window).float()
        # bf16 outputs of two kernels: each within half an ulp of its fp32 result, which differ by bf16
        # rounding of the intermediates: rtol two bf16 ulps (2 * 2^-7), floor one ulp of max|want|
        assert_close(got, want, rtol=1.6e-2, atol_frac=8e-3, what=backend)


@pytest.mark.gpu
def test_flash_is_chosen_for_cuda_bf16(monkeypatch):
    _needs_flash()
    monkeypatch.delenv(ENV_VAR, raising=False)
    q = torch.zeros(4, 1, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert choose_backend(q)[0] == "flash"
    assert choose_backend(q.float())[0] == "sdpa"
