"""Hugging Face Qwen3ForCausalLM <-> megalite weights.

Qwen3 is Llama with an RMSNorm over each head's q and k after the projection and
before rotary (megalite's model.qk_norm; HF self_attn.q_norm/k_norm.weight, [head_dim])
and a head_dim that need not be hidden_size / heads (model.head_dim). The other
tensors are Llama's (checkpoint.hf_llama). Refused by name: attention_bias (Qwen3's
puts biases on o_proj too, which megalite has not) and sliding-window attention.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch

from megalite.checkpoint import hf_llama
from megalite.checkpoint.hf_llama import common_config, common_overrides, field_mismatches, refuse_mismatches
from megalite.checkpoint.hf_qwen2 import refuse_sliding_window
from megalite.checkpoint.io import CheckpointError
from megalite.config import ModelConfig

ARCH, MODEL_TYPE = "Qwen3ForCausalLM", "qwen3"
WANTED = {**hf_llama.WANTED, "qk_norm": True}


def mismatches(cfg: ModelConfig) -> dict[str, tuple]:
    """model.<field> -> (value, what Qwen3ForCausalLM needs), for every field it cannot represent."""
    return field_mismatches(cfg, WANTED)


def check(cfg: ModelConfig) -> None:
    """Refuse model shapes that Qwen3ForCausalLM cannot represent, naming the setting."""
    refuse_mismatches(cfg, WANTED, ARCH, "Llama style with per-head q/k RMSNorm: model.qk_norm=true")


def hf_config(cfg: ModelConfig, bos: int | None = None, eos: int | None = None,
              dtype: torch.dtype = torch.float32) -> dict:
    """config.json for Qwen3ForCausalLM of the megalite model `cfg` (unpadded vocabulary)."""
    check(cfg)
    return {"architectures": [ARCH], "model_type": MODEL_TYPE, **common_config(cfg, bos, eos, dtype),
            "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": cfg.num_layers, "layer_types": ["full_attention"] * cfg.num_layers}


def to_hf(state: Mapping, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor view) pairs from a full, padding-stripped megalite state, tensor by tensor."""
    check(cfg)
    return hf_llama.tensors_to_hf(state, cfg)


def from_hf(hf: Mapping, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full megalite state (unpadded vocabulary, fp32) from HF Qwen3 tensors; names every missing one."""
    check(cfg)
    return hf_llama.tensors_from_hf(hf, cfg)


def model_overrides(conf: dict) -> list[str]:
    """megalite model.* overrides equal to a HF Qwen3 config.json; refuses what megalite cannot build."""
    if conf.get("attention_bias"):
        raise CheckpointError("config.json attention_bias=True is not supported: Qwen3's puts a bias on o_proj "
                              "too, and megalite's q/k/v-only bias (model.qkv_bias) has none there")
    refuse_sliding_window(conf)
    return [f"model.{k}={v}" for k, v in {**common_overrides(conf), "qk_norm": True}.items()]
