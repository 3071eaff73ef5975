"""Import and export of Mixture-of-Experts models (MixtralForCausalLM, Qwen3MoeForCausalLM), checked
against transformers' own classes.

Each model is a small random fp32 one built with transformers' config and model class and saved
with save_pretrained (per-expert tensor names on disk). Tolerance: rtol 1e-5 with a floor of
1e-5 * max|logit| (tests/tolerance.py), as tests/checkpoint/test_hf_families: the same fp32 math
on the same weights in another order differs by ulps; a swapped gate/up row, a wrong expert or a
missing renormalisation shows at ~1e-2 and more. The router weights are redrawn at std 1 (HF's
init, std 0.02, leaves near-ties between experts that an ulp could flip), so every token's top k
is well separated and both sides pick the same experts.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from megalite.checkpoint import CheckpointError
from megalite.checkpoint.hf import export_hf, import_hf
from megalite.config import load_config
from tests.checkpoint.test_hf import ours, write_ckpt
from tests.checkpoint.test_hf_families import assert_same_tensors
from tests.checkpoint.test_hf_train_parity import assert_split_import_trains_as_one
from tests.tolerance import assert_close
from tests.training_helpers import VOCAB

transformers = pytest.importorskip("transformers")
RTOL, ATOL_FRAC, STEPS = 1e-5, 1e-5, 2
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, tie_word_embeddings=False, num_experts_per_tok=2)
# family -> (transformers class prefix, config keys): experts of 24, Qwen3-MoE's dense layers of 40 and
# head_dim 16 != 32 / 4; which layers are MoE: all (Mixtral), all but the first, every second
FAMILIES = {
    "mixtral": ("Mixtral", dict(num_hidden_layers=2, intermediate_size=24, num_local_experts=4)),
    "mixtral-window-8": ("Mixtral", dict(num_hidden_layers=2, intermediate_size=24, num_local_experts=4,
                                         sliding_window=8)),
    "qwen3-moe-first-dense": ("Qwen3Moe", dict(num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=24,
                                               num_experts=4, head_dim=16, mlp_only_layers=[0])),
    "qwen3-moe-every-2-norm-topk": ("Qwen3Moe", dict(num_hidden_layers=4, intermediate_size=40,
                                                     moe_intermediate_size=24, num_experts=4, head_dim=16,
                                                     decoder_sparse_step=2, norm_topk_prob=True)),
}
LAYERS = {"mixtral": (1, 0), "mixtral-window-8": (1, 0), "qwen3-moe-first-dense": (1, 1),
          "qwen3-moe-every-2-norm-topk": (2, 0)}  # model.moe_every, moe_first_dense the import sets


def random_moe(family: str):
    """A random fp32 transformers MoE model: norm gains drawn around 1, routers at std 1 (see the module doc)."""
    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**SHAPE, **extra))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.normal_(1, 0.3)
            elif pname.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
    return model.eval()


def tokens(batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def assert_parity(ckpt, hf_model) -> None:
    """megalite's logits and loss from the checkpoint at `ckpt` equal transformers' on the same tokens."""
    from megalite.generate import load_model

    model, _ = load_model(ckpt)
    x = tokens()
    with torch.no_grad():
        want = hf_model(x, labels=x)  # HF shifts: logits at 0..s-2 predict tokens 1..s-1
        loss = model.loss(x[:, :-1], x[:, 1:]).mean()
    assert_close(ours(model, x), want.logits, RTOL, ATOL_FRAC, "logits")
    assert_close(loss, want.loss, RTOL, ATOL_FRAC, "loss")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_parity_and_round_trip(tmp_path, family):
    """Import: megalite computes transformers' logits and loss; export: the very same safetensors, and a
    config.json from which transformers builds the same model (routing, window and MoE layers included)."""
    hf = random_moe(family)
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    m = load_config(str(tmp_path / "ckpt" / "config.yaml")).model
    assert (m.moe_num_experts, m.moe_top_k, m.moe_ffn_hidden_size) == (4, 2, 24)
    assert (m.moe_every, m.moe_first_dense) == LAYERS[family]
    assert m.attention_window == hf.config.sliding_window
    assert m.moe_norm_topk_prob == (family != "qwen3-moe-first-dense")  # Mixtral always; Qwen3-MoE as configured
    assert_parity(tmp_path / "ckpt", hf)
    export_hf(tmp_path / "ckpt", tmp_path / "back")
    assert_same_tensors(tmp_path / "hf", tmp_path / "back")
    conf = json.loads((tmp_path / "back" / "config.json").read_text())
    assert conf["architectures"] == hf.config.architectures
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(again(x).logits, hf(x).logits)


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe-first-dense"])
def test_fused_expert_names_are_read(tmp_path, family):
    """A file written from transformers 5's in-memory state_dict as is (experts fused into gate_up_proj
    [E, 2f, h], gate rows first, and down_proj; Mixtral's block named mlp) imports to the same model."""
    hf = random_moe(family)
    hf.save_pretrained(str(tmp_path / "hf"))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state  # what the in-memory layout is
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert_parity(tmp_path / "ckpt", hf)


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe-first-dense"])
def test_import_at_tp2_pp2_trains_as_one_process(family, tmp_path, spawn, counting_data):
    """At tp=2 x pp=2 the experts are whole on both tp ranks (replicated), attention and Qwen3-MoE's dense
    layer cut; its first steps' loss and grad norm are the one-process import's (fp32, rel 1e-5 as
    tests/checkpoint/test_hf_train_parity)."""
    random_moe(family).save_pretrained(str(tmp_path / "hf"))
    assert_split_import_trains_as_one(tmp_path, spawn, counting_data, steps=STEPS)


