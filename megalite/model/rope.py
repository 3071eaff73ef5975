"""Rotary frequencies and tables of a model config, scaled as model.rope_scaling says.

The scalings are those of Hugging Face's rope_type of the same name (linear, llama3, yarn,
dynamic), computed with the same fp32 operations in the same order, so an imported model
rotates by the same angles to the last bit. The rotation itself is the plain one
(kernels.rope_cos_sin, kernels.apply_rotary) on these tables:

- linear, llama3: only the frequencies change.
- yarn: the frequencies blend interpolated (/ factor) and original ones over a ramp of
  dimensions, and cos and sin are both multiplied by the attention factor (YaRN's mscale,
  transformers' attention_scaling), which scales every q.k logit by its square. Every rank
  holds the whole tables, so tensor, sequence and pipeline parallelism need nothing more.
- dynamic (dynamic NTK): the frequencies depend on the length of the forward. Up to
  rope_original_max_seq_len positions they are the plain ones; a forward over more positions
  (a whole sequence, or a KV-cache step whose cache plus new tokens exceed it) uses rope_theta
  rescaled for that length; `RotaryTables(length)` makes those tables for the forward.
  transformers keeps the frequencies of the longest length seen until a sequence within the
  original length resets them; megalite computes each forward's own (equal for a fresh model
  and for growing lengths, as in generation).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megalite import kernels
from megalite.config import ModelConfig


def llama3_inv_freq(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths divided by the factor, short ones kept, a smooth ramp between."""
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    context = cfg.rope_original_max_seq_len or cfg.max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    ramp = (context / wavelen - low) / (high - low)  # 0 at the long end of the band, 1 at the short end
    smoothed = (1 - ramp) * scaled / factor + ramp * scaled
    in_band = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(in_band, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(cfg: ModelConfig) -> float:
    """The multiplier of YaRN's cos and sin: model.rope_attention_factor, else derived from the factor
    (the ratio of the mscale and mscale_all_dim temperatures when both are set and non-zero)."""
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    factor = cfg.rope_scaling_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:  # DeepSeek style
        return float(_yarn_mscale(factor, cfg.rope_mscale) / _yarn_mscale(factor, cfg.rope_mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_dim(rotations: float, rot_dim: int, theta: float, context: int) -> float:
    """The (fractional) dimension index whose wavelength turns `rotations` times over `context` positions."""
    return (rot_dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(theta))


def yarn_inv_freq(cfg: ModelConfig, rot_dim: int) -> torch.Tensor:
    """YaRN: dimensions turning more than beta_fast times over the original context keep their frequency,
    fewer than beta_slow times are interpolated (/ factor), a linear ramp over the dimensions between."""
    theta, factor = cfg.rope_theta, cfg.rope_scaling_factor
    context = cfg.rope_original_max_seq_len or cfg.max_seq_len
    powers = theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)  # theta^(2i/d)
    kept, interpolated = 1.0 / powers, 1.0 / (factor * powers)
    low, high = _yarn_dim(cfg.rope_beta_fast, rot_dim, theta, context), _yarn_dim(cfg.rope_beta_slow, rot_dim, theta,
                                                                                    context)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = torch.clamp((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 below dimension `low` (fast turns), 0 above `high`
    return interpolated * (1 - keep) + kept * keep


def dynamic_inv_freq(cfg: ModelConfig, rot_dim: int, seq_len: int | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Dynamic NTK: the frequencies of a forward over `seq_len` positions (None: one within the original
    length). Beyond rope_original_max_seq_len = L, theta becomes
    theta * (factor * seq_len / L - (factor - 1)) ^ (d / (d - 2)); within it, the plain frequencies."""
    context, factor = cfg.rope_original_max_seq_len or cfg.max_seq_len, cfg.rope_scaling_factor
    exponent = rot_dim / (rot_dim - 2)
    if seq_len is None or seq_len <= context:  # transformers' init: Python floats at seq_len = L
        theta = cfg.rope_theta * ((factor * context / context) - (factor - 1)) ** exponent
    else:  # transformers' forward: seq_len is an int64 tensor, so this runs in fp32 tensor ops
        length = torch.tensor(seq_len, dtype=torch.int64, device=device)
        theta = cfg.rope_theta * ((factor * length / context) - (factor - 1)) ** exponent
    return 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64, device=device).float() / rot_dim))


def inv_freq(cfg: ModelConfig, rot_dim: int, seq_len: int | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 [rot_dim // 2] rotary frequencies of `cfg`, after its rope_scaling (dynamic: of a forward
    over `seq_len` positions; None means one within the original length)."""
    base = kernels.rope_inv_freq(rot_dim, cfg.rope_theta)
    if cfg.rope_scaling == "linear":  # dividing the frequencies = dividing the positions
        return base / cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        return llama3_inv_freq(base, cfg)
    if cfg.rope_scaling == "yarn":
        return yarn_inv_freq(cfg, rot_dim)
    if cfg.rope_scaling == "dynamic":
        return dynamic_inv_freq(cfg, rot_dim, seq_len, device)
    if cfg.rope_scaling != "none":
        raise ValueError(f"model.rope_scaling={cfg.rope_scaling!r} is not one of none, linear, llama3, yarn, dynamic")
    return base


def attention_factor(cfg: ModelConfig) -> float:
    """The multiplier of cos and sin (transformers' attention_scaling): YaRN's, 1 for the other types."""
    return yarn_attention_factor(cfg) if cfg.rope_scaling == "yarn" else 1.0


def dynamic_from(cfg: ModelConfig) -> int | None:
    """Forwards over more positions than this need their own tables (rope_tables(cfg, d, length));
    None when the tables do not depend on the length (every type but dynamic)."""
    return (cfg.rope_original_max_seq_len or cfg.max_seq_len) if cfg.rope_scaling == "dynamic" else None


def rope_tables(cfg: ModelConfig, rot_dim: int, seq_len: int | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin), each [seq_len or max_seq_len, rot_dim // 2], of `cfg`'s (scaled) frequencies, times
    the attention factor (yarn). Dynamic: the tables of a forward over `seq_len` positions (None: over at
    most the original length, i.e. the plain frequencies)."""
    freqs = inv_freq(cfg, rot_dim, seq_len, device).to(device)
    cos, sin = kernels.rope_cos_sin(seq_len or cfg.max_seq_len, rot_dim, device=device, inv_freq=freqs)
    scale = attention_factor(cfg)
    if scale != 1.0:  # as transformers: cos() * attention_scaling, sin() * attention_scaling in fp32
        cos, sin = cos * scale, sin * scale
    return cos, sin


class RotaryTables(nn.Module):
    """The cos/sin tables of one model's attention layers, held once and shared by every layer.

    Each layer holding its own [max_seq_len, head_dim / 2] fp32 pair would cost, for Llama 3.1 8B's
    131072 positions, 64 MiB per layer, 2 GiB per rank; one module shared as a child of every
    Attention holds them once (Module.to converts it once; named_buffers lists it once). The
    buffers are not checkpointed: they derive from the config.
    """

    def __init__(self, cfg: ModelConfig, rot_dim: int):
        super().__init__()
        cos, sin = rope_tables(cfg, rot_dim)  # model.rope_scaling applied
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.cfg, self.rot_dim, self.dynamic_from = cfg, rot_dim, dynamic_from(cfg)

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for a forward over positions 0 .. length-1: the stored tables, except with dynamic NTK
        beyond the original length, which rotates by that length's own frequencies (as transformers)."""
        if self.dynamic_from is None or length <= self.dynamic_from or length > self.cos.shape[0]:
            return self.cos, self.sin  # (past max_seq_len, apply_rotary refuses the length)
        cos, sin = rope_tables(self.cfg, self.rot_dim, length, device=self.cos.device)
        return cos.to(self.cos.dtype), sin.to(self.sin.dtype)
