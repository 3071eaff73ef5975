"""The dense feed-forward: SwiGLU or GELU MLP, column-parallel up projection, row-parallel down, with
SwiGLU's activation as autograd functions that keep (or, under selective recompute, recompute) it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megalite.config import ModelConfig, resolved_ffn_hidden_size
from megalite.model.settings import BlockSettings
from megalite.tensor_parallel import ColumnParallelLinear, RowParallelLinear, normal_init


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
