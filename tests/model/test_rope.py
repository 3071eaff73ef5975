"""Scaled rotary frequencies equal transformers' ROPE_INIT_FUNCTIONS bit for bit (same fp32 ops)."""
import pytest
import torch

from megalite.config import load_config
from megalite.model.rope import inv_freq

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

# head_dim 64 at theta 500000 spans wavelengths from 6 to ~1e6: all three llama3 bands are hit
CASES = {"llama3": (["model.rope_scaling=llama3", "model.rope_scaling_factor=8", "model.rope_high_freq_factor=4",
                     "model.rope_low_freq_factor=1", "model.rope_original_max_seq_len=64"],
                    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}),
         "linear": (["model.rope_scaling=linear", "model.rope_scaling_factor=2.5"],
                    {"rope_type": "linear", "factor": 2.5})}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_scaled_inv_freq_equals_transformers(kind):
    overrides, params = CASES[kind]
    cfg = load_config("tiny", ["model.hidden_size=256", "model.num_heads=4", "model.rope_theta=500000",
                               "model.max_seq_len=256", "data.seq_len=128"] + overrides).model
    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=256,
                                  rope_parameters={"rope_theta": 500000.0, **params})
    want, scale = ROPE_INIT_FUNCTIONS[kind](hf)
    got = inv_freq(cfg, 64)
    assert scale == 1.0 and torch.equal(got, want)
    assert not torch.equal(got, inv_freq(load_config("tiny", ["model.rope_theta=500000"]).model, 64))


# YaRN: the default ramp (truncated), a custom untruncated one, DeepSeek's mscale pair and an explicit
# attention factor; all reproduce transformers' fp32 ops in its order, so frequencies and tables are
# bitwise equal (rtol 0) and the attention factor is the same Python float.
YARN = {"default": (["model.rope_scaling_factor=4", "model.rope_original_max_seq_len=64"],
                    {"factor": 4.0, "original_max_position_embeddings": 64}),
        "betas-untruncated": (["model.rope_scaling_factor=8", "model.rope_original_max_seq_len=32",
                               "model.rope_beta_fast=16", "model.rope_beta_slow=2", "model.rope_truncate=false"],
                              {"factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
                               "beta_slow": 2.0, "truncate": False}),
        "mscale": (["model.rope_scaling_factor=4", "model.rope_original_max_seq_len=64", "model.rope_mscale=1",
                    "model.rope_mscale_all_dim=0.707"],
                   {"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.707}),
        "attention-factor": (["model.rope_scaling_factor=4", "model.rope_original_max_seq_len=64",
                              "model.rope_attention_factor=1.5"],
                             {"factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.5})}


def _cfg(overrides):
    return load_config("tiny", ["model.hidden_size=256", "model.num_heads=4", "model.rope_theta=500000",
                                "model.max_seq_len=256", "data.seq_len=128"] + overrides).model


def _hf_rotary(params, max_positions=256):
    """transformers' LlamaRotaryEmbedding of head_dim 64 and its config."""
    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=max_positions,
                                  rope_parameters={"rope_theta": 500000.0, **params})
    return transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf), hf


@pytest.mark.parametrize("case", sorted(YARN))
def test_yarn_inv_freq_and_tables_equal_transformers(case):
    from megalite.model.rope import rope_tables

    overrides, params = YARN[case]
    cfg = _cfg(["model.rope_scaling=yarn"] + overrides)
    want, scale = ROPE_INIT_FUNCTIONS["yarn"](_hf_rotary({"rope_type": "yarn", **params})[1])
    assert torch.equal(inv_freq(cfg, 64), want) and scale > 1.0
    assert not torch.equal(inv_freq(cfg, 64), inv_freq(_cfg([]), 64))
    rotary, _ = _hf_rotary({"rope_type": "yarn", **params})
    hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(256)[None])  # [1, 256, 64]
    cos, sin = rope_tables(cfg, 64)  # [256, 32]: HF repeats the half (rotate-half layout)
    assert torch.equal(hf_cos[0], torch.cat((cos, cos), -1)) and torch.equal(hf_sin[0], torch.cat((sin, sin), -1))


@pytest.mark.parametrize("factor", [2.0, 3.7])
def test_dynamic_inv_freq_equals_transformers_at_each_length(factor):
    """Up to the original 64 positions the plain frequencies (transformers' init); beyond, those of the
    forward's length (transformers' dynamic_rope_update, seq_len an int64 tensor). Bitwise: the same ops."""
    cfg = _cfg(["model.rope_scaling=dynamic", f"model.rope_scaling_factor={factor}",
                "model.rope_original_max_seq_len=64"])
    rotary, hf = _hf_rotary({"rope_type": "dynamic", "factor": factor}, max_positions=64)
    want, scale = ROPE_INIT_FUNCTIONS["dynamic"](hf)
    assert scale == 1.0 and torch.equal(inv_freq(cfg, 64), want) and torch.equal(inv_freq(cfg, 64, 64), want)
    assert torch.equal(want, inv_freq(_cfg([]), 64))
    for length in (65, 100, 256):
        want, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, None, seq_len=torch.tensor(length))
        assert torch.equal(inv_freq(cfg, 64, length), want), length
        rotary(torch.zeros(1), torch.arange(length)[None])  # the module's own update, as in a forward
        assert torch.equal(rotary.inv_freq, want) and not torch.equal(want, inv_freq(_cfg([]), 64))


@pytest.mark.parametrize("overrides, message", [
    (["model.rope_beta_fast=16"], "model.rope_beta_fast=16.0 has no effect with model.rope_scaling='none'; "
                                  "set model.rope_scaling=yarn, or model.rope_beta_fast=32.0"),
    (["model.rope_scaling=linear", "model.rope_scaling_factor=2", "model.rope_attention_factor=1.2"],
     "model.rope_attention_factor=1.2 has no effect with model.rope_scaling='linear'; set model.rope_scaling=yarn, "
     "or model.rope_attention_factor=null"),
    (["model.rope_scaling=yarn", "model.rope_beta_fast=1", "model.rope_beta_slow=4"],
     "model.rope_beta_fast=1.0 must be >= model.rope_beta_slow=4.0 for model.rope_scaling='yarn'"),
    (["model.rope_scaling=yarn", "model.rope_beta_slow=0"], "model.rope_beta_slow=0.0 must be > 0"),
    (["model.rope_scaling=yarn", "model.rope_attention_factor=0"], "model.rope_attention_factor=0.0 must be > 0"),
    (["model.rope_scaling=yarn", "model.rope_mscale=-1"], "model.rope_mscale=-1.0 must be >= 0"),
    (["model.rope_scaling=dynamic", "model.hidden_size=8", "model.num_heads=4", "model.num_kv_heads=null"],
     "model.rope_scaling='dynamic' needs head_dim > 2"),
], ids=["beta-without-yarn", "attention-factor-with-linear", "betas-reversed", "beta-zero", "attention-factor-zero",
        "mscale-negative", "dynamic-head-dim-2"])
def test_bad_yarn_and_dynamic_settings_are_refused_by_name(overrides, message):
    from megalite.config import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(load_config("tiny", overrides), world_size=1)
    assert message in str(e.value)
