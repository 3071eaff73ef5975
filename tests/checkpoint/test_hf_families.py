"""Import of the Llama-family models people start from, checked against transformers' own classes.

Each test builds a small random model with transformers' config and model class,
saves it, imports it with megalite's converter, and asserts that megalite's logits
and loss on the same tokens equal transformers' and that export writes back the
very same safetensors. Tolerance: rtol 1e-5 with a floor of 1e-5 * max|logit|
(tests/tolerance.py): both sides compute the same fp32 math on the same weights,
summed in another order, so they differ by ulps (~1e-7); a wrong frequency, bias
row or weight shows at ~1e-2 and more.
"""
import json

import pytest
import torch

from megalite.checkpoint import CheckpointError
from megalite.checkpoint.hf import export_hf, import_hf
from megalite.config import load_config
from tests.checkpoint.test_hf import hf_tensors, ours, tp_logits, write_ckpt
from tests.tolerance import assert_close

transformers = pytest.importorskip("transformers")
RTOL, ATOL_FRAC = 1e-5, 1e-5
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
# original_max_position_embeddings 8 < the 24 tokens: llama3 scaling divides or smooths every frequency
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
LINEAR = {"rope_type": "linear", "rope_theta": 50000.0, "factor": 3.0}


def random_hf(config_cls, model_cls, **kwargs):
    """A randomly initialised fp32 transformers model (biases and norm gains drawn too: HF's init
    makes them 0 and 1, which would hide a bias or gain that is dropped or misplaced)."""
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SHAPE, **kwargs})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.normal_(1, 0.3)
    return model


def assert_same_tensors(hf_dir, other_dir) -> None:
    """The two HF directories hold the same tensor names with the same bits."""
    first, again = hf_tensors(hf_dir), hf_tensors(other_dir)
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)


def check_parity_and_round_trip(tmp_path, hf_model, arch: str | None = None) -> None:
    """Import `hf_model`; megalite's logits and loss equal transformers'; export (as `arch`, when given)
    gives back its tensors."""
    from megalite.generate import load_model

    hf_model.save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, _ = load_model(tmp_path / "ckpt")
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(tokens, labels=tokens)  # HF shifts: logits at 0..s-2 predict tokens 1..s-1
        loss = model.loss(tokens[:, :-1], tokens[:, 1:]).mean()
    assert_close(ours(model, tokens), want.logits, RTOL, ATOL_FRAC, "logits")
    assert_close(loss, want.loss, RTOL, ATOL_FRAC, "loss")
    export_hf(tmp_path / "ckpt", tmp_path / "back", arch=arch)
    assert_same_tensors(tmp_path / "hf", tmp_path / "back")
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "back")).to_dict()["rope_parameters"] == \
        hf_model.config.to_dict()["rope_parameters"]


@pytest.mark.parametrize("rope", [LLAMA3, LINEAR], ids=["llama3", "linear"])
def test_llama_rope_scaling_parity(tmp_path, rope):
    check_parity_and_round_trip(tmp_path, random_hf(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                                                    rope_parameters=dict(rope)))


def test_llama_legacy_rope_scaling_form(tmp_path):
    """A config.json from before transformers 5: rope_theta on top, rope_scaling with 'type'."""
    from megalite.generate import load_model

    random_hf(transformers.LlamaConfig, transformers.LlamaForCausalLM).save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    conf = {k: v for k, v in json.loads(path.read_text()).items() if k != "rope_parameters"}
    path.write_text(json.dumps({**conf, "rope_theta": 50000.0, "rope_scaling": {"type": "linear", "factor": 3.0}}))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.rope_parameters["rope_type"] == "linear"  # transformers reads the scaling too
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, cfg = load_model(tmp_path / "ckpt")
    assert (cfg.model.rope_scaling, cfg.model.rope_scaling_factor, cfg.model.rope_theta) == ("linear", 3.0, 5e4)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(model, tokens), hf(tokens).logits, RTOL, ATOL_FRAC, "logits")


