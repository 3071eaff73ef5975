"""Hugging Face GPT2LMHeadModel <-> megalite weights (the GPT-2 style: LayerNorm, learned positions, GELU).

megalite (model/blocks.py)              Hugging Face GPT2LMHeadModel (Conv1D weights are [in, out])
  blocks.0.word.weight [Vp, h]            transformer.wte.weight [V, h] (padding rows dropped)
  blocks.0.position [max_seq_len, h]      transformer.wpe.weight
  blocks.i.norm1.weight / .bias           transformer.h.{i-1}.ln_1.weight / .bias
  blocks.i.attn.qkv.weight [(hq+2hkv)d, h] attn.c_attn.weight [h, 3h]: columns q | k | v, each head-major
  blocks.i.attn.proj.weight [h, h]        attn.c_proj.weight (transposed)
  blocks.i.norm2.weight / .bias           ln_2
  blocks.i.mlp.fc1.weight [f, h]          mlp.c_fc.weight [h, f] (transposed)
  blocks.i.mlp.fc2.weight [h, f]          mlp.c_proj.weight [f, h] (transposed)
  blocks.L+1.norm.weight / .bias          transformer.ln_f.weight / .bias
  blocks.L+1.output.weight                lm_head.weight (only when untied; GPT-2 ties by default)

Two megalite settings GPT-2 has no switch for are mapped exactly rather than
refused: model.bias=false becomes zero biases (adding zero changes nothing),
and grouped-query attention (num_kv_heads < num_heads) becomes multi-head
attention with each kv head repeated for the r query heads that use it (query
head j reads kv head j // r in megalite, so the repeated copy computes the same
scores). megalite's GELU is the tanh approximation, HF's "gelu_new".
Importing gives a bias=true, num_kv_heads=num_heads model.
"""
from __future__ import annotations

from functools import partial
from typing import Iterator, Mapping

import torch

from megalite.checkpoint.hf_files import LazyState
from megalite.checkpoint.hf_llama import DTYPE_NAMES, field_mismatches, need, refuse_mismatches
from megalite.checkpoint.io import CheckpointError
from megalite.config import ModelConfig
from megalite.config import resolved_ffn_hidden_size as ffn_size

ARCH, MODEL_TYPE = "GPT2LMHeadModel", "gpt2"
_WANTED = {"norm": "layernorm", "position": "learned", "activation": "gelu", "head_dim": None, "qk_norm": False,
           "attention_window": None}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # both are 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))


def mismatches(cfg: ModelConfig) -> dict[str, tuple]:
    """model.<field> -> (value, what GPT2LMHeadModel needs), for every field it cannot represent."""
    return field_mismatches(cfg, _WANTED)


def check(cfg: ModelConfig) -> None:
    """Refuse model shapes that GPT2LMHeadModel cannot represent, naming the setting."""
    refuse_mismatches(cfg, _WANTED, ARCH, "GPT-2 style: layernorm, learned positions, gelu")


