"""Generation: the KV-cached decode equals the full forward and transformers' greedy generate."""
import pytest
import torch

from megalite.checkpoint.hf import export_hf
from megalite.cli import main
from megalite.config import load_config
from megalite.generate import _next_logits, generate, load_model, sample
from megalite.model import Transformer
from megalite.model.blocks import KVCache

# a large init spreads the logits, so greedy decoding of a random model does not just repeat one token
LLAMA = ["model.vocab_size=100", "model.hidden_size=48", "model.num_layers=2", "model.num_heads=6",
         "model.num_kv_heads=2", "model.max_seq_len=48", "model.init_std=0.4"]
GPT2 = ["model.vocab_size=64", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.norm=layernorm", "model.position=learned", "model.activation=gelu", "model.bias=true",
        "model.max_seq_len=32", "model.init_std=0.4"]


@pytest.fixture
def llama_ckpt(tmp_path):
    from checkpoint.test_hf import write_ckpt

    write_ckpt(tmp_path / "ckpt", LLAMA)
    return tmp_path / "ckpt"


@pytest.mark.parametrize("overrides", [LLAMA, GPT2], ids=["llama", "gpt2-style"])
def test_cached_logits_equal_full_forward(overrides):
    model = Transformer(load_config("tiny", overrides).model, seed=5).eval()
    tokens = torch.randint(0, 60, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)[:, 0, : model.cfg.vocab_size]  # [s, V]
    caches = [KVCache() for _ in range(model.cfg.num_layers)]
    steps = [_next_logits(model, tokens[:, :7], caches)]  # prompt of 7, then one token at a time
    steps += [_next_logits(model, tokens[:, i:i + 1], caches) for i in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps), full[6:], atol=1e-4, rtol=1e-5)  # fp32 sum order


def test_greedy_equals_transformers_generate(llama_ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    export_hf(llama_ckpt, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    model, _ = load_model(llama_ckpt)
    prompt = [3, 14, 15, 92, 65]
    ours = generate(model, prompt, max_new_tokens=30)
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == want
    assert len(set(ours)) > 3  # a non-trivial continuation


def test_sampling_is_seeded_and_filtered(llama_ckpt):
    model, _ = load_model(llama_ckpt)
    prompt = [1, 2, 3]
    greedy = generate(model, prompt, 12)
    a = generate(model, prompt, 12, temperature=1.0, seed=7)
    assert a == generate(model, prompt, 12, temperature=1.0, seed=7)
    assert a != generate(model, prompt, 12, temperature=1.0, seed=8)
    assert generate(model, prompt, 12, temperature=1.0, top_k=1, seed=7) == greedy
    assert generate(model, prompt, 12, temperature=1.0, top_p=1e-6, seed=7) == greedy


def test_sample_filters_keep_only_allowed_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert picks == {1, 2}
    picks = {int(sample(logits, 1.0, top_p=0.5, generator=gen)) for _ in range(200)}
    assert picks <= {1, 2} and 1 in picks


def test_stops_at_eod_and_checks_length(llama_ckpt):
    model, _ = load_model(llama_ckpt)
    first = generate(model, [4, 5], 5)
    assert generate(model, [4, 5], 5, eod=first[1]) == first[:2]
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [4, 5], 47)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [100], 1)


def test_cli_generate(llama_ckpt, capsys):
    model, _ = load_model(llama_ckpt)
    want = generate(model, [7, 8, 9], 6)
    assert main(["generate", str(llama_ckpt), "--prompt", "7 8 9", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in [7, 8, 9] + want]
