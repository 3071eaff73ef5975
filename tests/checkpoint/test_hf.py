"""Hugging Face export/import: round trips are exact, logits match transformers' LlamaForCausalLM.

Logit parity tolerance: fp32, rtol 1e-5 with a floor of 1e-5 * max|logit|
(tests/tolerance.py; observed max|diff| ~1e-7 of max|logit|: both sides compute
RMSNorm, rotate-half rotary and SDPA in fp32 on the same weights, in another order).
"""
import json
from pathlib import Path

import pytest
import torch

from megalite.checkpoint import CheckpointError, save_checkpoint
from megalite.checkpoint.consolidate import consolidate_fp32
from megalite.checkpoint.hf import export_hf, import_hf, write_safetensors
from megalite.config import load_config, save_config
from megalite.model import Transformer
from megalite.tensor_parallel import shard_metadata
from tests.tolerance import assert_close

transformers = pytest.importorskip("transformers")
_TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


def main(argv: list[str]) -> int:
    """tools/convert_checkpoint.py's main, run in this process (the tool is a script, not a module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)
RTOL, ATOL_FRAC = 1e-5, 1e-5  # two fp32 implementations of the same math: ulps (~1e-7), a wrong weight ~1e-1
# a random Llama-style shape: GQA 3:1, untied, vocabulary not a multiple of the padding, non-default theta
RANDOM_LLAMA = ["model.vocab_size=100", "model.hidden_size=48", "model.num_layers=2", "model.num_heads=6",
                "model.num_kv_heads=2", "model.ffn_hidden_size=80", "model.rope_theta=500000",
                "model.max_seq_len=64", "model.norm_eps=1e-6"]
TIED_MHA = ["model.vocab_size=70", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
            "model.tie_embeddings=true", "model.max_seq_len=32"]


def write_ckpt(root: Path, overrides: list[str], seed: int = 3):
    """A native tp=1 checkpoint of a randomly initialised model, with config.yaml in its root."""
    cfg = load_config("tiny", overrides)
    model = Transformer(cfg.model, seed=seed).eval()
    save_checkpoint(root, 0, 0, {"model": model.state_dict(), "shards": shard_metadata(model, 1),
                                 "layout": {"tp": 1, "pp": 1, "world_size": 1, "virtual_stages": 1}})
    save_config(cfg, root / "config.yaml")
    return cfg, model


def hf_logits(hf_dir, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        return model(tokens).logits  # [b, s, V]


def ours(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[..., : model.cfg.vocab_size].transpose(0, 1)  # [s, b, Vp] -> [b, s, V]


@pytest.mark.parametrize("overrides", [[], RANDOM_LLAMA, TIED_MHA], ids=["tiny-preset", "random-gqa", "tied-mha"])
def test_export_logit_parity(tmp_path, overrides):
    cfg, model = write_ckpt(tmp_path / "ckpt", overrides)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["vocab_size"] == cfg.model.vocab_size and conf["architectures"] == ["LlamaForCausalLM"]
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert_close(hf_logits(tmp_path / "hf", tokens), ours(model, tokens), RTOL, ATOL_FRAC, "HF logits")


@pytest.mark.parametrize("overrides", [RANDOM_LLAMA, TIED_MHA], ids=["random-gqa", "tied-mha"])
def test_round_trip_identical_at_other_layouts(tmp_path, overrides):
    write_ckpt(tmp_path / "ckpt", overrides)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=40_000)  # forces several shards
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    original = consolidate_fp32(tmp_path / "ckpt", strip_padding=True)
    for layout in (["parallel.tp=1"], ["parallel.tp=2", "parallel.pp=2"]):
        out = tmp_path / ("back" + "_".join(layout))
        import_hf(tmp_path / "hf", out, layout)
        back = consolidate_fp32(out, strip_padding=True)
        assert sorted(back) == sorted(original)
        for name, tensor in original.items():
            assert torch.equal(back[name], tensor), name
        export_hf(out, tmp_path / ("hf" + out.name))  # and out again, from the tp/pp layout
        again = hf_tensors(tmp_path / ("hf" + out.name))
        first = hf_tensors(tmp_path / "hf")
        assert sorted(again) == sorted(first) and all(torch.equal(again[k], first[k]) for k in first)


def hf_tensors(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_import_resumes_in_trainer(tmp_path, counting_data):
    from megalite.topology import ProcessGroups
    from megalite.train import Trainer
    from tests.training_helpers import tiny_overrides

    write_ckpt(tmp_path / "ckpt", ["model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2",
                                   "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_len=32"])
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported")
    run = tmp_path / "run"
    extra = {"train.resume": str(tmp_path / "imported"), "model.ffn_hidden_size": 256, "model.norm_eps": 1e-5}
    cfg = load_config(str(tmp_path / "imported" / "config.yaml"),
                      tiny_overrides(counting_data, run, steps=1, **extra))
    trainer = Trainer(cfg, ProcessGroups.single())
    trainer.maybe_resume()
    full = consolidate_fp32(tmp_path / "ckpt")
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, full[name]), name
    assert trainer.fit()["loss"] > 0


def test_import_tp2_logits_match_transformers(tmp_path, spawn):
    conf = transformers.LlamaConfig(vocab_size=90, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    tie_word_embeddings=False, rope_theta=20000.0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(conf).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(tmp_path / "hf", tmp_path / "ckpt", ["parallel.tp=2"])
    tokens = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
    for got in spawn(tp_logits, 2, str(tmp_path / "ckpt"), tokens):
        assert_close(got, want, RTOL, ATOL_FRAC, "tp=2 logits of the import")


def tp_logits(ckpt: str, tokens: torch.Tensor) -> torch.Tensor:
    """On each of 2 gloo ranks: the tp=2 model from the imported checkpoint, full logits [b, s, V]."""
    import torch.distributed as dist

    from megalite.checkpoint import load_checkpoint
    from megalite.topology import ProcessGroups, Topology

    cfg = load_config(str(Path(ckpt) / "config.yaml"))
    groups = ProcessGroups.build(Topology.from_world(2, tp=2))
    model = Transformer(cfg.model, tp_group=groups.tp_group).eval()
    model.load_state_dict(load_checkpoint(ckpt, dist.get_rank())["model"])
    with torch.no_grad():
        local = model(tokens)  # [s, b, Vp/2]
    parts = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(parts, local, group=groups.tp_group)
    return torch.cat(parts, dim=-1)[..., : cfg.model.vocab_size].transpose(0, 1)


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_refusals_write_nothing(tmp_path):
    write_ckpt(tmp_path / "ckpt", TIED_MHA)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    before = _listing(tmp_path)
    # Llama norm and MLP with learned positions: neither LlamaForCausalLM nor GPT2LMHeadModel computes it
    write_ckpt(tmp_path / "mixed", TIED_MHA + ["model.position=learned"])
    with pytest.raises(CheckpointError, match=r"model\.position='rope' \(not 'learned'\).*"
                                              r"model\.norm='layernorm' \(not 'rmsnorm'\)"):
        export_hf(tmp_path / "mixed", tmp_path / "mixed_hf")
    assert not (tmp_path / "mixed_hf").exists() and not (tmp_path / "mixed_hf.tmp").exists()
    before = _listing(tmp_path)
    with pytest.raises(CheckpointError, match="not empty"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    before = _listing(tmp_path)
    conf_path = tmp_path / "hf" / "config.json"
    conf = json.loads(conf_path.read_text())
    conf_path.write_text(json.dumps({**conf, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}))
    with pytest.raises(CheckpointError, match="MixtralForCausalLM"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    conf_path.write_text(json.dumps({**conf, "num_hidden_layers": 3}))  # a layer's tensors are missing
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\..* is missing"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    conf_path.write_text(json.dumps({**conf, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match="gate_proj.weight' has shape"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    weights = tmp_path / "hf" / "model.safetensors"
    conf_path.write_text(json.dumps(conf))
    weights.write_bytes(weights.read_bytes()[:-100])  # cut short: its header promises bytes that are gone
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable .* outside the file"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert _listing(tmp_path) == before  # no output, no leftover .tmp


def test_max_shard_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max shard size"):
        write_safetensors([("a", torch.zeros(2))], tmp_path, 0)


def test_sentencepiece_tokenizer_exported_for_autotokenizer(tmp_path):
    import random

    from megalite.data.tokenizer import build_tokenizer, train_sentencepiece

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world 123 tokens".split()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(20))}) + "\n"
                              for _ in range(200)))
    sp_model = train_sentencepiece([str(corpus)], str(tmp_path / "sp"), vocab_size=120, num_threads=1)
    write_ckpt(tmp_path / "ckpt", TIED_MHA[1:] + ["model.vocab_size=120", f"data.tokenizer_model={sp_model}"])
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = build_tokenizer("SentencePieceTokenizer", sp_model)
    for text in ["the quick fox 2024", " hello  world\n dog", "  lead space", "\u00e9\u00e9x y",
                 " ".join(rng.choice(words + ["", "\n", "\u00fc"]) for _ in range(30))]:
        ids = auto.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), text
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (conf["eos_token_id"], conf["bos_token_id"]) == (ours.eod, ours.bos) == (auto.eos_token_id, 1)


def _word_tokenizer(directory: Path, words: list[str], eos: str | None) -> None:
    """A `tokenizers` WordLevel tokenizer.json (+ tokenizer_config.json naming its eos) in `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos} if eos else {}))


def test_from_hf_uses_the_models_tokenizer_as_is_and_prints_the_command(tmp_path, capsys):
    write_ckpt(tmp_path / "ckpt", TIED_MHA)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf, out = tmp_path / "hf", tmp_path / "back"
    _word_tokenizer(hf, ["<unk>", "</s>", "the", "quick", "fox"], "</s>")
    original = (hf / "tokenizer.json").read_bytes()
    assert main(["from-hf", str(hf), str(out), "parallel.tp=2"]) == 0
    report = capsys.readouterr().out
    assert f"found LlamaForCausalLM in {hf}: " in report and "vocabulary 70 (padded to 128 at tp=2)" in report
    assert f"wrote {out}: step 0, fresh optimizer, tp=2 x pp=1 x dp=1 (2 rank files)" in report
    assert (f"torchrun --nproc_per_node 2 -m megalite train {out / 'config.yaml'} train.resume={out} "
            "data.path=[PREFIX]") in report
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.data.tokenizer_type == "HuggingFaceTokenizer"
    assert cfg.data.tokenizer_model == str(out.resolve() / "tokenizer")
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == original
    from megalite.data.tokenizer import build_tokenizer

    assert build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model).encode("the fox") == [2, 4]
    assert main(["to-hf", str(out), str(tmp_path / "again"), "--arch", "MistralForCausalLM"]) == 0
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == original  # written back unchanged
    assert json.loads((tmp_path / "again" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    assert main(["to-hf", str(out), str(tmp_path / "bad"), "--arch", "GemmaForCausalLM"]) == 2
    _word_tokenizer(hf, ["<unk>", "the"], None)  # no end-of-document token: refused before anything is written
    with pytest.raises(CheckpointError, match="tokenizer.json cannot tokenize for training.*end-of-document"):
        import_hf(hf, tmp_path / "refused")
    _word_tokenizer(hf, [f"w{i}" for i in range(71)] + ["</s>"], "</s>")
    with pytest.raises(CheckpointError, match="has 72 tokens but config.json vocab_size=70"):
        import_hf(hf, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def _train_tp2(overrides: list[str]) -> None:
    import torch.distributed as dist

    from megalite.train import Trainer, build_groups

    cfg = load_config("tiny", overrides)
    Trainer(cfg, build_groups(cfg, dist.get_world_size())).fit()


def test_export_of_trained_tp2_checkpoint(tmp_path, spawn, counting_data):
    """A checkpoint the Trainer wrote at tp=2 exports to the model that megalite's tp=1 reload computes."""
    from megalite.generate import load_model
    from tests.training_helpers import tiny_overrides

    run = tmp_path / "run"
    spawn(_train_tp2, 2, tiny_overrides(counting_data, run, steps=2, **{"parallel.tp": 2}))
    assert main(["to-hf", str(run / "checkpoints"), str(tmp_path / "hf")]) == 0
    model, cfg = load_model(run / "checkpoints")
    tokens = torch.arange(20).reshape(1, 20)
    assert_close(hf_logits(tmp_path / "hf", tokens), ours(model, tokens), RTOL, ATOL_FRAC, "HF logits")
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "back"), "parallel.tp=4"]) == 2  # 2 kv heads
    assert not (tmp_path / "back").exists()
