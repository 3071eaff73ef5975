"""Pure-PyTorch twins of the fused kernels: the CPU path and the test oracle.

Every function computes in fp32 and casts the result back to the input's
dtype, which is what the fused CUDA kernels do too, so the two can be
compared at any precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, last dim) + eps) * weight, in fp32, returned in x's dtype.

    A 16-bit x goes through `_LowPrecisionRMSNorm`, which keeps x itself and the fp32 1/rms for
    backward (2 + 4/h bytes per element) instead of autograd's two fp32 copies (8 bytes); fp32 x
    keeps plain autograd, whose graph saves x itself and is bitwise what it always was.
    """
    if x.dtype != torch.float32:
        return _LowPrecisionRMSNorm.apply(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class _LowPrecisionRMSNorm(torch.autograd.Function):
    """RMSNorm of a 16-bit x with fp32 math, saving x (16-bit) and 1/rms (fp32) only."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # [..., 1]
        y = xf * rstd
        if weight is not None:
            y = y * weight.float()
        ctx.save_for_backward(x, rstd, weight)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.float() * rstd  # recomputed: cheaper to redo than to keep in fp32
        g = dy.float() if weight is None else dy.float() * weight.float()
        dx = rstd * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
        dw = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (dy.float() * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dw, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in fp32, returned in x's dtype (16-bit x: see `_LowPrecisionLayerNorm`)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    if x.dtype != torch.float32:
        return _LowPrecisionLayerNorm.apply(x, w, b, eps)
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


class _LowPrecisionLayerNorm(torch.autograd.Function):
    """LayerNorm of a 16-bit x with fp32 math, saving x (16-bit), mean and 1/std (fp32) only;
    backward is ATen's own LayerNorm backward on x upcast again."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = (x.shape[-1],)
        y, mean, rstd = torch.native_layer_norm(x.float(), shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(dy.float(), x.float(), (x.shape[-1],), mean, rstd,
                                                               weight, bias, mask)
        return (None if dx is None else dx.to(x.dtype)), dw, db, None


def rope_inv_freq(rot_dim: int, theta: float = 10000.0, device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 [rot_dim // 2]: frequency i is theta^(-2i/rot_dim), as in RoFormer/Llama."""
    if rot_dim <= 0 or rot_dim % 2:
        raise ValueError(f"rotary dim {rot_dim} must be a positive even number")
    return 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim)


def rope_cos_sin(seq_len: int, rot_dim: int, theta: float = 10000.0, device: torch.device | str | None = None,
                 inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) tables, each [seq_len, rot_dim // 2], for positions 0..seq_len-1.

    The frequencies are `rope_inv_freq(rot_dim, theta)` unless `inv_freq` ([rot_dim // 2], e.g.
    scaled ones: model.rope) is given.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if inv_freq is None:
        inv_freq = rope_inv_freq(rot_dim, theta, device)
    elif list(inv_freq.shape) != [rot_dim // 2]:
        raise ValueError(f"inv_freq has shape {list(inv_freq.shape)}, expected [{rot_dim // 2}]")
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)  # [s, rot/2]
    return angles.cos(), angles.sin()


def rotary_dim(x: torch.Tensor, cos: torch.Tensor, rot_dim: int | None) -> int:
    """The rotated width (default: all that cos/sin cover), checked against x and the table."""
    s, half = x.shape[0], cos.shape[-1]
    rot_dim = 2 * half if rot_dim is None else rot_dim
    if rot_dim != 2 * half or rot_dim > x.shape[-1]:
        raise ValueError(f"rot_dim={rot_dim} needs cos/sin of width {rot_dim // 2} (got {half}) and at most "
                         f"head_dim={x.shape[-1]} features")
    if cos.shape[0] < s:
        raise ValueError(f"rotary table covers {cos.shape[0]} positions but the sequence has {s}; "
                         "raise max_seq_len")
    return rot_dim


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                 rot_dim: int | None = None) -> torch.Tensor:
    """Rotate the first `rot_dim` features of every head of x [s, b, heads, head_dim].

    cos/sin come from `rope_cos_sin` ([>= s, rot_dim/2]; the first s rows are
    used, slice them yourself for an offset). Pairs are (i, i + rot_dim/2)
    for rotate-half (Llama, GPT-NeoX) or (2i, 2i+1) when `interleaved`
    (GPT-J). Features past rot_dim pass through unchanged (partial rotary).
    """
    s = x.shape[0]
    rot_dim = rotary_dim(x, cos, rot_dim)
    c = cos[:s, None, None, :]  # [s, 1, 1, rot/2], broadcasts over batch and heads
    sn = sin[:s, None, None, :]
    if torch.is_grad_enabled() and x.requires_grad and not (cos.requires_grad or sin.requires_grad):
        return _Rotary.apply(x, c, sn, interleaved, rot_dim)
    return _rotate(x, c, sn, interleaved, rot_dim)


def _rotate(x: torch.Tensor, c: torch.Tensor, sn: torch.Tensor, interleaved: bool, rot_dim: int) -> torch.Tensor:
    """Each pair (x1, x2) of the first rot_dim features -> (x1 c - x2 sn, x2 c + x1 sn), in fp32."""
    xr, rest = x[..., :rot_dim].float(), x[..., rot_dim:]
    x1, x2 = _pairs(xr, interleaved)  # [s, b, heads, rot/2] each
    if torch.compiler.is_compiling():  # Inductor fuses the whole expression (out= views break its graph)
        a, b = x1 * c - x2 * sn, x2 * c + x1 * sn
        out = torch.stack((a, b), dim=-1).flatten(-2) if interleaved else torch.cat((a, b), dim=-1)
    else:  # eager: written in place, no concatenation pass (the same products, the same bits)
        out = torch.empty(xr.shape, dtype=torch.float32, device=x.device)
        o1, o2 = _pairs(out, interleaved)
        torch.sub(x1 * c, x2 * sn, out=o1)
        torch.add(x2 * c, x1 * sn, out=o2)
    out = out.to(x.dtype)
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def _pairs(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of each rotated pair: features (2i, 2i+1) if interleaved, else (i, i + rot/2)."""
    return (t[..., 0::2], t[..., 1::2]) if interleaved else t.chunk(2, dim=-1)


class _Rotary(torch.autograd.Function):
    """Rotary embedding whose backward is the inverse rotation (the same pairs turned by -theta):
    nothing is saved but the tables, and the gradient costs one pass instead of autograd's slice,
    concatenation and zero-filled buffers. Bitwise what autograd computes: each input-gradient
    element is the same two products summed (g1 c + g2 sn, g2 c - g1 sn)."""

    @staticmethod
    def forward(ctx, x, c, sn, interleaved, rot_dim):
        ctx.save_for_backward(c, sn)  # views of the model's tables: no activation bytes
        ctx.interleaved, ctx.rot_dim = interleaved, rot_dim
        return _rotate(x, c, sn, interleaved, rot_dim)

    @staticmethod
    def backward(ctx, grad):
        c, sn = ctx.saved_tensors
        return _rotate(grad, c, -sn, ctx.interleaved, ctx.rot_dim), None, None, None, None