def hf_config(cfg: ModelConfig, bos: int | None = None, eos: int | None = None,
              dtype: torch.dtype = torch.float32) -> dict:
    """config.json for GPT2LMHeadModel of the megalite model `cfg` (unpadded vocabulary)."""
    check(cfg)
    return {"architectures": [ARCH], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads, "n_inner": ffn_size(cfg), "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout, "initializer_range": cfg.init_std, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": bool(cfg.tie_embeddings), "bos_token_id": bos, "eos_token_id": eos,
            "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype]}


def _bias(state: Mapping, cfg: ModelConfig, name: str, size: int) -> torch.Tensor:
    """The megalite bias, or exact zeros when the model has none."""
    if cfg.bias:
        return need(state, name, [size])
    return torch.zeros(size, device="meta" if getattr(state, "is_meta", False) else "cpu")


def _qkv_columns(t: torch.Tensor, hq: int, hkv: int, d: int) -> torch.Tensor:
    """Fused qkv rows [(hq + 2hkv) d, ...] -> GPT-2's [3 hq d, ...] (q | k | v, kv heads repeated r times)."""
    r, rest = hq // hkv, t.shape[1:]
    g = t.view(hkv, r + 2, d, *rest)
    q = g[:, :r].reshape(hq, d, *rest)  # [hkv, r, d, .] -> [hq, d, .]
    k = g[:, r].repeat_interleave(r, dim=0)  # [hkv, d, .] -> [hq, d, .]: head j reads kv head j // r
    v = g[:, r + 1].repeat_interleave(r, dim=0)
    return torch.cat((q, k, v)).reshape(3 * hq * d, *rest)


def to_hf(state: Mapping, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs from a full, padding-stripped megalite state, tensor by tensor."""
    check(cfg)
    h, hq, L, f = cfg.hidden_size, cfg.num_heads, cfg.num_layers, ffn_size(cfg)
    hkv, d = cfg.num_kv_heads or hq, h // hq
    yield "transformer.wte.weight", need(state, "blocks.0.word.weight", [cfg.vocab_size, h])
    yield "transformer.wpe.weight", need(state, "blocks.0.position", [cfg.max_seq_len, h])
    for i in range(1, L + 1):
        p, o = f"blocks.{i}.", f"transformer.h.{i - 1}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            yield o + theirs + ".weight", need(state, p + ours + ".weight", [h])
            yield o + theirs + ".bias", _bias(state, cfg, p + ours + ".bias", h)
        qkv = need(state, p + "attn.qkv.weight", [(hq + 2 * hkv) * d, h])
        yield o + "attn.c_attn.weight", _qkv_columns(qkv, hq, hkv, d).t()  # [3h, h] -> Conv1D [h, 3h]
        del qkv
        bias = _bias(state, cfg, p + "attn.qkv.bias", (hq + 2 * hkv) * d)
        yield o + "attn.c_attn.bias", _qkv_columns(bias, hq, hkv, d)
        yield o + "attn.c_proj.weight", need(state, p + "attn.proj.weight", [h, hq * d]).t()
        yield o + "attn.c_proj.bias", _bias(state, cfg, p + "attn.proj.bias", h)
        yield o + "mlp.c_fc.weight", need(state, p + "mlp.fc1.weight", [f, h]).t()
        yield o + "mlp.c_fc.bias", _bias(state, cfg, p + "mlp.fc1.bias", f)
        yield o + "mlp.c_proj.weight", need(state, p + "mlp.fc2.weight", [h, f]).t()
        yield o + "mlp.c_proj.bias", _bias(state, cfg, p + "mlp.fc2.bias", h)
    yield "transformer.ln_f.weight", need(state, f"blocks.{L + 1}.norm.weight", [h])
    yield "transformer.ln_f.bias", _bias(state, cfg, f"blocks.{L + 1}.norm.bias", h)
    if not cfg.tie_embeddings:
        yield "lm_head.weight", need(state, f"blocks.{L + 1}.output.weight", [cfg.vocab_size, h])


def _read(hf: Mapping, name: str, shape: list[int], transposed: bool = False) -> torch.Tensor:
    t = need(hf, name, shape)
    return t.t().contiguous() if transposed else t  # Conv1D's [in, out] -> Linear's [out, in]


def _head_major_qkv(hf: Mapping, o: str, suffix: str, hq: int, d: int, h: int) -> torch.Tensor:
    """attn.c_attn.<suffix> (columns q | k | v) -> megalite's rows, slabs [q_j, k_j, v_j] per head."""
    if suffix == "weight":
        return _read(hf, o + "attn.c_attn.weight", [h, 3 * h]).t().reshape(3, hq, d, h).transpose(0, 1).reshape(
            3 * h, h)
    return _read(hf, o + "attn.c_attn.bias", [3 * h]).reshape(3, hq, d).transpose(0, 1).reshape(3 * h)


def from_hf(hf: Mapping, cfg: ModelConfig) -> LazyState:
    """Full megalite state (unpadded vocabulary, the files' dtype, bias=true, MHA) from HF GPT-2 tensors, each made when
    asked for (checkpoint.hf_files.LazyState)."""
    check(cfg)
    h, hq, L, f, V = cfg.hidden_size, cfg.num_heads, cfg.num_layers, ffn_size(cfg), cfg.vocab_size
    d = h // hq
    read = lambda name, shape, transposed=False: partial(_read, hf, name, shape, transposed)  # noqa: E731
    out = {"blocks.0.word.weight": read("transformer.wte.weight", [V, h]),
           "blocks.0.position": read("transformer.wpe.weight", [cfg.max_seq_len, h])}
    for i in range(1, L + 1):
        p, o = f"blocks.{i}.", f"transformer.h.{i - 1}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[p + ours + ".weight"] = read(o + theirs + ".weight", [h])
            out[p + ours + ".bias"] = read(o + theirs + ".bias", [h])
        out[p + "attn.qkv.weight"] = partial(_head_major_qkv, hf, o, "weight", hq, d, h)
        out[p + "attn.qkv.bias"] = partial(_head_major_qkv, hf, o, "bias", hq, d, h)
        out[p + "attn.proj.weight"] = read(o + "attn.c_proj.weight", [h, h], True)
        out[p + "attn.proj.bias"] = read(o + "attn.c_proj.bias", [h])
        out[p + "mlp.fc1.weight"] = read(o + "mlp.c_fc.weight", [h, f], True)
        out[p + "mlp.fc1.bias"] = read(o + "mlp.c_fc.bias", [f])
        out[p + "mlp.fc2.weight"] = read(o + "mlp.c_proj.weight", [f, h], True)
        out[p + "mlp.fc2.bias"] = read(o + "mlp.c_proj.bias", [h])
    out[f"blocks.{L + 1}.norm.weight"] = read("transformer.ln_f.weight", [h])
    out[f"blocks.{L + 1}.norm.bias"] = read("transformer.ln_f.bias", [h])
    if cfg.tie_embeddings:
        out[f"blocks.{L + 1}.weight"] = out["blocks.0.word.weight"]
    else:
        out[f"blocks.{L + 1}.output.weight"] = read("lm_head.weight", [V, h])
    return LazyState(out)


def model_overrides(conf: dict) -> list[str]:
    """megalite model.* overrides equal to a HF GPT-2 config.json; refuses what megalite cannot build."""
    act = conf.get("activation_function", "gelu_new")
    bad = {"activation_function": (act, act in _GELU_TANH),
           "scale_attn_weights": (conf.get("scale_attn_weights", True), conf.get("scale_attn_weights", True)),
           "scale_attn_by_inverse_layer_idx": (conf.get("scale_attn_by_inverse_layer_idx", False),
                                               not conf.get("scale_attn_by_inverse_layer_idx", False))}
    for key, (value, ok) in bad.items():
        if not ok:
            raise CheckpointError(f"config.json {key}={value!r} is not supported (megalite's GPT-2 style has "
                                  f"tanh GELU {_GELU_TANH} and 1/sqrt(head_dim) attention scaling)")
    h, heads = conf["n_embd"], conf["n_head"]
    kv = {"vocab_size": conf["vocab_size"], "hidden_size": h, "num_layers": conf["n_layer"], "num_heads": heads,
          "num_kv_heads": heads, "ffn_hidden_size": conf.get("n_inner") or 4 * h,
          "max_seq_len": conf.get("n_positions", 1024), "norm": "layernorm", "position": "learned",
          "activation": "gelu", "bias": True, "dropout": 0.0, "norm_eps": conf.get("layer_norm_epsilon", 1e-5),
          "tie_embeddings": bool(conf.get("tie_word_embeddings", True))}
    return [f"model.{k}={v}" for k, v in kv.items()]