def test_unsupported_rope_type_refused_by_name(tmp_path):
    conf = transformers.LlamaConfig(**SHAPE, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                              "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    transformers.LlamaForCausalLM(conf).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"rope_type='longrope' is not supported.*default, linear, llama3"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("rope", [None, LLAMA3], ids=["default-rope", "llama3-rope"])
def test_qwen2_parity(tmp_path, rope):
    extra = {"rope_parameters": dict(rope)} if rope else {}
    hf = random_hf(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, **extra)
    check_parity_and_round_trip(tmp_path, hf)
    assert {"model.layers.0.self_attn.k_proj.bias"} <= set(hf_tensors(tmp_path / "back"))


@pytest.mark.parametrize("extra", [{"head_dim": 32}, {"head_dim": 16, "rope_parameters": dict(LINEAR)}],
                         ids=["head_dim-32", "head_dim-16-linear-rope"])
def test_qwen3_parity(tmp_path, extra):
    """Per-head q/k RMSNorm and a head_dim other than hidden / heads (32 * 4 heads = 128 != 64)."""
    hf = random_hf(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, **extra)
    check_parity_and_round_trip(tmp_path, hf)
    assert {"model.layers.1.self_attn.q_norm.weight"} <= set(hf_tensors(tmp_path / "back"))


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3"])
def test_qwen_tp2_import_logits(tmp_path, spawn, family):
    """Each tp rank's q/k/v bias rows are its own heads' (the fused layout), and each holds the shared
    q/k norm gains: the tp=2 logits are transformers'."""
    extra = {"head_dim": 32} if family == "Qwen3" else {}
    hf = random_hf(getattr(transformers, family + "Config"), getattr(transformers, family + "ForCausalLM"), **extra)
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt", ["parallel.tp=2"])
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
    for got in spawn(tp_logits, 2, str(tmp_path / "ckpt"), tokens):
        assert_close(got, want, RTOL, ATOL_FRAC, f"tp=2 logits of the {family} import")
    export_hf(tmp_path / "ckpt", tmp_path / "back")  # and back out of the tp=2 shards, bit for bit
    assert_same_tensors(tmp_path / "hf", tmp_path / "back")


def test_qwen2_sliding_window_refused_by_name(tmp_path):
    conf = transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    transformers.Qwen2ForCausalLM(conf).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"use_sliding_window=True .*follow max_window_layers"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("window", [None, SHAPE["max_position_embeddings"], 8],
                         ids=["no-window", "window-covers-all", "window-8"])
def test_mistral_parity(tmp_path, window):
    """Mistral: Llama plus a sliding window; one >= max positions masks no causal key (no window), one of 8
    over 24 tokens masks most (model.attention_window)."""
    hf = random_hf(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=window)
    check_parity_and_round_trip(tmp_path, hf)  # a windowed model exports as Mistral unasked
    acting = window if window == 8 else None
    assert load_config(str(tmp_path / "ckpt" / "config.yaml")).model.attention_window == acting
    conf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (conf["model_type"], conf["architectures"], conf.get("sliding_window")) == \
        (("mistral", ["MistralForCausalLM"], 8) if acting else ("llama", ["LlamaForCausalLM"], None))
    if acting:
        assert type(transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(str(tmp_path / "back")))) is transformers.MistralForCausalLM


def test_mistral_exported_when_asked_and_alternating_windows_refused(tmp_path):
    hf = random_hf(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=None)
    check_parity_and_round_trip(tmp_path, hf, arch="MistralForCausalLM")
    conf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (conf["architectures"], conf["sliding_window"]) == (["MistralForCausalLM"], None)
    write_ckpt(tmp_path / "gemma_like", ["model.attention_window=4", "model.global_attention_every=2"])
    with pytest.raises(CheckpointError, match=r"MistralForCausalLM needs model\.global_attention_every=0"):
        export_hf(tmp_path / "gemma_like", tmp_path / "refused")


def test_qwen3_attention_bias_refused_by_name(tmp_path):
    conf = transformers.Qwen3Config(**SHAPE, attention_bias=True)
    transformers.Qwen3ForCausalLM(conf).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"attention_bias=True is not supported: Qwen3's puts a bias on o_proj"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


FAMILIES = {"llama-llama3-rope": ("Llama", {"rope_parameters": dict(LLAMA3)}), "qwen2": ("Qwen2", {}),
            "qwen3": ("Qwen3", {"head_dim": 32, "rope_parameters": dict(LINEAR)}),
            "mistral-window-6": ("Mistral", {"sliding_window": 6})}  # 24 positions: the cache outgrows it


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generate_matches_transformers(tmp_path, family):
    """The KV-cache path too: rotary at an offset with scaled frequencies, q/k norm before the cache, the
    sliding window over cached keys."""
    from megalite.generate import generate, load_model

    name, extra = FAMILIES[family]
    hf = random_hf(getattr(transformers, name + "Config"), getattr(transformers, name + "ForCausalLM"),
                   initializer_range=0.5, **extra)  # large weights: varied, untied greedy picks
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    model, _ = load_model(tmp_path / "ckpt")
    prompt = [5, 17, 42, 99]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(model, prompt, 20) == want and len(set(want)) > 3


@pytest.mark.parametrize("conf, message", [
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope' is not supported"),
    ({"rope_theta": 1e4, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, r"lacks \['low_freq_factor', 'high_freq_factor'\]"),
    ({"rope_parameters": {"full_attention": {}, "sliding_attention": {}}}, "rope_parameters per layer type"),
], ids=["longrope", "partial-rotary", "llama3-incomplete", "per-layer"])
def test_rope_settings_megalite_lacks_are_refused_by_name(conf, message):
    from megalite.checkpoint.hf_rope import rope_overrides

    with pytest.raises(CheckpointError, match=message):
        rope_overrides(conf)
