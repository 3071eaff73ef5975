"""The chunked vocabulary-parallel loss: the same numbers whatever the chunk, and no fp32 tensor bigger than one
chunk, forward or backward (counted exactly: every tensor any op produces passes through a dispatch mode)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megalite.tensor_parallel import cross_entropy, vocab_parallel_cross_entropy


class LargestFloat32(TorchDispatchMode):
    """Records the size in bytes of the largest fp32 tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _loss_and_grad(logits, labels, chunk):
    loss = vocab_parallel_cross_entropy(logits, labels, None, vocab_size=90, chunk_elements=chunk)
    grad, = torch.autograd.grad((loss * torch.linspace(0.5, 1.5, labels.shape[1])).sum(), logits)
    return loss, grad


@pytest.fixture(params=["fused_whole_vocab", "vocab_parallel"])
def loss_path(request, monkeypatch):
    """Both implementations in one process: tp=1's fused softmax, and the vocabulary-parallel one."""
    monkeypatch.setattr(cross_entropy, "FUSED_WHOLE_VOCAB", request.param == "fused_whole_vocab")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_chunk_gives_the_same_bits(dtype, loss_path):
    torch.manual_seed(0)
    logits = torch.randn(33, 3, 96, dtype=dtype, requires_grad=True)  # 6 padded ids beyond vocab_size=90
    labels = torch.randint(0, 90, (33, 3))
    whole = _loss_and_grad(logits, labels, logits.numel())
    for chunk in (1, 3 * 96 * 5, 10_000):  # one position per chunk, 5 positions, an uneven split
        loss, grad = _loss_and_grad(logits, labels, chunk)
        assert torch.equal(loss, whole[0]) and torch.equal(grad, whole[1]), chunk
    reference = torch.nn.functional.cross_entropy(logits.float()[..., :90].reshape(-1, 90), labels.reshape(-1),
                                                  reduction="none").reshape(33, 3)
    # fp32 math on both sides; the two differ only in summation order: a few ulps of values near 5
    torch.testing.assert_close(whole[0], reference, rtol=1e-6, atol=0)
    assert torch.all(whole[1][..., 90:] == 0)  # padded ids get no gradient


def test_no_fp32_tensor_is_bigger_than_a_chunk(loss_path):
    logits = torch.randn(64, 2, 512, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 90, (64, 2))
    chunk = 8 * 2 * 512  # 8 positions
    # the fused path works on the 90 real ids of each position only, the parallel one on all 512
    width = 90 if loss_path == "fused_whole_vocab" else 512
    for chunk_elements, positions in ((chunk, 8), (logits.numel(), 64)):
        with LargestFloat32() as seen:
            _loss_and_grad(logits, labels, chunk_elements)
        bound = positions * 2 * width * 4
        assert seen.largest == bound, (chunk_elements, seen.largest)  # one chunk of fp32 logits, never more


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_z_loss_adds_the_gradient_of_c_times_log_partition_squared_and_leaves_the_value(dtype, loss_path):
    torch.manual_seed(0)
    logits = (3 * torch.randn(17, 2, 96)).to(dtype).requires_grad_(True)  # z well away from 0
    labels = torch.randint(0, 90, (17, 2))
    up = torch.linspace(0.5, 1.5, 2)
    c = 1e-2  # large enough that the z term is a sizeable share of the gradient
    loss = vocab_parallel_cross_entropy(logits, labels, None, vocab_size=90, chunk_elements=3 * 96 * 4, z_loss=c)
    grad, = torch.autograd.grad((loss * up).sum(), logits)
    ref = logits.detach().float()[..., :90].requires_grad_(True)  # the objective written out, in autograd
    ce = torch.nn.functional.cross_entropy(ref.reshape(-1, 90), labels.reshape(-1), reduction="none").view(17, 2)
    ((ce + c * torch.logsumexp(ref, -1) ** 2) * up).sum().backward()
    # fp32 math on both sides, differing in summation order: a few ulps (1e-5 relative to the largest entry)
    torch.testing.assert_close(loss, ce.detach(), rtol=1e-6, atol=0)
    scale = ref.grad.abs().max()
    torch.testing.assert_close(grad[..., :90].float(), ref.grad, rtol=0, atol=1e-5 * scale if dtype == torch.float32
                               else 1e-2 * scale)  # bf16: the gradient is rounded to 8 bits of mantissa
    assert torch.all(grad[..., 90:] == 0)
    plain, = torch.autograd.grad((vocab_parallel_cross_entropy(logits, labels, None, vocab_size=90) * up).sum(),
                                 logits)
    assert (plain - grad).float().abs().max() > 0.1 * scale  # the z term is really there
