"""YaRN and dynamic-NTK rotary of an imported Llama, checked against transformers' own classes.

A small random LlamaForCausalLM (fp32) with rope_type yarn or dynamic is saved, imported with
import_hf, and megalite's logits must equal transformers' on sequences longer than the original
context (where the scalings act): rtol 1e-5 with a floor of 1e-5 * max|logit| (tests/tolerance.py;
the same fp32 math summed in another order differs by ulps, a wrong frequency or a missing
attention factor shows at ~1e-2). Export must give back the same safetensors bit for bit and the
same rope parameters. The helpers are tests/checkpoint/test_hf_families.py's.
"""
import json

import pytest
import torch

from megalite.checkpoint import CheckpointError
from megalite.checkpoint.hf import export_hf, import_hf
from tests.checkpoint.test_hf import ours, tp_logits
from tests.checkpoint.test_hf_families import (
    ATOL_FRAC,
    RTOL,
    SHAPE,
    assert_same_tensors,
    check_parity_and_round_trip,
    random_hf,
)
from tests.tolerance import assert_close

transformers = pytest.importorskip("transformers")
# the parity helper feeds 24 tokens: past original_max_position_embeddings 8 and 16, within 64 positions
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8,
        "beta_fast": 32.0, "beta_slow": 1.0}
YARN_MSCALE = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 16,
               "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.8, "truncate": False}
YARN_FACTOR = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8,
               "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.3}
DYNAMIC = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}


def llama(rope: dict, **kwargs):
    return random_hf(transformers.LlamaConfig, transformers.LlamaForCausalLM, rope_parameters=dict(rope), **kwargs)


