"""Fused kernels against their PyTorch twins.

CPU part (always runs): the Python plumbing of megalite.kernels.fused (fake
impls, autograd formulas, torch.compile tracing) on a CPU "twin" library
whose ops have the extension's schemas and do the kernels' math in PyTorch,
including the closed-form RMSNorm backward the CUDA kernel implements.

GPU part (`gpu` marker): the compiled ops against reference.py, outputs and
every gradient, fp32/fp16/bf16, odd sizes. Tolerances (relative, see
tests/tolerance.py: rtol tol, floor tol * max|want|): rotary is computed
with the same roundings as the twin, so fp32 matches to 1e-6 and fp16/bf16
to one unit in the last place; RMSNorm sums in a different order, so fp32
within 1e-5 relative, fp16 within 2e-3 and bf16 within 2e-2 (one ulp).
"""
import pytest
import torch

from megalite import kernels
from megalite.kernels import fused, reference
from tests.tolerance import assert_close

TWIN = "megalite_twin"
_twin_lib = None


def _twin_rms_fwd(x, weight, eps):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = xf * rstd[..., None]
    return (y if weight is None else y * weight.float()).to(x.dtype), rstd


def _twin_rms_bwd(dy, x, weight, rstd):
    """The closed form the CUDA kernel uses: dx = r * (g - x * r^2 * mean(g * x)), g = dy * w."""
    xf, dyf, r = x.float(), dy.float(), rstd[..., None]
    g = dyf if weight is None else dyf * weight.float()
    dx = r * (g - xf * (g * xf).mean(-1, keepdim=True) * r * r)
    if weight is None:
        return dx.to(x.dtype), x.new_empty((0,), dtype=torch.float32)
    dw = (dyf * (xf * r)).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def _twin_rotary(x, cos, sin, interleaved, rot_dim, conjugate):
    return reference.apply_rotary(x, cos, -sin if conjugate else sin, interleaved=interleaved, rot_dim=rot_dim)


@pytest.fixture
def twin_ops(monkeypatch):
    """fused.* routed to the CPU twin library (registered once per process)."""
    global _twin_lib
    if _twin_lib is None:
        lib = torch.library.Library(TWIN, "DEF")
        for name, schema in fused.SCHEMAS.items():
            lib.define(schema)
        lib.impl("rms_norm_fwd", _twin_rms_fwd, "CPU")
        lib.impl("rms_norm_bwd", _twin_rms_bwd, "CPU")
        lib.impl("rotary", _twin_rotary, "CPU")
        saved = fused._state["ops"]
        fused.register_python_side(TWIN)
        fused._state["ops"] = saved
        _twin_lib = lib
    monkeypatch.setitem(fused._state, "ops", getattr(torch.ops, TWIN))


def _grads(fn, *tensors):
    out = fn()
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(7)))
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("with_weight", [True, False])
def test_fused_rms_norm_plumbing_and_closed_form_backward(twin_ops, with_weight):
    x = torch.randn(5, 3, 24, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(24).requires_grad_() if with_weight else None
    got, (gx, *gw) = _grads(lambda: fused.rms_norm(x, w, 1e-5), x, *([w] if w is not None else []))
    x.grad = None
    if w is not None:
        w.grad = None
    want, (wx, *ww) = _grads(lambda: reference.rms_norm(x, w, 1e-5), x, *([w] if w is not None else []))
    assert_close(got, want, rtol=1e-6, atol_frac=1e-6, what="y")  # the twin's forward is the same fp32 math
    # closed form vs autograd's chain: other roundings, and dx = r * (g - x * mean(g x) r^2) cancels, so
    # rtol 1e-5 plus a floor of 1e-5 * max|want| (fp32 ulps of the terms); a wrong term is ~1e-1
    assert_close(gx, wx, rtol=1e-5, atol_frac=1e-5, what="dx")
    for a, b in zip(gw, ww):
        assert_close(a, b, rtol=1e-5, atol_frac=1e-5, what="dweight")


@pytest.mark.parametrize("interleaved,rot_dim", [(False, None), (True, None), (False, 4), (True, 4)])
def test_fused_rotary_plumbing_and_conjugate_backward(twin_ops, interleaved, rot_dim):
    cos, sin = reference.rope_cos_sin(9, rot_dim or 8)
    x = torch.randn(7, 2, 3, 8).requires_grad_()
    got, (gx,) = _grads(lambda: fused.apply_rotary(x, cos, sin, interleaved, rot_dim), x)
    x.grad = None
    want, (wx,) = _grads(lambda: reference.apply_rotary(x, cos, sin, interleaved, rot_dim), x)
    # the twin is the reference op, and the conjugate rotation is autograd's backward up to fp32 ulps:
    # rtol 1e-6 (~8 ulps), floor 1e-6 * max|want| for outputs where x cos - y sin cancels
    assert_close(got, want, rtol=1e-6, atol_frac=1e-6, what="y")
    assert_close(gx, wx, rtol=1e-6, atol_frac=1e-6, what="dx")


def test_fused_ops_trace_under_torch_compile_without_graph_breaks(twin_ops):
    cos, sin = reference.rope_cos_sin(6, 8)
    w = torch.randn(8, requires_grad=True)

    def block(x):
        h = fused.rms_norm(x, w, 1e-5)
        return fused.apply_rotary(h.view(6, 2, 1, 8), cos, sin).sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 2, 8, requires_grad=True)
    compiled(x).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    block(x).backward()
    # aot_eager runs the same aten ops as eager: equal up to a few fp32 ulps (rtol 1e-6, ~8 ulps)
    assert_close(gx, x.grad, rtol=1e-6, atol_frac=1e-6, what="compiled dx")
    assert_close(gw, w.grad, rtol=1e-6, atol_frac=1e-6, what="compiled dweight")


