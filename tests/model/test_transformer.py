"""The decoder: shapes for every variant, training signal, checkpointing, init, padding, tp=2 parity."""
import math
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from megalite.config import ModelConfig, padded_vocab_size, resolved_ffn_hidden_size
from megalite.model import Transformer, matmul_parameters, total_parameters
from megalite.tensor_parallel import sharding_of
from tests.tolerance import assert_close, worst

VOCAB = 40
TINY = ModelConfig(vocab_size=VOCAB, pad_vocab_to=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_seq_len=16)
VARIANTS = {
    "llama-gqa": {},
    "mha-untied": {"num_kv_heads": None},
    "gpt2": {"norm": "layernorm", "position": "learned", "activation": "gelu", "tie_embeddings": True,
             "bias": True, "num_kv_heads": None},
    "rope-tied-layernorm": {"norm": "layernorm", "tie_embeddings": True},
    "learned-swiglu-mqa": {"position": "learned", "num_kv_heads": 1},
    # Qwen-style attention: q/k/v-only bias, per-head q/k RMSNorm, head_dim 16 (4 * 16 != 32), llama3 rotary
    "qwen-style": {"qkv_bias": True, "qk_norm": True, "head_dim": 16, "rope_scaling": "llama3",
                   "rope_scaling_factor": 4.0, "rope_original_max_seq_len": 8},
    # sliding window of 5 on layer 1, layer 2 global (Gemma 2's alternation), over 12-token sequences
    "windowed": {"attention_window": 5, "global_attention_every": 2},
}


