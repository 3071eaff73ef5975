"""Cross-entropy over vocabulary-parallel logits, without gathering the vocabulary.

Each rank holds logits for its slice [r*V/tp, (r+1)*V/tp) of the vocabulary.
The softmax needs only three all-reduces of [s, b]-sized tensors: the max
(for stability), the sum of exponentials, and the target logit (owned by
exactly one rank). Math runs in fp32 whatever the logits' dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.distributed import comm
from megalite.tensor_parallel.mappings import group_rank, group_size


def _all_reduce_(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        comm.record("all_reduce", x)
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, vocab_size):
        v_local = logits.shape[-1]
        start = group_rank(group) * v_local
        x = logits.float().clone()  # [s, b, V/tp] fp32 working copy; clone so fp32 input is not modified
        if vocab_size is not None and start + v_local > vocab_size:
            x[..., max(vocab_size - start, 0):] = float("-inf")  # padded ids are never predicted
        x -= _all_reduce_(x.max(dim=-1).values, group, dist.ReduceOp.MAX).unsqueeze(-1)

        local = labels - start
        owned = (local >= 0) & (local < v_local)  # [s, b]: this rank holds the target's logit
        local = local.masked_fill(~owned, 0)
        target = x.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        _all_reduce_(target, group)

        x.exp_()  # x now holds exp(logit - max)
        sum_exp = _all_reduce_(x.sum(dim=-1), group)
        loss = sum_exp.log() - target  # [s, b]
        x /= sum_exp.unsqueeze(-1)  # softmax, kept for backward
        ctx.save_for_backward(x, local, owned)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, owned = ctx.saved_tensors
        grad = softmax.clone()  # d loss / d logit = softmax - one_hot(target)
        grad.scatter_add_(-1, local.unsqueeze(-1), -owned.to(grad.dtype).unsqueeze(-1))
        grad *= grad_loss.unsqueeze(-1)
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group=None,
                                 vocab_size: int | None = None) -> torch.Tensor:
    """Per-token loss [s, b] in fp32 from local logits [s, b, V/tp] and global label ids [s, b].

    `vocab_size` (optional) is the real vocabulary: logits of padded ids
    (>= vocab_size) are treated as -inf, so they get zero probability and
    zero gradient. Labels must lie in [0, vocab_size); they are not checked
    here (that would cost a device sync).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree; "
                         "expected logits [s, b, V/tp] and labels [s, b]")
    if vocab_size is not None and vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    return _VocabParallelCrossEntropy.apply(logits, labels, tp_group, vocab_size)