def test_fused_rejects_bad_tables_like_the_reference(twin_ops):
    cos, sin = reference.rope_cos_sin(4, 8)
    with pytest.raises(ValueError, match="covers 4 positions"):
        fused.apply_rotary(torch.randn(6, 1, 1, 8), cos, sin)
    with pytest.raises(ValueError, match="rot_dim=6"):
        fused.apply_rotary(torch.randn(4, 1, 1, 8), cos, sin, rot_dim=6)


# ---------------------------------------------------------------- GPU: compiled kernels vs twins

RMS_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
ROT_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def cuda_fused():
    ok, why = fused.load()
    if not ok:
        pytest.fail(f"CUDA is available but the fused kernels did not load: {why}")
    return fused


def _close(a, b, tol, what):
    # rtol tol (the dtype's ulps above); the floor for elements that cancel to ~0 (dx's g - x mean(g x),
    # dweight's sum over rows, x cos - y sin) is tol of the largest value, not an absolute tol
    assert_close(a.float(), b.float(), rtol=tol, atol_frac=tol, what=what)


def _rms_case(dtype, shape, w_dtype, offset=0):
    g = torch.Generator(device="cuda").manual_seed(0)
    n = torch.Size(shape).numel()
    # offset > 0 makes x a misaligned view: the kernels must take the scalar path
    x = torch.randn(n + offset, device="cuda", generator=g).to(dtype)[offset:].view(shape).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=g)).to(w_dtype).requires_grad_()
    dy = torch.randn(shape, device="cuda", generator=g).to(dtype)
    return x, w, dy


def _run(fn, x, w, dy):
    for t in (x, w):
        if t is not None:
            t.grad = None
    y = fn()
    y.backward(dy)
    return y.detach(), x.grad, (w.grad if w is not None else None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(3, 64), (37, 96), (130, 1000), (257, 4096), (19, 16384), (5, 20000),
                                         (11, 1001), (9, 33000)])
