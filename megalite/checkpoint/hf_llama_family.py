"""Hugging Face architectures that are Llama's tensor map with some model fields fixed.

Each is one `LlamaRelative`: the fields it fixes, the config.json keys it adds, and what of its
config.json megalite cannot express (refused by name). The tensors go through checkpoint.hf_llama,
and the rotary settings through checkpoint.hf_rope as for Llama: rope types default, linear,
llama3, yarn (Qwen2.5's long context) and dynamic import and export alike.

- MistralForCausalLM: Llama (the same names, rotate-half rotary, GQA, SwiGLU) plus sliding-window
  attention on every layer: sliding_window <-> model.attention_window (a query at position i sees
  keys i - (window - 1) .. i in both). A window of at least max_position_embeddings masks no causal
  key of any sequence the model takes, so it imports as no window (megalite's max_seq_len is
  max_position_embeddings). Export writes Mistral for a windowed model; the weights alone cannot
  tell an unwindowed Mistral from Llama, so that one is written as Mistral only when asked
  (export_hf(arch="MistralForCausalLM")).
- Qwen2ForCausalLM (Qwen2, Qwen2.5): biases on q, k and v, none on o_proj or the MLP
  (model.qkv_bias); the bias rows take the fused [hkv, r + 2, d] order of the qkv weight rows, so
  tp shards them alike.
- Qwen3ForCausalLM: an RMSNorm over each head's q and k after the projection and before rotary
  (model.qk_norm; HF self_attn.q_norm/k_norm.weight, [head_dim]) and a head_dim that need not be
  hidden_size / heads (model.head_dim). attention_bias is refused (Qwen3's puts a bias on o_proj
  too, which megalite has not).

Qwen's sliding-window layers (use_sliding_window, max_window_layers / layer_types) are refused by
name: megalite's windowed layers are picked by model.global_attention_every, not Qwen's rule.
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
                              f"{sliding}, sliding_window={conf.get('sliding_window')!r}) is not supported: Qwen's "
                              "windowed layers follow max_window_layers, which megalite's model.attention_window "
                              "with model.global_attention_every cannot express; convert a model with "
                              "use_sliding_window=false")


def mistral_window(conf: dict) -> dict:
    """model.attention_window of a Mistral config.json: its sliding_window where that masks anything
    (shorter than max_position_embeddings), else None (the whole causal context, the same model)."""
    window, positions = conf.get("sliding_window"), conf.get("max_position_embeddings", 2048)
    return {"attention_window": window if window is not None and window < positions else None}


def refuse_mistral(conf: dict) -> None:
    hf_llama.refuse_biases(conf)


def refuse_qwen3(conf: dict) -> None:
    if conf.get("attention_bias"):
        raise CheckpointError("config.json attention_bias=True is not supported: Qwen3's puts a bias on o_proj "
                              "too, and megalite's q/k/v-only bias (model.qkv_bias) has none there")
    refuse_sliding_layers(conf)


def full_attention(cfg: ModelConfig) -> dict:
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
    free: tuple[str, ...] = ()  # Llama-fixed model fields it represents at any value (Mistral's window)
    extra_overrides: Callable[[dict], dict] = lambda conf: {}  # model fields read from its config.json

    @property
    def wanted(self) -> dict:
        """model.<field> -> the value this architecture needs."""
        return {**{k: v for k, v in hf_llama.WANTED.items() if k not in self.free}, **self.fixed}

    def mismatches(self, cfg: ModelConfig) -> dict[str, tuple]:
        """model.<field> -> (value, what this architecture needs), for every field it cannot represent."""
        return hf_llama.field_mismatches(cfg, self.wanted)

    def check(self, cfg: ModelConfig) -> None:
        """Refuse model shapes this architecture cannot represent, naming the setting."""
        hf_llama.refuse_mismatches(cfg, self.wanted, self.ARCH, self.style)

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
        fields = {**hf_llama.common_overrides(conf), **self.fixed, **self.extra_overrides(conf)}
        return [f"model.{k}={v}" for k, v in fields.items()]


MISTRAL = LlamaRelative("MistralForCausalLM", "mistral", style="Llama style with any model.attention_window on "
                        "every layer (model.global_attention_every=0)", refuse=refuse_mistral,
                        extra_config=lambda cfg: {"sliding_window": cfg.attention_window},
                        free=("attention_window",), extra_overrides=mistral_window)
QWEN2 = LlamaRelative("Qwen2ForCausalLM", "qwen2", {"qkv_bias": True},
                      "Llama style with q/k/v-only biases: model.qkv_bias=true", refuse_sliding_layers, full_attention)
QWEN3 = LlamaRelative("Qwen3ForCausalLM", "qwen3", {"qk_norm": True},
                      "Llama style with per-head q/k RMSNorm: model.qk_norm=true", refuse_qwen3,
                      lambda cfg: {"attention_bias": False, **full_attention(cfg)})
