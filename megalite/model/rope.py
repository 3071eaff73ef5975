"""Rotary frequencies of a model config, scaled as model.rope_scaling says.

The scalings are those of Hugging Face's rope_type of the same name (linear,
llama3), computed with the same fp32 operations in the same order, so an
imported Llama 3.x model rotates by the same angles to the last bit. Scaling
only changes the frequencies: the cos/sin tables and the rotation are the
plain ones (kernels.rope_cos_sin, kernels.apply_rotary), and neither type
scales the attention logits.
"""
from __future__ import annotations

import math

import torch

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


def inv_freq(cfg: ModelConfig, rot_dim: int) -> torch.Tensor:
    """fp32 [rot_dim // 2] rotary frequencies of `cfg`, after its rope_scaling."""
    base = kernels.rope_inv_freq(rot_dim, cfg.rope_theta)
    if cfg.rope_scaling == "linear":  # dividing the frequencies = dividing the positions
        return base / cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        return llama3_inv_freq(base, cfg)
    if cfg.rope_scaling != "none":
        raise ValueError(f"model.rope_scaling={cfg.rope_scaling!r} is not one of none, linear, llama3")
    return base


def rope_tables(cfg: ModelConfig, rot_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin), each [max_seq_len, rot_dim // 2], of `cfg`'s (scaled) frequencies."""
    return kernels.rope_cos_sin(cfg.max_seq_len, rot_dim, inv_freq=inv_freq(cfg, rot_dim))
