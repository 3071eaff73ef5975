"""Rotary settings <-> Hugging Face's rope parameters (config.json), for the rotary architectures.

transformers 5 writes `rope_parameters` ({rope_type, rope_theta, factor, ...}); older configs
write `rope_theta` and `rope_scaling` ({type or rope_type, factor, ...}). Import reads either;
export writes both, so transformers 4 and 5 read the same scaling. megalite implements the
rope types default, linear, llama3, yarn and dynamic (model.rope); any other (longrope, ...) is
refused by name.

original_max_position_embeddings is read as transformers reads it: a top-level key wins over the
one in the rope dict, and max_position_embeddings stands in for both (llama3, yarn). yarn's optional
keys take transformers' defaults (beta_fast 32, beta_slow 1, truncate true; attention_factor, mscale,
mscale_all_dim absent), and a null factor is max_position_embeddings / original, as transformers
derives it; export writes that factor out. dynamic rescales above max_position_embeddings itself
(transformers ignores any original_max_position_embeddings there), which import keeps as
model.rope_original_max_seq_len, so model.max_seq_len may be raised for longer sequences; export
then refuses unless the two are equal, since config.json's max_position_embeddings is model.max_seq_len.
"""
from __future__ import annotations

from megalite.checkpoint.io import CheckpointError
from megalite.config import ModelConfig

SUPPORTED = ("default", "linear", "llama3", "yarn", "dynamic")
_OURS = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn",
         "dynamic": "dynamic"}  # HF rope_type -> model.rope_scaling
_REQUIRED = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
             "yarn": ("factor",), "dynamic": ("factor",)}
_YARN_OPTIONAL = {"attention_factor": "rope_attention_factor", "mscale": "rope_mscale",
                  "mscale_all_dim": "rope_mscale_all_dim"}  # HF key -> model.<field>, None when absent


def rope_parameters(cfg: ModelConfig) -> dict:
    """HF rope_parameters of the model `cfg` (rope_type, rope_theta and the scaling's own keys)."""
    kind = {v: k for k, v in _OURS.items()}[cfg.rope_scaling]
    out = {"rope_type": kind, "rope_theta": float(cfg.rope_theta)}
    if kind != "default":
        out["factor"] = float(cfg.rope_scaling_factor)
    if kind == "llama3":
        out.update(low_freq_factor=float(cfg.rope_low_freq_factor), high_freq_factor=float(cfg.rope_high_freq_factor),
                   original_max_position_embeddings=cfg.rope_original_max_seq_len or cfg.max_seq_len)
    if kind == "yarn":
        out.update(original_max_position_embeddings=cfg.rope_original_max_seq_len or cfg.max_seq_len,
                   beta_fast=float(cfg.rope_beta_fast), beta_slow=float(cfg.rope_beta_slow))
        given = {k: getattr(cfg, ours) for k, ours in _YARN_OPTIONAL.items()}
        out.update({k: float(v) for k, v in given.items() if v is not None})
        if not cfg.rope_truncate:
            out["truncate"] = False
    if kind == "dynamic" and cfg.rope_original_max_seq_len not in (None, cfg.max_seq_len):
        raise CheckpointError(
            f"model.rope_scaling='dynamic' with model.rope_original_max_seq_len={cfg.rope_original_max_seq_len} != "
            f"model.max_seq_len={cfg.max_seq_len}: transformers' dynamic rope rescales above "
            "max_position_embeddings, which export writes from model.max_seq_len; export with "
            f"model.max_seq_len={cfg.rope_original_max_seq_len} (transformers runs longer sequences anyway)")
    return out


def hf_rope_fields(cfg: ModelConfig) -> dict:
    """config.json's rope keys: rope_parameters (transformers 5), rope_theta and rope_scaling (before)."""
    params = rope_parameters(cfg)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} if params["rope_type"] != "default" else None
    return {"rope_theta": params["rope_theta"], "rope_parameters": params, "rope_scaling": scaling}


def _params_of(conf: dict) -> dict:
    """The one rope dict of a config.json (rope_parameters, else rope_scaling), with its rope_type set."""
    params = dict(conf.get("rope_parameters") or conf.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"config.json rope_parameters per layer type ({sorted(params)}) is not supported: "
                              "megalite uses one rotary for every layer")
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_overrides(conf: dict) -> dict:
    """model.<field> -> value for the rotary of a HF config.json; refuses a rope megalite does not compute."""
    params = _params_of(conf)
    kind = params["rope_type"]
    if kind not in SUPPORTED:
        raise CheckpointError(f"config.json rope_type={kind!r} is not supported: megalite implements rope types "
                              f"{', '.join(SUPPORTED)} (model.rope_scaling); convert a model with one of those")
    partial = params.get("partial_rotary_factor", conf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"config.json partial_rotary_factor={partial!r} is not supported: megalite rotates "
                              "every feature of a head; convert a model without it")
    theta = params.get("rope_theta", conf.get("rope_theta", 10000.0))
    out = {"rope_theta": float(theta), "rope_scaling": _OURS[kind]}
    missing = [k for k in _REQUIRED[kind] if k not in params]
    if missing:
        raise CheckpointError(f"config.json rope_type={kind!r} lacks {missing} (transformers needs them too)")
    positions = conf.get("max_position_embeddings", 2048)
    # llama3, yarn: a top-level original_max_position_embeddings wins, as in transformers
    original = int(conf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or positions)
    if kind != "default":
        factor = params["factor"]
        if factor is None and kind == "yarn":  # transformers: the ratio of the two lengths (DeepSeek-V3)
            factor = positions / original
        out["rope_scaling_factor"] = float(factor)
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]), rope_original_max_seq_len=original)
    if kind == "yarn":  # transformers reads a missing or zero beta as the default
        out.update(rope_original_max_seq_len=original, rope_beta_fast=float(params.get("beta_fast") or 32),
                   rope_beta_slow=float(params.get("beta_slow") or 1),
                   rope_truncate=bool(params.get("truncate", True)))
        out.update({ours: None if params.get(k) is None else float(params[k]) for k, ours in _YARN_OPTIONAL.items()})
    if kind == "dynamic":  # transformers rescales above max_position_embeddings, whatever else the dict says
        out["rope_original_max_seq_len"] = int(positions)
    return out