def test_qwen2_moe_refused_saying_why(tmp_path):
    conf = transformers.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       num_experts=4, moe_intermediate_size=8, shared_expert_intermediate_size=8)
    transformers.Qwen2MoeForCausalLM(conf).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"Qwen2MoeForCausalLM is not supported: .*sigmoid gate"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_inexpressible_moe_layers_refused_by_name(tmp_path):
    random_moe("qwen3-moe-first-dense").save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "mlp_only_layers": [1]}))  # MoE, dense, MoE, MoE
    with pytest.raises(CheckpointError, match=r"mlp_only_layers=\[1\] makes layers \[0, 2, 3\] .*cannot express"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


MOE = ["model.vocab_size=100", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
       "model.max_seq_len=32", "model.moe_num_experts=4", "model.moe_ffn_hidden_size=16"]


@pytest.mark.parametrize("extra, message", [
    (["model.moe_shared_experts=1"], r"MixtralForCausalLM needs .*model\.moe_shared_experts=0 \(not 1\)"),
    (["model.moe_router=sigmoid"], r"Qwen3MoeForCausalLM needs .*model\.moe_router='softmax' \(not 'sigmoid'\)"),
    (["model.norm=layernorm", "model.position=learned", "model.activation=gelu"],
     r"GPT2LMHeadModel needs .*model\.moe_num_experts=0 \(not 4\)"),
], ids=["shared-experts", "sigmoid-router", "gpt2-style"])
def test_export_refuses_what_no_architecture_holds(tmp_path, extra, message):
    write_ckpt(tmp_path / "ckpt", MOE + extra)
    with pytest.raises(CheckpointError, match=message):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_picks_the_moe_architecture(tmp_path):
    """Every layer MoE without q/k norm is Mixtral; with q/k norm, or dense first layers, Qwen3-MoE; naming a
    dense architecture for an MoE model is refused."""
    from megalite.checkpoint.hf import arch_for_model

    for extra, arch in (([], "MixtralForCausalLM"), (["model.qk_norm=true"], "Qwen3MoeForCausalLM"),
                        (["model.qk_norm=true", "model.moe_first_dense=1"], "Qwen3MoeForCausalLM")):
        assert arch_for_model(load_config("tiny", MOE + extra).model).ARCH == arch
    with pytest.raises(CheckpointError, match=r"model\.moe_num_experts=4: LlamaForCausalLM needs"):
        arch_for_model(load_config("tiny", MOE).model, "LlamaForCausalLM")


def test_import_at_ep2_gives_each_expert_parallel_rank_its_experts(tmp_path):
    from megalite.checkpoint import load_checkpoint
    from megalite.checkpoint.reader import CheckpointReader

    random_moe("mixtral").save_pretrained(str(tmp_path / "hf"))
    whole = CheckpointReader(import_hf(tmp_path / "hf", tmp_path / "ep1"))
    split = import_hf(tmp_path / "hf", tmp_path / "ep2", ["parallel.ep=2", "parallel.dp=2"])
    halves = [load_checkpoint(split, rank)["model"]["blocks.1.mlp.fc1"] for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), whole.read("blocks.1.mlp.fc1"))  # rank r: experts 2r, 2r+1
    for name in whole.names():
        assert torch.equal(CheckpointReader(split).read(name), whole.read(name)), name
