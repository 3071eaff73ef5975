"""Hugging Face architectures that are Llama's tensor map with some model fields fixed.

Each is one `LlamaRelative`: the fields it fixes, the config.json keys it adds, and what of its
config.json megalite cannot express (refused by name). The tensors go through checkpoint.hf_llama.

- MistralForCausalLM: Llama (the same names, rotate-half rotary, GQA, SwiGLU) plus sliding-window
  attention. Imported only where the window changes nothing: sliding_window null, or at least
  max_position_embeddings, since a query at position i then sees keys back to i - (window - 1) <= 0,
  every causal key of any sequence the model takes (megalite's max_seq_len is
  max_position_embeddings). The weights alone cannot tell Mistral from Llama, so export writes
  Mistral only when asked (export_hf(arch="MistralForCausalLM")).
- Qwen2ForCausalLM (Qwen2, Qwen2.5): biases on q, k and v, none on o_proj or the MLP
  (model.qkv_bias); the bias rows take the fused [hkv, r + 2, d] order of the qkv weight rows, so
  tp shards them alike.
- Qwen3ForCausalLM: an RMSNorm over each head's q and k after the projection and before rotary
  (model.qk_norm; HF self_attn.q_norm/k_norm.weight, [head_dim]) and a head_dim that need not be
  hidden_size / heads (model.head_dim). attention_bias is refused (Qwen3's puts a bias on o_proj
  too, which megalite has not).

Sliding-window layers (Qwen's use_sliding_window / layer_types, Mistral's acting window) are
refused by name: megalite attends over the whole causal context (issue 17).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

from megalite.checkpoint import hf_llama
from megalite.checkpoint.io import CheckpointError
from megalite.config import ModelConfig


def refuse_sliding_layers(conf: dict) -> None:
    """Refuse a Qwen config.json with sliding-window layers by name."""
    sliding = [i for i, t in enumerate(conf.get("layer_types") or []) if t != "full_attention"]
    if conf.get("use_sliding_window") or sliding:
        raise CheckpointError(f"config.json use_sliding_window={conf.get('use_sliding_window')!r} (sliding layers "
                              f"{sliding}, sliding_window={conf.get('sliding_window')!r}) is not supported: megalite "
                              "has no sliding-window attention; convert a model with use_sliding_window=false")


def refuse_acting_window(conf: dict) -> None:
    """Refuse a Mistral config.json whose sliding window is shorter than its positions (it would mask)."""
    window, positions = conf.get("sliding_window"), conf.get("max_position_embeddings", 2048)
    if window is not None and window < positions:
        raise CheckpointError(f"config.json sliding_window={window!r} < max_position_embeddings={positions}: "
                              "sliding-window attention is not supported yet (issue 17); megalite attends over "
                              "the whole causal context, so only sliding_window null or >= "
                              "max_position_embeddings imports")


def refuse_mistral(conf: dict) -> None:
    refuse_acting_window(conf)
    hf_llama.refuse_biases(conf)


def refuse_qwen3(conf: dict) -> None:
    if conf.get("attention_bias"):
        raise CheckpointError("config.json attention_bias=True is not supported: Qwen3's puts a bias on o_proj "
                              "too, and megalite's q/k/v-only bias (model.qkv_bias) has none there")
    refuse_sliding_layers(conf)


def _full_attention(cfg: ModelConfig) -> dict:
    """Qwen's config.json keys for every layer attending over the whole context."""
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
            "layer_types": ["full_attention"] * cfg.num_layers}


@dataclass(frozen=True)
class LlamaRelative:
    """One HF architecture on Llama's tensor map; the interface hf.ARCHS expects of each architecture."""

    ARCH: str
    MODEL_TYPE: str
    fixed: dict = field(default_factory=dict)  # model fields beyond Llama's it fixes (import sets them)
    style: str = "Llama style"  # what those fields mean, for refusals
    refuse: Callable[[dict], None] = lambda conf: None  # config.json settings megalite cannot express
    extra_config: Callable[[ModelConfig], dict] = lambda cfg: {}  # its config.json keys beyond Llama's

    def mismatches(self, cfg: ModelConfig) -> dict[str, tuple]:
        """model.<field> -> (value, what this architecture needs), for every field it cannot represent."""
        return hf_llama.field_mismatches(cfg, {**hf_llama.WANTED, **self.fixed})

    def check(self, cfg: ModelConfig) -> None:
        """Refuse model shapes this architecture cannot represent, naming the setting."""
        hf_llama.refuse_mismatches(cfg, {**hf_llama.WANTED, **self.fixed}, self.ARCH, self.style)

    def hf_config(self, cfg: ModelConfig, bos: int | None = None, eos: int | None = None,
                  dtype: torch.dtype = torch.float32) -> dict:
        """config.json of the megalite model `cfg` (unpadded vocabulary)."""
        self.check(cfg)
        return {"architectures": [self.ARCH], "model_type": self.MODEL_TYPE,
                **hf_llama.common_config(cfg, bos, eos, dtype), **self.extra_config(cfg)}

    def to_hf(self, state: Mapping, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor view) pairs from a full, padding-stripped megalite state, tensor by tensor."""
        self.check(cfg)
        return hf_llama.tensors_to_hf(state, cfg)

    def from_hf(self, hf: Mapping, cfg: ModelConfig) -> Mapping[str, torch.Tensor]:
        """Full megalite state (unpadded vocabulary, the files' dtype) from the HF tensors, each made when asked for."""
        self.check(cfg)
        return hf_llama.tensors_from_hf(hf, cfg)

    def model_overrides(self, conf: dict) -> list[str]:
        """megalite model.* overrides equal to a HF config.json; refuses what megalite cannot build."""
        self.refuse(conf)
        return [f"model.{k}={v}" for k, v in {**hf_llama.common_overrides(conf), **self.fixed}.items()]


MISTRAL = LlamaRelative("MistralForCausalLM", "mistral", refuse=refuse_mistral,
                        extra_config=lambda cfg: {"sliding_window": None})
QWEN2 = LlamaRelative("Qwen2ForCausalLM", "qwen2", {"qkv_bias": True},
                      "Llama style with q/k/v-only biases: model.qkv_bias=true", refuse_sliding_layers, _full_attention)
QWEN3 = LlamaRelative("Qwen3ForCausalLM", "qwen3", {"qk_norm": True},
                      "Llama style with per-head q/k RMSNorm: model.qk_norm=true", refuse_qwen3,
                      lambda cfg: {"attention_bias": False, **_full_attention(cfg)})
