"""Hugging Face MistralForCausalLM <-> megalite weights.

Mistral is Llama (the same tensor names, rotate-half rotary, GQA, SwiGLU; checkpoint.hf_llama)
plus sliding-window attention. Imported only where the window changes nothing: sliding_window
null, or at least max_position_embeddings, since a query at position i then sees keys back to
i - (window - 1) <= 0, every causal key of any sequence the model takes (megalite's max_seq_len is
max_position_embeddings). A real window is refused by name. The weights alone cannot tell Mistral
from Llama, so export writes Mistral only when asked (export_hf(arch="MistralForCausalLM")).
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch

from megalite.checkpoint import hf_llama
from megalite.checkpoint.hf_llama import common_config, field_mismatches
from megalite.checkpoint.io import CheckpointError
from megalite.config import ModelConfig

ARCH, MODEL_TYPE = "MistralForCausalLM", "mistral"
WANTED = hf_llama.WANTED


def mismatches(cfg: ModelConfig) -> dict[str, tuple]:
    """model.<field> -> (value, what MistralForCausalLM needs), for every field it cannot represent."""
    return field_mismatches(cfg, WANTED)


def check(cfg: ModelConfig) -> None:
    """Refuse model shapes that MistralForCausalLM cannot represent, naming the setting."""
    hf_llama.refuse_mismatches(cfg, WANTED, ARCH, "Llama style")


def hf_config(cfg: ModelConfig, bos: int | None = None, eos: int | None = None,
              dtype: torch.dtype = torch.float32) -> dict:
    """config.json for MistralForCausalLM of the megalite model `cfg`: full causal attention (no window)."""
    check(cfg)
    return {"architectures": [ARCH], "model_type": MODEL_TYPE, **common_config(cfg, bos, eos, dtype),
            "sliding_window": None}


def to_hf(state: Mapping, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor view) pairs from a full, padding-stripped megalite state, tensor by tensor."""
    check(cfg)
    return hf_llama.tensors_to_hf(state, cfg)


def from_hf(hf: Mapping, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full megalite state (unpadded vocabulary, fp32) from HF Mistral tensors; names every missing one."""
    check(cfg)
    return hf_llama.tensors_from_hf(hf, cfg)


def model_overrides(conf: dict) -> list[str]:
    """megalite model.* overrides equal to a HF Mistral config.json; refuses a sliding window that acts."""
    window, positions = conf.get("sliding_window"), conf.get("max_position_embeddings", 2048)
    if window is not None and window < positions:
        raise CheckpointError(f"config.json sliding_window={window!r} < max_position_embeddings={positions}: "
                              "sliding-window attention is not supported yet (issue 17); megalite attends over "
                              "the whole causal context, so only sliding_window null or >= "
                              "max_position_embeddings imports")
    return hf_llama.model_overrides(conf)
