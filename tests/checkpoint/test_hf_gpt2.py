"""GPT-2 style export/import: GPT2LMHeadModel loads the export as is, with megalite's logits.

Logit parity tolerance: fp32, rtol 1e-5 with a floor of 1e-5 * max|logit|
(tests/tolerance.py; both sides run LayerNorm, tanh GELU and softmax attention
in fp32 on the same weights; the sum order differs, by ulps).
"""
import json

import pytest
import torch

from megalite.checkpoint import CheckpointError
from megalite.checkpoint.consolidate import consolidate_fp32
from megalite.checkpoint.hf import arch_for_model, export_hf, import_hf
from tests.checkpoint.test_hf import hf_tensors, ours, write_ckpt
from tests.tolerance import assert_close

transformers = pytest.importorskip("transformers")
RTOL, ATOL_FRAC = 1e-5, 1e-5  # two fp32 implementations of the same math: ulps, a wrong weight ~1e-1
GPT2 = ["model.norm=layernorm", "model.position=learned", "model.activation=gelu", "model.vocab_size=100",
        "model.hidden_size=48", "model.num_layers=2", "model.num_heads=6", "model.max_seq_len=32"]
# the preset's shape: biases, tied, MHA; GQA (kv heads repeated) with biases; no biases (zeros), untied
STYLES = {"mha-bias-tied": ["model.bias=true", "model.tie_embeddings=true", "model.num_kv_heads=6"],
          "gqa-bias-untied": ["model.bias=true", "model.num_kv_heads=2"],
          "no-bias-tied": ["model.bias=false", "model.tie_embeddings=true", "model.num_kv_heads=3"]}


def write_random_ckpt(root, overrides: list[str], std: float = 0.1):
    """write_ckpt, with every parameter redrawn (biases and norm gains too, which start at 0 and 1)."""
    from megalite.checkpoint import save_checkpoint
    from megalite.config import save_config
    from megalite.tensor_parallel import shard_metadata

    cfg, model = write_ckpt(root, overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if "norm" in name else 0.0))
        model.blocks[-1].output is None or model.blocks[-1].output.weight[cfg.model.vocab_size:].zero_()
        model.blocks[0].word.weight[cfg.model.vocab_size:].zero_()  # padding rows stay zero
    save_checkpoint(root, 1, 0, {"model": model.state_dict(), "shards": shard_metadata(model, 1),
                                 "layout": {"tp": 1, "pp": 1, "world_size": 1, "virtual_stages": 1}})
    save_config(cfg, root / "config.yaml")
    return cfg, model


def gpt2_logits(hf_dir, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        return model(tokens).logits  # [b, s, V]


@pytest.mark.parametrize("style", list(STYLES))
def test_gpt2_export_logit_parity(tmp_path, style):
    cfg, model = write_random_ckpt(tmp_path / "ckpt", GPT2 + STYLES[style])
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["architectures"] == ["GPT2LMHeadModel"] and conf["tie_word_embeddings"] == cfg.model.tie_embeddings
    tokens = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    got = gpt2_logits(tmp_path / "hf", tokens)
    assert got.shape == (2, 32, 100)
    assert_close(got, ours(model, tokens), RTOL, ATOL_FRAC, f"{style} GPT-2 logits")


def test_gpt2_round_trip_through_tp2_is_identical(tmp_path):
    write_random_ckpt(tmp_path / "ckpt", GPT2 + STYLES["mha-bias-tied"])
    export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=30_000)
    import_hf(tmp_path / "hf", tmp_path / "back", ["parallel.tp=2"])
    original, back = (consolidate_fp32(p, strip_padding=True) for p in (tmp_path / "ckpt", tmp_path / "back"))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    export_hf(tmp_path / "back", tmp_path / "hf2")
    first, again = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "hf2")
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_gpt2_greedy_generate_matches_transformers(tmp_path):
    from megalite.generate import generate, load_model

    write_random_ckpt(tmp_path / "ckpt", GPT2 + STYLES["gqa-bias-untied"], std=2.0)  # varied tokens
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    model, _ = load_model(tmp_path / "ckpt")
    prompt = [5, 17, 42, 99]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(model, prompt, 20) == want and len(set(want)) > 3


def test_gpt2_124m_preset_maps_onto_gpt2_shapes():
    """The full-size preset, on the meta device: every exported name and shape is GPT2LMHeadModel's."""
    from megalite.checkpoint import hf_gpt2
    from megalite.config import load_config
    from megalite.model import Transformer

    cfg = load_config("gpt2-124m")
    assert arch_for_model(cfg.model) is hf_gpt2
    with torch.device("meta"):
        state = {k: v[: cfg.model.vocab_size] if v.shape[0] == 50304 else v
                 for k, v in Transformer(cfg.model).state_dict().items()}  # padding stripped, as exported
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_gpt2.hf_config(cfg.model)))
    want = {k: list(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    got = {k: list(v.shape) for k, v in hf_gpt2.to_hf(state, cfg.model)}
    assert got == want
    assert (hf.config.n_embd, hf.config.n_layer, hf.config.n_head, hf.config.vocab_size) == (768, 12, 12, 50257)


def test_gpt2_import_refuses_what_megalite_cannot_compute(tmp_path):
    write_ckpt(tmp_path / "ckpt", GPT2 + STYLES["mha-bias-tied"])
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    conf = json.loads(path.read_text())
    for key, value in (("activation_function", "gelu"), ("scale_attn_by_inverse_layer_idx", True),
                       ("architectures", ["GPTNeoXForCausalLM"])):
        path.write_text(json.dumps({**conf, key: value}))
        with pytest.raises(CheckpointError, match=key if key != "architectures" else "GPTNeoXForCausalLM"):
            import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
