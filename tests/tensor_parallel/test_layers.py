"""Parallel layers, sharded init and vocab-parallel cross-entropy against unsharded references."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_weight,
    normal_init,
    param_seed,
    vocab_parallel_cross_entropy,
)
from tests.tolerance import assert_close, worst

WORLD = 2
S, B, H, FFN, V = 4, 2, 8, 12, 20
# fp32, sharded vs unsharded: the same products summed in another order (split inner dim + all-reduce,
# another CPU's BLAS blocking) differ by a few ulps (1.2e-7); measured max|diff| <= 2.4e-7 * max|want|.
# rtol 1e-5 leaves ~100x for that, atol 1e-5 * max|want| covers elements that cancel to ~0, and a
# misplaced shard, wrong sign or missing all-reduce (>= 1e-2 relative) is still ~1000x over.
RTOL, ATOL_FRAC = 1e-5, 1e-5


def _t(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ init
def test_param_seed_is_stable_and_name_dependent():
    assert param_seed(1, "a.weight") == param_seed(1, "a.weight")
    assert len({param_seed(1, "a.weight"), param_seed(2, "a.weight"), param_seed(1, "b.weight")}) == 3


def test_full_weight_padding_rows_are_zero_and_real_rows_ignore_padding():
    small = full_weight((5, 3), normal_init(0.02, valid_rows=5), 3, "w")
    padded = full_weight((8, 3), normal_init(0.02, valid_rows=5), 3, "w")
    assert torch.equal(padded[:5], small) and torch.all(padded[5:] == 0)
    assert 0.0 < small.std() < 0.1


def test_init_method_too_few_rows_is_rejected():
    with pytest.raises(ValueError, match="valid_rows=9"):
        full_weight((5, 3), normal_init(0.02, valid_rows=9), 3, "w")


def test_layers_at_tp1_are_plain_linear_and_embedding():
    col = ColumnParallelLinear(H, FFN, bias=True, init_seed=5)
    row = RowParallelLinear(FFN, H, bias=True, init_seed=5)
    emb = VocabParallelEmbedding(V, H, init_seed=5)
    x = _t(0, S, B, H)
    assert torch.equal(col(x), F.linear(x, col.weight, col.bias))
    y = _t(1, S, B, FFN)
    assert torch.equal(row(y), F.linear(y, row.weight, row.bias))
    ids = torch.randint(0, V, (S, B))
    assert torch.equal(emb(ids), emb.weight[ids])
    assert torch.equal(col.weight, full_weight((FFN, H), normal_init(0.02), 5, "ColumnParallelLinear.weight"))
    assert "shard 0/1" in repr(col) and "rows 0..19" in repr(emb)


def test_indivisible_shapes_name_the_fix(spawn):
    for msg in spawn(_indivisible, WORLD):
        assert "out_features=7" in msg and "multiple of 2" in msg


def _indivisible():
    try:
        ColumnParallelLinear(4, 7, dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return "no error"


# --------------------------------------------------- tp=2 against tp=1
def _mlp_pair(group, sp, gather, seed=11):
    col = ColumnParallelLinear(H, FFN, group, bias=True, gather_output=gather, sequence_parallel=sp, init_seed=None)
    row = RowParallelLinear(FFN, H, group, bias=True, input_is_parallel=not gather, sequence_parallel=sp,
                            init_seed=None)
    col.init_weights(seed, "col")
    row.init_weights(seed, "row")
    with torch.no_grad():  # nonzero biases so their gradients and placement are tested too
        col.bias.copy_(_t(3, FFN).chunk(col.tp_size)[col.tp_rank])
        row.bias.copy_(_t(4, H))
    return col, row


def _mlp_grads(col, row, x, sp, group):
    x = x.clone().requires_grad_(True)
    y = row(F.gelu(col(x)))
    (y * _t(9, *y.shape) if not sp else y * _t(9, S, B, H).chunk(WORLD)[dist.get_rank()]).sum().backward()
    if sp and group is not None:
        dist.all_reduce(row.bias.grad, group=group)  # partial under sequence parallelism
    return y.detach(), x.grad, col.weight.grad, col.bias.grad, row.weight.grad, row.bias.grad


def _column_row_match(sp, gather):
    group, r = dist.group.WORLD, dist.get_rank()
    x = _t(0, S, B, H)
    ref = _mlp_grads(*_mlp_pair(None, False, False), x, False, None)
    col, row = _mlp_pair(group, sp, gather)
    assert torch.equal(col.weight, _mlp_pair(None, False, False)[0].weight.chunk(WORLD, 0)[r])
    got = _mlp_grads(col, row, x.chunk(WORLD)[r] if sp else x, sp, group)
    y, xg, cw, cb, rw, rb = ref
    want = (y.chunk(WORLD)[r] if sp else y, xg.chunk(WORLD)[r] if sp else xg,
            cw.chunk(WORLD, 0)[r], cb.chunk(WORLD)[r], rw.chunk(WORLD, 1)[r], rb)
    names = ("output", "input grad", "column weight grad", "column bias grad", "row weight grad", "row bias grad")
    return [worst(a, b, RTOL, ATOL_FRAC, f"rank {r} {n}") for a, b, n in zip(got, want, names)]


@pytest.mark.parametrize("sp,gather", [(False, False), (True, False), (False, True)])
def test_column_then_row_parallel_matches_unsharded(spawn, sp, gather):
    for errors in spawn(_column_row_match, WORLD, sp, gather):
        assert all(ratio <= 1 for ratio, _ in errors), [m for ratio, m in errors if ratio > 1]


def _saved_activation_bytes(sp):
    """Bytes a column-parallel linear keeps for backward besides its weight (x is [s/tp, b, h] under SP)."""
    col = _mlp_pair(dist.group.WORLD, sp, False)[0]
    x = _t(0, S // WORLD if sp else S, B, H).requires_grad_(True)
    saved = []

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.data_ptr() != col.weight.data_ptr():
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        col(x).sum().backward()
    return sum(saved), x.numel() * x.element_size()


@pytest.mark.parametrize("sp", [False, True])
def test_column_parallel_linear_keeps_only_its_own_input(spawn, sp):
    """Under SP it keeps the local [s/tp, b, h] and gathers it again in backward, not the gathered [s, b, h]."""
    for saved, local_input in spawn(_saved_activation_bytes, WORLD, sp):
        assert saved == local_input


def _embedding_match(sp):
    group, r = dist.group.WORLD, dist.get_rank()
    ids = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(2))
    up = _t(5, S, B, H)
    ref = VocabParallelEmbedding(V, H, None, init_seed=8)
    (ref(ids) * up).sum().backward()
    emb = VocabParallelEmbedding(V, H, group, sequence_parallel=sp, init_seed=8)
    out = emb(ids)
    (out * (up.chunk(WORLD)[r] if sp else up)).sum().backward()
    want = ref(ids).detach()
    want = want.chunk(WORLD)[r] if sp else want
    return (worst(out, want, RTOL, ATOL_FRAC, f"rank {r} output"),
            worst(emb.weight.grad, ref.weight.grad.chunk(WORLD)[r], RTOL, ATOL_FRAC, f"rank {r} weight grad"))


@pytest.mark.parametrize("sp", [False, True])
def test_vocab_parallel_embedding_matches_unsharded(spawn, sp):
    for errors in spawn(_embedding_match, WORLD, sp):
        assert all(ratio <= 1 for ratio, _ in errors), [m for ratio, m in errors if ratio > 1]


# ------------------------------------------------------------ cross-entropy
def _logits_labels(vocab=V, padded=24):
    logits = _t(6, S, B, padded)
    labels = torch.randint(0, vocab, (S, B), generator=torch.Generator().manual_seed(7))
    return logits, labels


def test_cross_entropy_tp1_equals_torch_on_unpadded_logits():
    logits, labels = _logits_labels()
    mine = logits.clone().requires_grad_(True)
    ref = logits[..., :V].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(mine, labels, None, vocab_size=V)
    want = F.cross_entropy(ref.reshape(-1, V), labels.reshape(-1), reduction="none").view(S, B)
    assert loss.dtype == torch.float32
    assert_close(loss, want, RTOL, ATOL_FRAC, "loss")  # fp32 logsumexp in another order: a few ulps
    up = _t(8, S, B)
    (loss * up).sum().backward()
    (want * up).sum().backward()
    assert_close(mine.grad[..., :V], ref.grad, RTOL, ATOL_FRAC, "logit grad")  # softmax - onehot, a few ulps
    assert torch.all(mine.grad[..., V:] == 0)  # padded ids: zero probability, zero gradient


def test_cross_entropy_low_precision_logits_give_fp32_loss_and_matching_grad_dtype():
    logits, labels = _logits_labels()
    x = logits.bfloat16().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(x, labels, None, vocab_size=V)
    loss.sum().backward()
    want = F.cross_entropy(x.detach().float()[..., :V].reshape(-1, V), labels.reshape(-1), reduction="none")
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert_close(loss.view(-1), want, RTOL, ATOL_FRAC, "loss")  # both fp32 from the same bf16 logits: fp32 ulps


def test_cross_entropy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_cross_entropy(torch.zeros(4, 2, 8), torch.zeros(2, 4, dtype=torch.long))


def _cross_entropy_match(vocab, z_loss=0.0):
    r = dist.get_rank()
    logits, labels = _logits_labels(vocab)
    ref = logits[..., :vocab].clone().requires_grad_(True)
    want = F.cross_entropy(ref.reshape(-1, vocab), labels.reshape(-1), reduction="none").view(S, B)
    up = _t(8, S, B)
    ((want + z_loss * torch.logsumexp(ref, -1) ** 2) * up).sum().backward()  # z-loss: in the gradient only
    local = logits.chunk(WORLD, -1)[r].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, labels, dist.group.WORLD, vocab_size=vocab, z_loss=z_loss)
    (loss * up).sum().backward()
    full_grad = torch.cat([ref.grad, torch.zeros(S, B, 24 - vocab)], -1)
    # the padded ids' gradient is exactly zero on both sides (ratio 0 for 0 == 0, else over the allowance)
    return (worst(loss, want, RTOL, ATOL_FRAC, f"rank {r} loss"),
            worst(local.grad, full_grad.chunk(WORLD, -1)[r], RTOL, ATOL_FRAC, f"rank {r} logit grad"))


@pytest.mark.parametrize("vocab,z_loss", [(24, 0.0), (20, 0.0), (9, 0.0), (20, 0.05)])  # no padding; padding
def test_cross_entropy_tp2_matches_full_vocabulary(spawn, vocab, z_loss):  # inside rank 1; rank 1 all padding
    for errors in spawn(_cross_entropy_match, WORLD, vocab, z_loss):
        assert all(ratio <= 1 for ratio, _ in errors), [m for ratio, m in errors if ratio > 1]
