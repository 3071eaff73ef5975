"""Hugging Face LlamaForCausalLM <-> megalite weights: the name map and the fused-layout conversions.

megalite (model/blocks.py)              Hugging Face LlamaForCausalLM
  blocks.0.word.weight [Vp, h]            model.embed_tokens.weight [V, h] (padding rows dropped)
  blocks.i.norm1.weight                   model.layers.{i-1}.input_layernorm.weight
  blocks.i.attn.qkv.weight                q_proj / k_proj / v_proj: rows viewed as [hkv, r + 2, d, h]
                                          (per kv group: its r q heads, then k, then v)
  blocks.i.attn.qkv.bias                  q_proj / k_proj / v_proj.bias, same [hkv, r + 2, d] order (Qwen2)
  blocks.i.attn.q_norm/k_norm.weight      self_attn.q_norm / k_norm.weight [d] (Qwen3)
  blocks.i.attn.proj.weight               o_proj
  blocks.i.norm2.weight                   post_attention_layernorm
  blocks.i.mlp.fc1.weight [2f, h]         gate_proj / up_proj: rows alternate gate_j, up_j
  blocks.i.mlp.fc2.weight                 down_proj
  blocks.L+1.norm.weight                  model.norm.weight
  blocks.L+1.output.weight (or .weight)   lm_head.weight (absent when tied)
  (an MoE layer's router and experts: checkpoint.hf_moe, through the `mlp` hooks of tensors_to/from_hf)

Both use rotate-half rotary over the same head-major q/k rows (kernels.reference
pairs features i and i + d/2, as HF's rotate_half does), so no per-head
permutation is needed; the logit-parity tests prove it. Query head j uses kv
head j // r in both. Mistral, Qwen2 and Qwen3 (checkpoint.hf_llama_family) are this map
plus the bias or q/k norm rows; d is model.head_dim (config.head_dim), which need
not be h / hq.

`to_hf` asks its `state` mapping for one megalite tensor at a time, right
before yielding the HF tensors made from it, so over a lazy mapping
(checkpoint.reader) only one megalite tensor is held by the converter.
`from_hf` is lazy the other way: a LazyState whose every tensor is made from
its own HF tensors when asked for.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Mapping

import torch

from megalite.checkpoint.hf_files import LazyState
from megalite.checkpoint.hf_rope import hf_rope_fields, rope_overrides
from megalite.checkpoint.io import CheckpointError
from megalite.config import ModelConfig, head_dim
from megalite.config import resolved_ffn_hidden_size as ffn_size

ARCH, MODEL_TYPE = "LlamaForCausalLM", "llama"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
WANTED = {"norm": "rmsnorm", "position": "rope", "activation": "swiglu", "bias": False, "qkv_bias": False,
          "qk_norm": False, "dropout": 0.0, "attention_window": None, "global_attention_every": 0,
          "moe_num_experts": 0}  # MoE models: checkpoint.hf_moe


def field_mismatches(cfg: ModelConfig, wanted: Mapping) -> dict[str, tuple]:
    """model.<field> -> (value, wanted value), for every field of `wanted` that cfg sets otherwise."""
    return {k: (getattr(cfg, k), v) for k, v in wanted.items() if getattr(cfg, k) != v}


def refuse_mismatches(cfg: ModelConfig, wanted: Mapping, arch: str, style: str) -> None:
    """Raise naming the first model.<field> that `arch` cannot represent (`style` says what it needs)."""
    for key, (value, want) in field_mismatches(cfg, wanted).items():
        raise CheckpointError(f"model.{key}={value!r}: {arch} needs model.{key}={want!r} ({style})")


def mismatches(cfg: ModelConfig) -> dict[str, tuple]:
    """model.<field> -> (value, what LlamaForCausalLM needs), for every field it cannot represent."""
    return field_mismatches(cfg, WANTED)


def check(cfg: ModelConfig) -> None:
    """Refuse model shapes that LlamaForCausalLM cannot represent, naming the setting."""
    refuse_mismatches(cfg, WANTED, ARCH, "Llama style: rmsnorm, rope, swiglu, no bias, no dropout")


def hf_config(cfg: ModelConfig, bos: int | None = None, eos: int | None = None,
              dtype: torch.dtype = torch.float32) -> dict:
    """config.json for LlamaForCausalLM of the megalite model `cfg` (unpadded vocabulary)."""
    check(cfg)
    return {"architectures": [ARCH], "model_type": MODEL_TYPE, **common_config(cfg, bos, eos, dtype),
            "attention_bias": False, "mlp_bias": False}


def common_config(cfg: ModelConfig, bos: int | None, eos: int | None, dtype: torch.dtype) -> dict:
    """The config.json keys that Llama-style architectures (Llama, Qwen2, Qwen3) share."""
    return {"hidden_size": cfg.hidden_size, "intermediate_size": ffn_size(cfg), "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads, "num_hidden_layers": cfg.num_layers,
            "head_dim": head_dim(cfg), "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            **hf_rope_fields(cfg), "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_dropout": 0.0,
            "initializer_range": cfg.init_std, "bos_token_id": bos, "eos_token_id": eos,
            "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype]}


def need(state: Mapping, name: str, shape: list[int]) -> torch.Tensor:
    """state[name], refusing a missing tensor or one of the wrong shape by name."""
    if name not in state:
        raise CheckpointError(f"tensor '{name}' is missing from the checkpoint")
    t = state[name]
    if list(t.shape) != list(shape):
        raise CheckpointError(f"tensor '{name}' has shape {list(t.shape)}, expected {list(shape)} for this config")
    return t


def to_hf(state: Mapping, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor view) pairs from a full, padding-stripped megalite state, tensor by tensor."""
    check(cfg)
    return tensors_to_hf(state, cfg)


def interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate and up [..., f, h] -> megalite's fused fc1 [..., 2f, h], rows alternating gate_j, up_j."""
    return torch.stack((gate, up), dim=-2).flatten(-3, -2)


def deinterleave(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """megalite's fused fc1 [..., 2f, h] -> (gate, up) views [..., f, h]: its even and odd rows."""
    pairs = fc1.unflatten(-2, (-1, 2))  # [..., f, 2, h]: rows (gate_j, up_j)
    return pairs[..., 0, :], pairs[..., 1, :]


# a layer's feed-forward: (state, cfg, layer 1..L, megalite prefix, HF prefix) -> its tensors
MLPToHF = Callable[[Mapping, ModelConfig, int, str, str], Iterator[tuple[str, torch.Tensor]]]
MLPFromHF = Callable[[Mapping, ModelConfig, int, str, str], dict]


def dense_mlp_to_hf(state: Mapping, cfg: ModelConfig, layer: int, p: str, o: str
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The dense SwiGLU MLP's HF tensors (gate_proj, up_proj, down_proj) of one layer."""
    h, f = cfg.hidden_size, ffn_size(cfg)
    gate, up = deinterleave(need(state, p + "mlp.fc1.weight", [2 * f, h]))
    yield o + "mlp.gate_proj.weight", gate
    yield o + "mlp.up_proj.weight", up
    del gate, up  # let a lazily read tensor go before the next one is read
    yield o + "mlp.down_proj.weight", need(state, p + "mlp.fc2.weight", [h, f])


def tensors_to_hf(state: Mapping, cfg: ModelConfig, mlp: MLPToHF = dense_mlp_to_hf
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """to_hf without the architecture check (Qwen2 and Qwen3 add q/k/v biases or q/k norms; the MoE
    architectures give their own `mlp`)."""
    h, hq, L = cfg.hidden_size, cfg.num_heads, cfg.num_layers
    hkv, d = cfg.num_kv_heads or hq, head_dim(cfg)
    r = hq // hkv
    yield "model.embed_tokens.weight", need(state, "blocks.0.word.weight", [cfg.vocab_size, h])
    for i in range(1, L + 1):
        p, o = f"blocks.{i}.", f"model.layers.{i - 1}."
        yield o + "input_layernorm.weight", need(state, p + "norm1.weight", [h])
        qkv = need(state, p + "attn.qkv.weight", [(hq + 2 * hkv) * d, h]).view(hkv, r + 2, d, h)
        yield o + "self_attn.q_proj.weight", qkv[:, :r].reshape(hq * d, h)  # [hkv, r, d, h] -> [hq*d, h]
        yield o + "self_attn.k_proj.weight", qkv[:, r].reshape(hkv * d, h)
        yield o + "self_attn.v_proj.weight", qkv[:, r + 1].reshape(hkv * d, h)
        del qkv  # let a lazily read tensor go before the next one is read
        if cfg.qkv_bias:  # bias rows follow the weight rows: [hkv, r + 2, d]
            bias = need(state, p + "attn.qkv.bias", [(hq + 2 * hkv) * d]).view(hkv, r + 2, d)
            yield o + "self_attn.q_proj.bias", bias[:, :r].reshape(hq * d)
            yield o + "self_attn.k_proj.bias", bias[:, r].reshape(hkv * d)
            yield o + "self_attn.v_proj.bias", bias[:, r + 1].reshape(hkv * d)
            del bias
        if cfg.qk_norm:
            yield o + "self_attn.q_norm.weight", need(state, p + "attn.q_norm.weight", [d])
            yield o + "self_attn.k_norm.weight", need(state, p + "attn.k_norm.weight", [d])
        yield o + "self_attn.o_proj.weight", need(state, p + "attn.proj.weight", [h, hq * d])
        yield o + "post_attention_layernorm.weight", need(state, p + "norm2.weight", [h])
        yield from mlp(state, cfg, i, p, o)
    yield "model.norm.weight", need(state, f"blocks.{L + 1}.norm.weight", [h])
    if not cfg.tie_embeddings:
        yield "lm_head.weight", need(state, f"blocks.{L + 1}.output.weight", [cfg.vocab_size, h])


def from_hf(hf: Mapping, cfg: ModelConfig) -> LazyState:
    """Full megalite state (unpadded vocabulary, in the files' dtype) from HF Llama tensors, each made when
    asked for (checkpoint.hf_files.LazyState; the import casts each shard to fp32)."""
    check(cfg)
    return tensors_from_hf(hf, cfg)


def _qkv_rows(hf: Mapping, o: str, suffix: str, hq: int, hkv: int, trailing: list[int]) -> torch.Tensor:
    """q/k/v_proj.<suffix> fused into megalite's rows: per kv group its r q heads, then k, then v."""
    r = hq // hkv
    q = need(hf, f"{o}self_attn.q_proj.{suffix}", [hq * trailing[0], *trailing[1:]])
    k, v = (need(hf, f"{o}self_attn.{n}_proj.{suffix}", [hkv * trailing[0], *trailing[1:]]) for n in "kv")
    parts = (q.view(hkv, r, *trailing), k.view(hkv, 1, *trailing), v.view(hkv, 1, *trailing))
    return torch.cat(parts, dim=1).reshape(-1, *trailing[1:])  # -> [(hq + 2hkv) d, ...]


def _interleaved_fc1(hf: Mapping, o: str, f: int, h: int) -> torch.Tensor:
    return interleave(need(hf, o + "mlp.gate_proj.weight", [f, h]), need(hf, o + "mlp.up_proj.weight", [f, h]))


def dense_mlp_from_hf(hf: Mapping, cfg: ModelConfig, layer: int, p: str, o: str) -> dict:
    """Recipes of the dense SwiGLU MLP's megalite tensors (fc1, fc2) of one layer."""
    h, f = cfg.hidden_size, ffn_size(cfg)
    return {p + "mlp.fc1.weight": partial(_interleaved_fc1, hf, o, f, h),
            p + "mlp.fc2.weight": partial(need, hf, o + "mlp.down_proj.weight", [h, f])}


def tensors_from_hf(hf: Mapping, cfg: ModelConfig, mlp: MLPFromHF = dense_mlp_from_hf) -> LazyState:
    """from_hf without the architecture check (Qwen2 and Qwen3 add q/k/v biases or q/k norms; the MoE
    architectures give their own `mlp`).

    Each megalite tensor is a recipe over only the HF tensors it is made of, so an import holds
    one of them at a time (checkpoint.hf.import_hf)."""
    h, hq, L = cfg.hidden_size, cfg.num_heads, cfg.num_layers
    hkv, d, V = cfg.num_kv_heads or hq, head_dim(cfg), cfg.vocab_size
    read = lambda name, shape: partial(need, hf, name, shape)  # noqa: E731
    out = {"blocks.0.word.weight": read("model.embed_tokens.weight", [V, h])}
    for i in range(1, L + 1):
        p, o = f"blocks.{i}.", f"model.layers.{i - 1}."
        out[p + "norm1.weight"] = read(o + "input_layernorm.weight", [h])
        out[p + "attn.qkv.weight"] = partial(_qkv_rows, hf, o, "weight", hq, hkv, [d, h])
        if cfg.qkv_bias:  # the same [hkv, r + 2, d] order as the weight rows, so tp shards them alike
            out[p + "attn.qkv.bias"] = partial(_qkv_rows, hf, o, "bias", hq, hkv, [d])
        if cfg.qk_norm:
            out[p + "attn.q_norm.weight"] = read(o + "self_attn.q_norm.weight", [d])
            out[p + "attn.k_norm.weight"] = read(o + "self_attn.k_norm.weight", [d])
        out[p + "attn.proj.weight"] = read(o + "self_attn.o_proj.weight", [h, hq * d])
        out[p + "norm2.weight"] = read(o + "post_attention_layernorm.weight", [h])
        out.update(mlp(hf, cfg, i, p, o))
    out[f"blocks.{L + 1}.norm.weight"] = read("model.norm.weight", [h])
    if cfg.tie_embeddings:
        out[f"blocks.{L + 1}.weight"] = out["blocks.0.word.weight"]
    else:
        out[f"blocks.{L + 1}.output.weight"] = read("lm_head.weight", [V, h])
    return LazyState(out)


def model_overrides(conf: dict) -> list[str]:
    """megalite model.* overrides equal to a HF Llama config.json; refuses what megalite cannot build."""
    refuse_biases(conf)
    return [f"model.{k}={v}" for k, v in common_overrides(conf).items()]


def refuse_biases(conf: dict) -> None:
    """Refuse a Llama-style config.json with attention or MLP biases by name."""
    bad = {"attention_bias": conf.get("attention_bias", False), "mlp_bias": conf.get("mlp_bias", False)}
    for key, value in bad.items():
        if value:
            raise CheckpointError(f"config.json {key}={value!r} is not supported (megalite's Llama has no biases; "
                                  "Qwen2's q/k/v-only bias is Qwen2ForCausalLM); convert a model without it")


def common_overrides(conf: dict) -> dict:
    """model.<field> -> value shared by Llama-style config.jsons (Llama, Qwen2, Qwen3); refuses what megalite
    lacks."""
    hq = conf["num_attention_heads"]
    if conf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json hidden_act={conf['hidden_act']!r} is not supported (megalite's SwiGLU "
                              "uses SiLU); convert a model with hidden_act='silu'")
    d = conf.get("head_dim") or conf["hidden_size"] // hq
    explicit = {} if d * hq == conf["hidden_size"] else {"head_dim": d}  # Qwen3's differs
    return {**explicit, "vocab_size": conf["vocab_size"], "hidden_size": conf["hidden_size"],
            "num_layers": conf["num_hidden_layers"], "num_heads": hq,
            "num_kv_heads": conf.get("num_key_value_heads") or hq, "ffn_hidden_size": conf["intermediate_size"],
            "max_seq_len": conf.get("max_position_embeddings", 2048), "norm": "rmsnorm", "position": "rope",
            "activation": "swiglu", "bias": False, "qkv_bias": False, "qk_norm": False, "dropout": 0.0,
            "attention_window": None, "global_attention_every": 0,
            "norm_eps": conf.get("rms_norm_eps", 1e-6), **rope_overrides(conf),
            "tie_embeddings": bool(conf.get("tie_word_embeddings", False))}
