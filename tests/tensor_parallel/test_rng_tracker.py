"""The tensor-parallel RNG tracker: per-rank streams for sharded dropout, the default stream elsewhere."""
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from megalite.checkpoint.state import flatten, unflatten
from megalite.config import ModelConfig
from megalite.model import Transformer
from megalite.tensor_parallel.random import TP_SEED_OFFSET, TPRngTracker
from tests.tolerance import worst

CFG = ModelConfig(vocab_size=40, pad_vocab_to=8, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_seq_len=16, dropout=0.2)


def _tokens():
    return torch.randint(0, 40, (2, 17), generator=torch.Generator().manual_seed(0))


def test_fork_draws_from_its_own_stream_and_leaves_the_default_one_alone():
    torch.manual_seed(0)
    plain = torch.rand(4), torch.rand(4)
    torch.manual_seed(0)
    tracker = TPRngTracker(7, tp_rank=1)
    first = torch.rand(4)
    with tracker.fork():
        inside = torch.rand(4)
    assert torch.equal(first, plain[0]) and torch.equal(torch.rand(4), plain[1])
    own = torch.Generator().manual_seed(7 + TP_SEED_OFFSET + 1)
    assert torch.equal(inside, torch.rand(4, generator=own))
    with tracker.fork():  # the stream continues where it stopped
        assert torch.equal(torch.rand(4), torch.rand(4, generator=own))


def test_ranks_get_different_streams_and_state_round_trips_through_a_checkpoint():
    a, b = TPRngTracker(5, 0), TPRngTracker(5, 1)
    with a.fork():
        xa = torch.rand(8)
    with b.fork():
        xb = torch.rand(8)
    assert not torch.equal(xa, xb)
    tensors, skeleton = flatten({"tp_tracker": a.get_state()})
    saved = unflatten(tensors, skeleton)["tp_tracker"]
    with a.fork():
        expected = torch.rand(8)
    restored = TPRngTracker(999, 3)
    restored.set_state(saved)
    with restored.fork():
        assert torch.equal(torch.rand(8), expected)
    with pytest.raises(KeyError, match="cpu"):
        restored.set_state({"seed": 1})
    with pytest.raises(ValueError, match="seed=-1"):
        TPRngTracker(-1)


def test_restoring_default_and_tracker_state_replays_dropout_exactly():
    model = Transformer(CFG, seed=2)
    tokens = _tokens()
    torch.manual_seed(3)
    saved = torch.get_rng_state(), model.rng_tracker.get_state()
    first = model.loss(tokens[:, :-1], tokens[:, 1:])
    second = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert not torch.equal(first, second)  # dropout is on: fresh masks each call
    torch.set_rng_state(saved[0])
    model.rng_tracker.set_state(saved[1])
    assert torch.equal(model.loss(tokens[:, :-1], tokens[:, 1:]), first)


def test_attention_dropout_uses_the_tracker_and_residual_dropout_the_default_stream():
    model = Transformer(CFG, seed=2)
    tokens = _tokens()[:, :-1]
    before = model.rng_tracker.get_state()["cpu"]
    torch.manual_seed(4)
    model.blocks[1].attn(model.blocks[0](tokens))  # embedding dropout + attention dropout
    after_attn = model.rng_tracker.get_state()["cpu"]
    assert not torch.equal(before, after_attn)
    default = torch.get_rng_state()
    model.blocks[1]._residual_dropout(torch.ones(16, 2, 32))
    assert torch.equal(model.rng_tracker.get_state()["cpu"], after_attn)  # residual: not the tracker
    assert not torch.equal(torch.get_rng_state(), default)
    model.eval()
    model(tokens)
    assert torch.equal(model.rng_tracker.get_state()["cpu"], after_attn)  # eval draws nothing


class _FakeGroup:  # stands for a tp group of two without starting torch.distributed
    pass


def test_tensor_parallel_dropout_without_a_tracker_is_refused(monkeypatch):
    import megalite.model.blocks as blocks
    import megalite.model.settings as settings  # where BlockSettings.tp asks the group its size

    real = settings.group_size
    monkeypatch.setattr(settings, "group_size", lambda g: 2 if isinstance(g, _FakeGroup) else real(g))
    with pytest.raises(ValueError, match="rng_tracker"):
        blocks.Attention(CFG, blocks.BlockSettings(tp_group=_FakeGroup()))


# ------------------------------------------------------------------ multi-rank
def _gather(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def _dropout_across_tp_ranks(sp: bool):
    model = Transformer(CFG, tp_group=dist.group.WORLD, sequence_parallel=sp, seed=2)
    torch.manual_seed(6)  # every rank seeds the default stream alike (rng.seed_everything)
    default = torch.get_rng_state()
    hidden = model.blocks[1](model.blocks[0](_tokens()[:, :-1]))  # [s, b, h] (SP: [s/2, b, h])
    with model.rng_tracker.fork():
        draw = torch.rand(8)
    return {"replicas_equal": bool(torch.equal(*_gather(hidden))),
            "tracker_draws_differ": not torch.equal(*_gather(draw)),
            "default_stream_used": not torch.equal(torch.get_rng_state(), default)}


@pytest.mark.parametrize("sp", [False, True])
def test_tp_ranks_share_replicated_masks_and_own_sharded_ones(spawn, sp):
    for out in spawn(_dropout_across_tp_ranks, 2, sp):
        assert out["tracker_draws_differ"]
        if sp:  # every dropout acts on a rank's own sequence chunk: all from the tracker
            assert not out["default_stream_used"]
        else:  # residual dropout on replicated activations: one mask, so the replicas stay equal
            assert out["default_stream_used"] and out["replicas_equal"]


def _checkpointing_replays_tracker(ckpt: bool):
    model = Transformer(CFG, tp_group=dist.group.WORLD, sequence_parallel=True, seed=2,
                        activation_checkpointing=ckpt)
    torch.manual_seed(8)
    tokens = _tokens()
    loss = model.loss(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    with model.rng_tracker.fork():
        after = torch.rand(4)  # the stream must end where it would without checkpointing
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, after


def _compare_checkpointing():
    (loss, grads, after), (loss_c, grads_c, after_c) = (_checkpointing_replays_tracker(c) for c in (False, True))
    # recomputation replays the same kernels and masks (bitwise equal here); only the order autograd sums a
    # tensor's several uses may change, a few fp32 ulps: rtol 1e-6 (~8 ulps), floor 1e-6 * max|grad|. A mask
    # that was not replayed changes gradients by O(1).
    grad_ratio, message = max(worst(grads_c[n], grads[n], 1e-6, 1e-6, n) for n in grads)
    return bool(torch.equal(loss, loss_c) and torch.equal(after, after_c)), grad_ratio <= 1, message


def test_activation_checkpointing_replays_the_tracker_under_sequence_parallelism(spawn):
    for same_loss_and_stream, grads_close, message in spawn(_compare_checkpointing, 2):
        assert same_loss_and_stream and grads_close, message


def test_dropout_differs_from_no_dropout_so_the_tests_above_see_masks():
    tokens = _tokens()
    with_dropout = Transformer(CFG, seed=2).loss(tokens[:, :-1], tokens[:, 1:])
    without = Transformer(replace(CFG, dropout=0.0), seed=2).loss(tokens[:, :-1], tokens[:, 1:])
    assert not torch.allclose(with_dropout, without)
