"""Generation: the KV-cached decode equals the full forward and transformers' greedy generate."""
import pytest
import torch

from megalite.checkpoint.hf import export_hf
from megalite.cli import main
from megalite.config import load_config
from megalite.generate import _next_logits, generate, load_model, sample
from megalite.model import Transformer
from megalite.model.blocks import KVCache
from tests.tolerance import assert_close

# a large init spreads the logits, so greedy decoding of a random model does not just repeat one token
LLAMA = ["model.vocab_size=100", "model.hidden_size=48", "model.num_layers=2", "model.num_heads=6",
         "model.num_kv_heads=2", "model.max_seq_len=48", "model.init_std=0.4"]
GPT2 = ["model.vocab_size=64", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.norm=layernorm", "model.position=learned", "model.activation=gelu", "model.bias=true",
        "model.max_seq_len=32", "model.init_std=0.4"]


@pytest.fixture
def llama_ckpt(tmp_path):
    from tests.checkpoint.test_hf import write_ckpt

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
    # fp32, attention over a cache vs one causal pass: the same math in another summation order, a few ulps;
    # rtol 1e-5 with a floor of 1e-5 * max|logit| (the large init makes logits ~10, so not an absolute 1e-4)
    assert_close(torch.cat(steps), full[6:], rtol=1e-5, atol_frac=1e-5, what="cached logits")


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


def test_argument_checks_name_the_value(llama_ckpt):
    model, _ = load_model(llama_ckpt)
    for kwargs, match in (({"temperature": -1.0}, "temperature=-1.0"), ({"top_k": 0}, "top_k=0"),
                          ({"top_p": 1.5}, "top_p=1.5"), ({"max_new_tokens": -2}, "max_new_tokens=-2")):
        with pytest.raises(ValueError, match=match):
            generate(model, [1, 2], **{"max_new_tokens": 3, **kwargs})
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], 3)


def test_cli_sampling_flags_and_eod(llama_ckpt, capsys):
    model, _ = load_model(llama_ckpt)
    want = generate(model, [7, 8], 10, temperature=0.7, top_k=20, top_p=0.8, seed=5)
    args = ["generate", str(llama_ckpt), "--prompt", "7 8", "--max-new-tokens", "10", "--temperature", "0.7",
            "--top-k", "20", "--top-p", "0.8", "--seed", "5"]
    assert main(args) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in [7, 8] + want]
    stop = next(i for i in range(1, len(want)) if want[i] not in want[:i])  # its first appearance
    assert main(args + ["--eod", str(want[stop])]) == 0  # no tokenizer: --eod is the stop id
    assert capsys.readouterr().out.split() == [str(t) for t in [7, 8] + want[:stop + 1]]
    assert main(args + ["--tp", "2"]) == 2  # one process cannot be tp=2
    assert "--nproc_per_node 2" in capsys.readouterr().err


def _tp2_decode(ckpts: list[str], prompt: list[int], cli: list[str]):
    """On each of 2 gloo ranks: greedy and sampled tokens of every checkpoint at tp=2, then the CLI's output."""
    import contextlib
    import io

    from megalite.topology import ProcessGroups, Topology

    tp_group = ProcessGroups.build(Topology.from_world(2, tp=2)).tp_group
    tokens = []
    for ckpt in ckpts:
        model, cfg = load_model(ckpt, tp_group=tp_group)
        assert model.blocks[0].word.weight.shape[0] == model.padded_vocab // 2  # really sharded
        tokens.append((generate(model, prompt, 20),
                       generate(model, prompt, 20, temperature=1.0, top_k=40, top_p=0.95, seed=11)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(cli)
    return tokens, rc, out.getvalue()


def test_tp2_decodes_the_tp1_tokens(llama_ckpt, tmp_path, spawn):
    """tp=2 (vocabulary-parallel logits gathered, kv heads split) gives tp=1's greedy and sampled tokens,
    from a tp=1 checkpoint and from a tp=2 x pp=2 one; `megalite generate` prints on rank 0 only."""
    from megalite.checkpoint.hf import import_hf

    export_hf(llama_ckpt, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "tp2pp2", ["parallel.tp=2", "parallel.pp=2"])
    model, _ = load_model(llama_ckpt)
    prompt = [3, 14, 15, 92, 65]
    greedy = generate(model, prompt, 20)
    sampled = generate(model, prompt, 20, temperature=1.0, top_k=40, top_p=0.95, seed=11)
    assert greedy != sampled and len(set(sampled)) > 5
    cli = ["generate", str(llama_ckpt), "--prompt", "3 14 15 92 65", "--max-new-tokens", "20",
           "--temperature", "1.0", "--top-k", "40", "--top-p", "0.95", "--seed", "11", "--tp", "2"]
    results = spawn(_tp2_decode, 2, [str(llama_ckpt), str(tmp_path / "tp2pp2")], prompt, cli)
    for rank, (tokens, rc, printed) in enumerate(results):
        assert tokens == [(greedy, sampled), (greedy, sampled)], rank
        assert rc == 0
        assert printed.split() == ([str(t) for t in prompt + sampled] if rank == 0 else [])