def test_rms_norm_matches_twin(cuda_fused, dtype, rows, hidden):
    # 20000 fp32 and 33000 take the wide-row backward (separate dweight kernel); 1001 the scalar path
    x, w, dy = _rms_case(dtype, (rows, hidden), dtype)
    y, gx, gw = _run(lambda: cuda_fused.rms_norm(x, w, 1e-5), x, w, dy)
    ry, rgx, rgw = _run(lambda: reference.rms_norm(x, w, 1e-5), x, w, dy)
    assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    tol = RMS_TOL[dtype]
    _close(y, ry, tol, "y")
    _close(gx, rgx, tol, "dx")
    _close(gw, rgw, tol * max(1.0, rows ** 0.5 / 4), "dweight")  # a sum over rows: error grows with them


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                           (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("offset", [0, 1])
def test_rms_norm_mixed_weight_dtype_and_misaligned_input(cuda_fused, dtype, w_dtype, offset):
    x, w, dy = _rms_case(dtype, (2, 3, 512), w_dtype, offset)
    y, gx, gw = _run(lambda: cuda_fused.rms_norm(x, w, 1e-6), x, w, dy)
    ry, rgx, rgw = _run(lambda: reference.rms_norm(x, w, 1e-6), x, w, dy)
    assert gw.dtype == w_dtype
    tol = max(RMS_TOL[dtype], RMS_TOL[w_dtype])
    _close(y, ry, tol, "y")
    _close(gx, rgx, tol, "dx")
    _close(gw, rgw, tol, "dweight")


@pytest.mark.gpu
def test_rms_norm_without_weight_and_with_no_rows(cuda_fused):
    x, _, dy = _rms_case(torch.bfloat16, (33, 2048), torch.bfloat16)
    y, gx, _ = _run(lambda: cuda_fused.rms_norm(x, None, 1e-5), x, None, dy)
    ry, rgx, _ = _run(lambda: reference.rms_norm(x, None, 1e-5), x, None, dy)
    _close(y, ry, 2e-2, "y")
    _close(gx, rgx, 2e-2, "dx")
    x0 = torch.empty(0, 128, device="cuda", requires_grad=True)
    w0 = torch.ones(128, device="cuda", requires_grad=True)
    cuda_fused.rms_norm(x0, w0, 1e-5).sum().backward()
    assert torch.equal(w0.grad, torch.zeros_like(w0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("s,b,heads,head_dim,rot_dim", [
    (17, 2, 8, 128, 128),   # full rotary, vector path
    (33, 3, 2, 128, 64),    # GQA-sized kv heads, partial rotary
    (5, 1, 7, 64, 32),      # odd head count
    (9, 2, 3, 96, 40),      # rot_dim/2 = 20 not a vector multiple: scalar path
    (4, 2, 5, 10, 6),       # tiny odd head_dim
])
def test_rotary_matches_twin(cuda_fused, dtype, interleaved, s, b, heads, head_dim, rot_dim):
    g = torch.Generator(device="cuda").manual_seed(1)
    cos, sin = reference.rope_cos_sin(s + 3, rot_dim, device="cuda")  # longer table: the kernel must slice
    x = torch.randn(s, b, heads, head_dim, device="cuda", generator=g).to(dtype).requires_grad_()
    dy = torch.randn(s, b, heads, head_dim, device="cuda", generator=g).to(dtype)
    y, gx, _ = _run(lambda: cuda_fused.apply_rotary(x, cos, sin, interleaved, rot_dim), x, None, dy)
    ry, rgx, _ = _run(lambda: reference.apply_rotary(x, cos, sin, interleaved, rot_dim), x, None, dy)
    assert y.dtype == dtype and gx.dtype == dtype
    _close(y, ry, ROT_TOL[dtype], "y")
    _close(gx, rgx, ROT_TOL[dtype], "dx")
    assert torch.equal(y[..., rot_dim:], x.detach()[..., rot_dim:])


@pytest.mark.gpu
def test_rotary_on_a_non_contiguous_slice_and_offset_table(cuda_fused):
    qkv = torch.randn(12, 2, 3, 4, 64, device="cuda", dtype=torch.bfloat16)  # [s, b, (q,k,v), heads, d]
    k = qkv[:, :, 1]  # a strided view: the op copies it to contiguous first
    cos, sin = reference.rope_cos_sin(20, 64, device="cuda")
    got = cuda_fused.apply_rotary(k, cos[5:], sin[5:])
    _close(got, reference.apply_rotary(k, cos[5:], sin[5:]), ROT_TOL[torch.bfloat16], "y")


@pytest.mark.gpu
def test_dispatch_picks_fused_for_cuda_and_compiles(cuda_fused, monkeypatch):
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    kernels._reset_backend_choice()
    assert kernels.backend("cuda") == "fused" and kernels.backend("cpu") == "reference"
    w = torch.ones(256, device="cuda", requires_grad=True)
    cos, sin = reference.rope_cos_sin(8, 64, device="cuda")

    def block(x):
        h = kernels.rms_norm(x, w, 1e-5)
        return kernels.apply_rotary(h.view(8, 2, 4, 64), cos, sin).float().square().sum()

    x = torch.randn(8, 2, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kernels.mark_choices_constant()  # what train.compile does first
    torch.compile(block, fullgraph=True)(x).backward()
    gx = x.grad.clone()
    x.grad = None
    block(x).backward()
    _close(gx, x.grad, 2e-2, "compiled dx")
    kernels._reset_backend_choice()