def _tokens(b=2, s=12, seed=0):
    return torch.randint(0, VOCAB, (b, s + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_padding_and_backward_for_every_variant(name):
    cfg = replace(TINY, **VARIANTS[name])
    model = Transformer(cfg, seed=1)
    tokens = _tokens()
    logits = model(tokens[:, :-1])
    assert logits.shape == (12, 2, 48)  # [s, b, Vp]: 40 padded to a multiple of 16
    assert torch.isfinite(logits[..., :VOCAB]).all() and (logits[..., VOCAB:] == float("-inf")).all()
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert loss.shape == (2, 12) and loss.dtype == torch.float32
    assert abs(loss.mean().item() - math.log(VOCAB)) < 0.5  # small init: close to uniform over real ids
    loss.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    word = model.blocks[0].word.weight
    assert torch.all(word.grad[VOCAB:] == 0)  # padded rows are never looked up nor predicted


def test_future_tokens_do_not_change_earlier_logits():
    for position in ("rope", "learned"):
        model = Transformer(replace(TINY, position=position), seed=2)
        a = _tokens()[:, :-1]
        b = a.clone()
        b[:, 8:] = (b[:, 8:] + 1) % VOCAB
        la, lb = model(a), model(b)
        # the same rows through the same kernels (bitwise equal here); rtol 1e-5 only absorbs a kernel that
        # tiles the masked keys differently (a few fp32 ulps), while any leak of the future moves logits ~1e-2
        assert_close(la[:8], lb[:8], rtol=1e-5, atol_frac=1e-6, what=f"{position} logits before the change")
        assert not torch.allclose(la[8:], lb[8:])


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = Transformer(TINY, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = _tokens()
    losses = []
    for _ in range(30):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def _loss_and_grads(model, tokens):
    torch.manual_seed(5)  # dropout draws the same masks in both runs
    loss = model.loss(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode, layers", [(True, 0), ("full", 1), ("selective", 0)])
def test_activation_checkpointing_gives_identical_loss_and_grads(mode, layers):
    cfg = replace(TINY, dropout=0.1)
    tokens = _tokens()
    loss, grads = _loss_and_grads(Transformer(cfg, seed=4), tokens)
    model = Transformer(cfg, seed=4, activation_checkpointing=mode, recompute_num_layers=layers)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, tokens)
    assert torch.equal(loss, loss_ckpt)
    for name, g in grads.items():
        # recomputation runs the same kernels (bitwise equal here); only the order autograd sums a tensor's
        # several uses may change, a few fp32 ulps: rtol 1e-6 (~8 ulps), atol 1e-6 * max|grad| for cancellations
        assert_close(grads_ckpt[name], g, rtol=1e-6, atol_frac=1e-6, what=name)


def test_init_is_deterministic_per_seed_and_per_parameter_name():
    a, b, c = Transformer(TINY, seed=7), Transformer(TINY, seed=7), Transformer(TINY, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.1.attn.qkv.weight"], sc["blocks.1.attn.qkv.weight"])
    # a deeper model draws the same first blocks: streams are keyed by name, not by draw order
    deeper = Transformer(replace(TINY, num_layers=3), seed=7).state_dict()
    assert torch.equal(deeper["blocks.1.attn.qkv.weight"], sa["blocks.1.attn.qkv.weight"])
    assert torch.equal(deeper["blocks.0.word.weight"], sa["blocks.0.word.weight"])


def test_output_projections_use_the_scaled_init():
    cfg = replace(TINY, hidden_size=64, num_layers=8, init_std=0.05)
    block = Transformer(cfg, seed=9).blocks[1]
    scaled = 0.05 / math.sqrt(16)
    for w, std in [(block.attn.qkv.weight, 0.05), (block.mlp.fc1.weight, 0.05),
                   (block.attn.proj.weight, scaled), (block.mlp.fc2.weight, scaled)]:
        assert abs(w.std().item() - std) < 0.1 * std


def test_tied_embeddings_share_one_tensor_and_counts_follow_the_rule():
    untied, tied = Transformer(TINY, seed=1), Transformer(replace(TINY, tie_embeddings=True), seed=1)
    word = tied.blocks[0].word.weight
    assert tied.blocks[-1].weight is word
    head_rows = untied.blocks[-1].output.weight.numel()
    assert tied.num_parameters() == untied.num_parameters() - head_rows
    assert total_parameters(TINY) == untied.num_parameters() and total_parameters(tied.cfg) == tied.num_parameters()
    assert matmul_parameters(TINY) == untied.num_parameters() - untied.blocks[0].word.weight.numel()
    assert matmul_parameters(tied.cfg) == tied.num_parameters()  # shared matrix counted once, as the head
    learned = replace(TINY, position="learned")
    assert matmul_parameters(learned) == matmul_parameters(TINY)  # the position table is a lookup too


def test_size_helpers():
    assert padded_vocab_size(TINY, 1) == 48 and padded_vocab_size(TINY, 2) == 64 and padded_vocab_size(TINY, 4) == 64
    assert resolved_ffn_hidden_size(replace(TINY, hidden_size=256)) == 768  # int(8*256/3) = 682 -> 768
    assert resolved_ffn_hidden_size(replace(TINY, hidden_size=4096)) == 11008  # Llama-7B's intermediate_size
    assert resolved_ffn_hidden_size(replace(TINY, activation="gelu")) == 128
    assert resolved_ffn_hidden_size(replace(TINY, ffn_hidden_size=96)) == 96


@pytest.mark.parametrize("hidden", [32, 64, 256])
def test_model_mlp_width_is_the_config_rule(hidden):
    """The built model and validation (resolved_ffn_hidden_size) agree on the SwiGLU width."""
    from megalite.config import resolved_ffn_hidden_size

    cfg = replace(TINY, hidden_size=hidden, num_layers=1)
    mlp = Transformer(cfg, seed=1).blocks[1].mlp
    assert mlp.fc2.weight.shape[1] == resolved_ffn_hidden_size(cfg) == 256 * -(-int(8 * hidden / 3) // 256)
    assert mlp.fc1.weight.shape[0] == 2 * resolved_ffn_hidden_size(cfg)


@pytest.mark.parametrize("change,match", [
    ({"norm": "batchnorm"}, "model.norm='batchnorm'"),
    ({"num_heads": 3}, "not divisible by num_heads=3"),
    ({"num_kv_heads": 3}, "num_kv_heads=3"),
    ({"hidden_size": 24, "num_heads": 8, "num_kv_heads": None}, "even head dim"),
])
def test_bad_config_is_rejected_with_the_rule(change, match):
    with pytest.raises(ValueError, match=match):
        Transformer(replace(TINY, **change))


def test_sequence_longer_than_max_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len=16"):
        Transformer(TINY)(torch.zeros(1, 17, dtype=torch.long))


# ------------------------------------------------------------- tp=2 parity
def _gather(t, dim):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def _tp_parity(change, sp):
    cfg = replace(TINY, **change)
    tokens = _tokens(s=8)
    ref = Transformer(cfg, seed=6)
    ref_loss = ref.loss(tokens[:, :-1], tokens[:, 1:])
    ref_loss.mean().backward()
    model = Transformer(cfg, tp_group=dist.group.WORLD, sequence_parallel=sp, seed=6)
    logits = _gather(model(tokens[:, :-1]), -1)  # [s, b, Vp]
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.mean().backward()
    # fp32, tp=2 sums the split inner dimensions as partial products + an all-reduce: a few ulps of
    # reduction order per matmul, through two layers; measured max|diff| <= 6.2e-7 * max|want| (norm
    # weight grads, sums over tokens that cancel). rtol 1e-5 and atol 1e-5 * max|want| leave >= 15x for
    # another CPU's BLAS order, and a misplaced shard or missing all-reduce (>= 1e-2 relative) fails by 1000x
    rtol, atol_frac = 1e-5, 1e-5
    errors = {"logits": worst(logits[..., :VOCAB], ref(tokens[:, :-1])[..., :VOCAB], rtol, atol_frac, "logits"),
              "loss": worst(loss, ref_loss, rtol, atol_frac, "loss")}
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad, want = p.grad, ref_params[name].grad
        if sharding_of(p).partition_dim is not None:
            grad = _gather(grad, sharding_of(p).partition_dim)
        if sharding_of(p).sequence_parallel:
            dist.all_reduce(grad)  # partial: each rank saw its own chunk of the sequence
        if grad.shape != want.shape:  # vocab padding depends on tp: compare the real rows
            grad, want = grad[:VOCAB], want[:VOCAB]
        errors[name] = worst(grad, want, rtol, atol_frac, f"{name} grad")
    return errors


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "qwen-style", "windowed"])
@pytest.mark.parametrize("sp", [False, True])
def test_tp2_matches_tp1_logits_loss_and_gradients(spawn, name, sp):
    for errors in spawn(_tp_parity, 2, VARIANTS[name], sp):
        ratio, message = max(errors.values())
        assert ratio <= 1, message


def test_sliding_window_layers_follow_global_attention_every():
    """Every global_attention_every-th layer attends globally; a window as long as the sequence changes
    nothing, a shorter one changes every later position's logits."""
    cfg = replace(TINY, num_layers=4, attention_window=4, global_attention_every=2)
    model = Transformer(cfg, seed=3)
    assert [model.blocks[str(i)].attn.window for i in range(1, 5)] == [4, None, 4, None]
    plain = Transformer(replace(cfg, attention_window=None, global_attention_every=0), seed=3)
    tokens = _tokens(s=12)[:, :-1]
    assert torch.equal(model(tokens[:, :4]), plain(tokens[:, :4]))  # 4 tokens: the window holds all of them
    windowed, full = model(tokens), plain(tokens)
    assert torch.equal(windowed[:4], full[:4]) and not torch.allclose(windowed[4:], full[4:], atol=1e-4)
    from megalite.config import ConfigError, load_config, validate

    for bad, message in ((["model.global_attention_every=2"], "global_attention_every=2 picks the global layers"),
                         (["model.attention_window=0"], "model.attention_window=0 must be > 0")):
        with pytest.raises(ConfigError, match=message):
            validate(load_config("tiny", bad))


def test_every_layer_shares_one_rotary_table_pair():
    """Tables per layer would cost num_layers x 2 x max_seq_len x head_dim/2 fp32 (2 GiB/rank for
    Llama 3.1 8B at 131072 positions); the model holds one pair, also after moving it."""
    cfg = replace(TINY, num_layers=4, max_seq_len=64)
    model = Transformer(cfg, seed=0).to(torch.float32)
    assert sum(b.numel() * b.element_size() for b in model.buffers()) == 2 * 64 * (32 // 4 // 2) * 4
    tables = {id(model.blocks[str(i)].attn.rotary) for i in range(1, 5)}
    assert len(tables) == 1
