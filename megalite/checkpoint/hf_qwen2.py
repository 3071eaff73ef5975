"""Hugging Face Qwen2ForCausalLM (Qwen2, Qwen2.5) <-> megalite weights.

Qwen2 is Llama with biases on q, k and v (none on o_proj or the MLP): megalite's
model.qkv_bias. The tensor names are Llama's plus q_proj/k_proj/v_proj.bias, and
the bias rows take the fused [hkv, r + 2, d] order of the qkv weight rows
(checkpoint.hf_llama), so tp shards them alike. Sliding-window attention
(use_sliding_window, a 'sliding_attention' layer) is refused by name: megalite
attends over the whole causal context.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch

from megalite.checkpoint import hf_llama
from megalite.checkpoint.hf_llama import common_config, common_overrides, field_mismatches, refuse_mismatches
from megalite.checkpoint.io import CheckpointError
from megalite.config import ModelConfig

ARCH, MODEL_TYPE = "Qwen2ForCausalLM", "qwen2"
WANTED = {**hf_llama.WANTED, "qkv_bias": True}


def mismatches(cfg: ModelConfig) -> dict[str, tuple]:
    """model.<field> -> (value, what Qwen2ForCausalLM needs), for every field it cannot represent."""
    return field_mismatches(cfg, WANTED)


def check(cfg: ModelConfig) -> None:
    """Refuse model shapes that Qwen2ForCausalLM cannot represent, naming the setting."""
    refuse_mismatches(cfg, WANTED, ARCH, "Llama style with q/k/v-only biases: model.qkv_bias=true")


def hf_config(cfg: ModelConfig, bos: int | None = None, eos: int | None = None,
              dtype: torch.dtype = torch.float32) -> dict:
    """config.json for Qwen2ForCausalLM of the megalite model `cfg` (unpadded vocabulary)."""
    check(cfg)
    return {"architectures": [ARCH], "model_type": MODEL_TYPE, **common_config(cfg, bos, eos, dtype),
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
            "layer_types": ["full_attention"] * cfg.num_layers}


def to_hf(state: Mapping, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor view) pairs from a full, padding-stripped megalite state, tensor by tensor."""
    check(cfg)
    return hf_llama.tensors_to_hf(state, cfg)


def from_hf(hf: Mapping, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full megalite state (unpadded vocabulary, fp32) from HF Qwen2 tensors; names every missing one."""
    check(cfg)
    return hf_llama.tensors_from_hf(hf, cfg)


def refuse_sliding_window(conf: dict) -> None:
    """Refuse a config.json with sliding-window layers by name (Qwen2, Qwen3, Mistral)."""
    sliding = [i for i, t in enumerate(conf.get("layer_types") or []) if t != "full_attention"]
    if conf.get("use_sliding_window") or sliding:
        raise CheckpointError(f"config.json use_sliding_window={conf.get('use_sliding_window')!r} (sliding layers "
                              f"{sliding}, sliding_window={conf.get('sliding_window')!r}) is not supported: megalite "
                              "has no sliding-window attention; convert a model with use_sliding_window=false")


def model_overrides(conf: dict) -> list[str]:
    """megalite model.* overrides equal to a HF Qwen2 config.json; refuses sliding-window attention by name."""
    refuse_sliding_window(conf)
    return [f"model.{k}={v}" for k, v in {**common_overrides(conf), "qkv_bias": True}.items()]
