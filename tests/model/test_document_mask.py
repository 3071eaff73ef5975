"""data.reset_attention_mask end to end: packed documents do not see each other, at every layout.

Positions are not reset at document starts (see megalite/kernels/attention.py).
With rotary positions attention depends only on relative positions, so a
document inside a packed sample must give the logits it gives alone, to
float rounding of the rotations at other angles: rtol 1e-5 with a floor of
1e-5 * max|logit| (tests/tolerance.py; measured max|diff| 2.6e-7 of max|logit|).
With learned absolute positions only the first document, whose positions are
the same either way, is compared (likewise). tp=2 with sequence parallelism vs
tp=1: rtol 1e-5 / atol 1e-5 * max|logit|. Trainer loss curves pp=2 vs pp=1:
rel 2e-4 as in tests/pipeline/test_pipeline_parallel.py.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megalite.config import ModelConfig, load_config
from megalite.data.documents import document_ids
from megalite.data.indexed import IndexedDatasetWriter
from megalite.model import Transformer
from megalite.topology import ProcessGroups
from megalite.train import Trainer, build_groups
from tests.tolerance import assert_close
from tests.training_helpers import step_metrics, tiny_overrides

VOCAB, EOD = 64, 0
LLAMA = ModelConfig(vocab_size=VOCAB, pad_vocab_to=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_seq_len=24)
GPT2 = replace(LLAMA, num_kv_heads=None, norm="layernorm", position="learned", activation="gelu",
               tie_embeddings=True, bias=True)


def _packed(b=2, s=24, seed=0):
    """Random tokens [b, s] (never EOD) with EODs ending documents at a few places per sample."""
    tokens = torch.randint(1, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))
    tokens[0, [4, 11, 12]] = EOD  # documents of 5, 7, 1 and 11 tokens
    tokens[1, [0, 16]] = EOD  # 1, 16, 7
    return tokens


def _documents(row: torch.Tensor) -> list[tuple[int, int]]:
    ends = [i + 1 for i, t in enumerate(row.tolist()) if t == EOD]
    bounds = [0] + [e for e in ends if e < len(row)] + [len(row)]
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def test_every_document_gives_its_logits_alone_with_rope():
    model, tokens = Transformer(LLAMA, seed=1).eval(), _packed()
    packed = model(tokens, document_ids(tokens, EOD))  # [s, b, Vp]
    plain = model(tokens)
    for i in range(tokens.shape[0]):
        for start, end in _documents(tokens[i]):
            alone = model(tokens[i:i + 1, start:end])  # [len, 1, Vp]
            # rotations at other absolute angles round differently: a few fp32 ulps through two layers
            # (measured max|diff| 6e-8 on logits of order 1); rtol = atol_frac = 1e-5 leaves >= 100x
            assert_close(packed[start:end, i:i + 1, :VOCAB], alone[..., :VOCAB], rtol=1e-5, atol_frac=1e-5,
                         what=f"sample {i} document {start}:{end}")
    assert not torch.allclose(packed[5:, 0, :VOCAB], plain[5:, 0, :VOCAB], atol=1e-3)  # the mask matters


@torch.no_grad()
def test_first_document_unchanged_and_mask_confines_later_ones_with_learned_positions():
    model, tokens = Transformer(GPT2, seed=1).eval(), _packed()
    packed = model(tokens, document_ids(tokens, EOD))
    # same positions, same rows; only the attention kernel's masked-key tiling may differ: fp32 ulps
    assert_close(packed[:5, :1, :VOCAB], model(tokens[:1, :5])[..., :VOCAB], rtol=1e-5, atol_frac=1e-5,
                 what="first document")
    # changing an earlier document must not move a later one's logits
    other = tokens.clone()
    other[0, :4] = (other[0, :4] % (VOCAB - 1)) + 1
    moved = model(other, document_ids(other, EOD))
    assert_close(moved[5:, 0], packed[5:, 0], rtol=1e-5, atol_frac=1e-5, what="later documents")  # as above
    assert not torch.allclose(model(other)[5:, 0], model(tokens)[5:, 0], atol=1e-3)


def test_activation_checkpointing_carries_the_document_mask():
    tokens, grads = _packed(), []
    for ckpt in (False, True):
        model = Transformer(LLAMA, activation_checkpointing=ckpt, seed=1)
        model.loss(tokens[:, :-1], tokens[:, 1:], document_ids(tokens[:, :-1], EOD)).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        # recomputation runs the same kernels; only autograd's order of summing a tensor's uses may differ
        # (fp32 ulps): rtol 1e-5, atol 1e-5 * max|grad| for elements that cancel to ~0
        assert_close(grads[1][name], g, rtol=1e-5, atol_frac=1e-5, what=name)


# ----------------------------------------------------- tensor parallel
def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


@torch.no_grad()
def _tp_logits(sequence_parallel: bool) -> torch.Tensor:
    tokens = _packed()
    model = Transformer(LLAMA, tp_group=dist.group.WORLD, sequence_parallel=sequence_parallel, seed=1).eval()
    return _gather(model(tokens, document_ids(tokens, EOD)), -1)[..., :VOCAB]


@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_logits_equal_single_process(sp, spawn):
    tokens = _packed()
    with torch.no_grad():
        want = Transformer(LLAMA, seed=1).eval()(tokens, document_ids(tokens, EOD))[..., :VOCAB]
    for got in spawn(_tp_logits, 2, sp):
        # fp32, split inner dims summed as partial products + all-reduce: a few ulps per matmul; rtol 1e-5
        # and atol 1e-5 * max|logit| leave ~100x, a misplaced shard (>= 1e-2 relative) fails
        assert_close(got, want, rtol=1e-5, atol_frac=1e-5, what=f"tp2 sp={sp} logits")


# ---------------------------------------------------- trainer, pipeline
@pytest.fixture(scope="module")
def eod_corpus(tmp_path_factory):
    """(data prefix, tokenizer.json) of short counting documents each ended by EOD (id 0 = '</s>')."""
    from tokenizers import Tokenizer, models

    root = tmp_path_factory.mktemp("eod_corpus")
    vocab = {"</s>": EOD, "<unk>": 1, **{f"w{i}": i for i in range(2, 128)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(root / "tokenizer.json"))
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(root / "docs_text_document", np.uint16) as w:
        for _ in range(200):
            start, n = rng.integers(1, 127), rng.integers(3, 20)
            w.add_document(np.append(1 + (start + np.arange(n)) % 127, EOD))
    return str(root / "docs_text_document"), str(root / "tokenizer.json")


def _train(prefix, tokenizer, run_dir, reset: bool, pp: int = 1) -> dict | None:
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=3, **{
        "data.tokenizer_type": "HuggingFaceTokenizer", "data.tokenizer_model": tokenizer,
        "data.reset_attention_mask": str(reset).lower(), "parallel.pp": pp, "checkpoint.interval": 0}))
    groups = build_groups(cfg, dist.get_world_size()) if dist.is_initialized() else ProcessGroups.single()
    trainer = Trainer(cfg, groups)
    assert trainer.eod == (EOD if reset else None)
    trainer.fit()
    return step_metrics(run_dir) if trainer.rank == 0 else None


def test_trainer_masks_documents_and_pipeline_stages_agree(eod_corpus, tmp_path, spawn):
    prefix, tokenizer = eod_corpus
    plain = _train(prefix, tokenizer, tmp_path / "plain", reset=False)
    masked = _train(prefix, tokenizer, tmp_path / "masked", reset=True)
    assert abs(masked[1] - plain[1]) > 1e-4  # documents no longer see each other: a different loss
    piped = spawn(_train, 2, prefix, tokenizer, str(tmp_path / "pp2"), True, 2)[0]
    assert piped.keys() == masked.keys()
    for step, loss in masked.items():
        assert piped[step] == pytest.approx(loss, rel=2e-4), step


def test_reset_attention_mask_without_a_tokenizer_names_the_fix():
    from megalite.config import ConfigError, DataConfig
    from megalite.train import document_eod

    assert document_eod(DataConfig()) is None
    with pytest.raises(ConfigError, match="set data.tokenizer_model"):
        document_eod(DataConfig(reset_attention_mask=True))
