"""Reference kernels: RMSNorm, rotary embeddings, GQA attention, and the dispatch point."""
import math

import pytest
import torch

from megalite import kernels
from megalite.kernels.attention import attention
from megalite.kernels.reference import apply_rotary, layer_norm, rms_norm, rope_cos_sin
from tests.tolerance import assert_close


def _t(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_dispatch_reports_reference_and_routes_there():
    assert kernels.backend("cpu") == "reference"  # CPU tensors always take the twins
    x, w = _t(0, 3, 8), _t(1, 8)
    assert torch.equal(kernels.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))
    cos, sin = rope_cos_sin(4, 8)
    q = _t(2, 4, 1, 2, 8)
    assert torch.equal(kernels.apply_rotary(q, cos, sin), apply_rotary(q, cos, sin))


# fp32: a 16-term mean, rsqrt and two products, a few ulps (1.2e-7): rtol 1e-6 (~8 ulps). bf16: the result
# is rounded to bf16 once or twice (unit roundoff 2^-8 = 3.9e-3 each): rtol 1e-2. No term cancels (y is a
# product), so the floors stay small.
@pytest.mark.parametrize("dtype,rtol,atol_frac", [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 1e-2, 1e-3)])
def test_rms_norm_matches_the_formula(dtype, rtol, atol_frac):
    x, w = _t(0, 3, 5, 16).to(dtype), _t(1, 16)
    y = rms_norm(x, w, 1e-5)
    xd = x.double()
    want = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert y.dtype == dtype
    assert_close(y.double(), want, rtol, atol_frac, f"{dtype} rms_norm")


def test_layer_norm_keeps_dtype_and_matches_torch():
    x, w, b = _t(0, 4, 16).bfloat16(), _t(1, 16), _t(2, 16)
    y = layer_norm(x, w, b, 1e-5)
    assert y.dtype == torch.bfloat16
    # bf16 result vs fp32 torch on the same bf16 inputs: bf16 rounding (2^-8 = 3.9e-3 relative, at most twice):
    # rtol 1e-2; floor 4e-3 * max|want| (one rounding of the largest term) where + bias cancels to ~0
    want = torch.nn.functional.layer_norm(x.float(), (16,), w, b, 1e-5)
    assert_close(y.float(), want, rtol=1e-2, atol_frac=4e-3, what="bf16 layer_norm")


def test_rope_table_shape_and_first_position_is_identity():
    cos, sin = rope_cos_sin(6, 8, theta=10000.0)
    assert cos.shape == sin.shape == (6, 4) and cos.dtype == torch.float32
    assert torch.allclose(cos[1, 1], torch.tensor(math.cos(10000 ** (-2 / 8))))
    x = _t(0, 6, 2, 3, 8)
    for interleaved in (False, True):
        y = apply_rotary(x, cos, sin, interleaved=interleaved)
        assert torch.allclose(y[0], x[0])  # position 0 is not rotated


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_preserves_norms_and_relative_position(interleaved):
    cos, sin = rope_cos_sin(16, 8)
    x = _t(0, 16, 2, 3, 8)
    y = apply_rotary(x, cos, sin, interleaved=interleaved)
    assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol_frac=1e-6, what="norms")  # fp32 rotation: ulps
    # the same q, k placed at positions (i, j) give a dot product that depends only on i - j
    q, k = _t(1, 8), _t(2, 8)
    qs = apply_rotary(q.expand(16, 1, 1, 8), cos, sin, interleaved=interleaved)[:, 0, 0]
    ks = apply_rotary(k.expand(16, 1, 1, 8), cos, sin, interleaved=interleaved)[:, 0, 0]
    # the rotations at other angles round differently, by ulps of the terms (|q||k|), not of the dot product,
    # which may be near 0: rel 1e-5 plus a floor of 1e-6 * |q||k|; a position-dependent error is ~1e-1
    terms = float(q.norm() * k.norm())
    assert float(qs[5] @ ks[2]) == pytest.approx(float(qs[13] @ ks[10]), rel=1e-5, abs=1e-6 * terms)
    assert not torch.allclose(qs[5] @ ks[2], qs[5] @ ks[4], atol=1e-3)


def test_interleaved_is_rotate_half_on_permuted_features():
    cos, sin = rope_cos_sin(5, 8)
    x = _t(0, 5, 2, 3, 8)
    perm = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # pairs (2i, 2i+1) -> (i, i + 4)
    inverse = torch.argsort(perm)
    half = apply_rotary(x[..., perm], cos, sin, interleaved=False)[..., inverse]
    # the same products on permuted features (bitwise equal here): rtol 1e-5 absorbs a fused multiply-add
    assert_close(apply_rotary(x, cos, sin, interleaved=True), half, rtol=1e-5, atol_frac=1e-6, what="interleaved")
    assert not torch.allclose(apply_rotary(x, cos, sin, interleaved=True), apply_rotary(x, cos, sin), atol=1e-3)


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_leaves_the_rest_untouched(interleaved):
    cos, sin = rope_cos_sin(5, 4)
    x = _t(0, 5, 2, 3, 10)
    y = apply_rotary(x, cos, sin, interleaved=interleaved, rot_dim=4)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.allclose(y[..., :4], apply_rotary(x[..., :4].contiguous(), cos, sin, interleaved=interleaved))
    assert not torch.allclose(y[1:, ..., :4], x[1:, ..., :4], atol=1e-3)


def test_rotary_keeps_bf16_and_rejects_bad_tables():
    cos, sin = rope_cos_sin(4, 8)
    assert apply_rotary(_t(0, 4, 1, 1, 8).bfloat16(), cos, sin).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="covers 4 positions"):
        apply_rotary(_t(0, 6, 1, 1, 8), cos, sin)
    with pytest.raises(ValueError, match="rot_dim=6"):
        apply_rotary(_t(0, 4, 1, 1, 8), cos, sin, rot_dim=6)
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(4, 7)


def _explicit_attention(q, k, v):
    """Causal attention written out: repeat kv heads, scores, mask, softmax, weighted sum."""
    s, b, hq, d = q.shape
    rep = hq // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(s, b, hq * d)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_attention_matches_explicit_math_with_and_without_gqa(hq, hkv):
    q, k, v = _t(0, 7, 2, hq, 8), _t(1, 7, 2, hkv, 8), _t(2, 7, 2, hkv, 8)
    out = attention(q, k, v, causal=True)
    assert out.shape == (7, 2, hq * 8)
    # fp32, the same math in another summation order: a few ulps; rtol 1e-5, floor 1e-5 * max|out| (~100x)
    assert_close(out, _explicit_attention(q, k, v), rtol=1e-5, atol_frac=1e-5, what=f"attention hq={hq} hkv={hkv}")


def test_attention_is_causal_and_checks_head_counts():
    q, k, v = _t(0, 6, 1, 2, 4), _t(1, 6, 1, 2, 4), _t(2, 6, 1, 2, 4)
    out = attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[4:], v2[4:] = 0.0, 5.0  # changing the future must not change earlier outputs
    assert torch.allclose(attention(q, k2, v2)[:4], out[:4])
    with pytest.raises(ValueError, match="multiple of hkv"):
        attention(_t(0, 6, 1, 3, 4), k, v)