def tokens_of(length: int) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("rope", [YARN, YARN_MSCALE, YARN_FACTOR], ids=["yarn", "yarn-mscale", "yarn-attn-factor"])
def test_yarn_parity_and_round_trip(tmp_path, rope):
    check_parity_and_round_trip(tmp_path, llama(rope))
    conf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert conf["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}  # transformers 4's form


def test_yarn_null_factor_is_the_ratio_of_lengths(tmp_path):
    """transformers derives a null factor as max_position_embeddings / original (DeepSeek-V3's config)."""
    from megalite.generate import load_model

    llama(YARN).save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    conf = json.loads(path.read_text())
    path.write_text(json.dumps({**conf, "rope_parameters": {**conf["rope_parameters"], "factor": None}}))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, cfg = load_model(tmp_path / "ckpt")
    assert (cfg.model.rope_scaling, cfg.model.rope_scaling_factor) == ("yarn", 64 / 8)
    with torch.no_grad():
        assert_close(ours(model, tokens_of(40)), hf(tokens_of(40)).logits, RTOL, ATOL_FRAC, "logits")


@pytest.mark.parametrize("rope", [{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                                  {"type": "dynamic", "factor": 3.0}], ids=["yarn", "dynamic"])
def test_legacy_rope_scaling_form(tmp_path, rope):
    """A config.json from before transformers 5: rope_theta on top, rope_scaling with 'type'."""
    from megalite.generate import load_model

    llama(DYNAMIC, max_position_embeddings=16).save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    conf = {k: v for k, v in json.loads(path.read_text()).items() if k != "rope_parameters"}
    path.write_text(json.dumps({**conf, "rope_theta": 50000.0, "rope_scaling": rope}))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.rope_parameters["rope_type"] == rope["type"]  # transformers reads the scaling too
    import_hf(tmp_path / "hf", tmp_path / "ckpt", ["model.max_seq_len=64"])
    model, cfg = load_model(tmp_path / "ckpt")
    m = cfg.model
    assert (m.rope_scaling, m.rope_scaling_factor, m.rope_theta, m.rope_original_max_seq_len) == (
        rope["type"], rope["factor"], 5e4, 8 if rope["type"] == "yarn" else 16)
    with torch.no_grad():
        assert_close(ours(model, tokens_of(40)), hf(tokens_of(40)).logits, RTOL, ATOL_FRAC, "logits")


def test_dynamic_parity_at_each_length(tmp_path):
    """Dynamic NTK rescales above max_position_embeddings (16): import keeps that as
    model.rope_original_max_seq_len, so model.max_seq_len=64 runs 40 tokens with the frequencies of 40,
    then 12 with the plain ones, then 30 with those of 30 (transformers' rotary, reset at 12)."""
    from megalite.generate import load_model

    hf = llama(DYNAMIC, max_position_embeddings=16)
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt", ["model.max_seq_len=64"])
    model, cfg = load_model(tmp_path / "ckpt")
    assert (cfg.model.max_seq_len, cfg.model.rope_original_max_seq_len) == (64, 16)
    for length in (40, 12, 30):
        with torch.no_grad():
            assert_close(ours(model, tokens_of(length)), hf(tokens_of(length)).logits, RTOL, ATOL_FRAC,
                         f"logits of {length} tokens")
    with pytest.raises(CheckpointError, match=r"rope_original_max_seq_len=16 != model.max_seq_len=64.*"
                                              r"model.max_seq_len=16"):
        export_hf(tmp_path / "ckpt", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_dynamic_round_trip(tmp_path):
    """Imported as is (max_seq_len 16), export writes back the same tensors and rope parameters, and
    transformers runs the exported model past 16 positions as the original."""
    hf = llama(DYNAMIC, max_position_embeddings=16)
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "back")
    assert_same_tensors(tmp_path / "hf", tmp_path / "back")
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert back.config.to_dict()["rope_parameters"] == hf.config.to_dict()["rope_parameters"]
    assert back.config.max_position_embeddings == 16
    with torch.no_grad():
        assert torch.equal(back(tokens_of(40)).logits, hf(tokens_of(40)).logits)


@pytest.mark.parametrize("rope", [YARN, DYNAMIC], ids=["yarn", "dynamic"])
def test_greedy_generate_matches_transformers(tmp_path, rope):
    """The KV-cache path: 4 prompt tokens then 20 steps, past the original 8 (yarn) or 16 (dynamic:
    each step's tables are those of the cache plus the new token, as transformers recomputes them)."""
    from megalite.generate import generate, load_model

    hf = llama(rope, initializer_range=0.5, **({"max_position_embeddings": 16} if rope is DYNAMIC else {}))
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt", ["model.max_seq_len=64"])
    model, _ = load_model(tmp_path / "ckpt")
    prompt = [5, 17, 42, 99]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(model, prompt, 20) == want and len(set(want)) > 3


@pytest.mark.parametrize("rope", [YARN, DYNAMIC], ids=["yarn", "dynamic"])
def test_tp2_import_logits(tmp_path, spawn, rope):
    """The tables are per layer: each tp rank rotates its own heads with the same scaled tables."""
    hf = llama(rope, **({"max_position_embeddings": 16} if rope is DYNAMIC else {}))
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt", ["parallel.tp=2", "model.max_seq_len=64"])
    with torch.no_grad():
        want = hf(tokens_of(24)).logits
    for got in spawn(tp_logits, 2, str(tmp_path / "ckpt"), tokens_of(24)):
        assert_close(got, want, RTOL, ATOL_FRAC, "tp=2 logits")


@pytest.mark.parametrize("conf, message", [
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}},
     r"rope_type='longrope' is not supported.*default, linear, llama3, yarn, dynamic"),
    ({"rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": 8}}, r"lacks \['factor'\]"),
    ({"rope_scaling": {"type": "dynamic"}}, r"rope_type='dynamic' lacks \['factor'\]"),
], ids=["longrope", "yarn-no-factor", "dynamic-no-factor"])
def test_rope_settings_megalite_lacks_are_refused_by_name(conf, message):
    from megalite.checkpoint.hf_rope import rope_overrides

    with pytest.raises(CheckpointError, match=message):
        rope_overrides(conf)


def test_yarn_overrides_take_transformers_defaults():
    from megalite.checkpoint.hf_rope import rope_overrides

    got = rope_overrides({"max_position_embeddings": 64, "original_max_position_embeddings": 16,
                          "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 8,
                                           "beta_fast": 0}})
    assert got == {"rope_theta": 10000.0, "rope_scaling": "yarn", "rope_scaling_factor": 4.0,
                   "rope_original_max_seq_len": 16, "rope_beta_fast": 32.0, "rope_beta_slow": 1.0,
                   "rope_truncate": True, "rope_attention_factor": None, "rope_mscale": None,
                   "rope_mscale_all_dim": None}  # a top-level original wins; beta 0 reads as the default


def test_qwen2_yarn_parity_and_round_trip(tmp_path):
    """Qwen2.5's long-context setting (rope_scaling yarn) takes the same rotary path as Llama's."""
    check_parity_and_round_trip(tmp_path, random_hf(transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                                                    rope_parameters=dict(YARN_MSCALE)))
