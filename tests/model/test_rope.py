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
