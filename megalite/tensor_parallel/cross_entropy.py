"""Cross-entropy over vocabulary-parallel logits, without gathering the vocabulary, in sequence chunks.

Each rank holds logits for its slice [r*V/tp, (r+1)*V/tp) of the vocabulary.
The softmax needs only three all-reduces of [s, b]-sized tensors: the max
(for stability), the sum of exponentials, and the target logit (owned by
exactly one rank). Math runs in fp32 whatever the logits' dtype, but never on
the whole [s, b, V/tp] at once: forward and backward walk the sequence in
chunks of about `chunk_elements` logits, so the loss holds one fp32 chunk at a
time beyond its input and its gradient (at V=128k and s=8k a whole fp32 copy
would be 4 GiB per micro-batch). Backward recomputes each chunk's softmax from
the saved logits and the saved per-token max and sum, with the same operations
as a whole-tensor pass, so the result does not depend on the chunk size.
With one rank (tp=1) no all-reduce is needed and each chunk goes through torch's
fused log_softmax forward and softmax backward instead (the same chunks, the same bound).

z-loss (PaLM's auxiliary loss, `optim.z_loss`): with coefficient c, the objective per token is
CE + c * z^2, z = log sum_j exp(logit_j) the log-partition function, which keeps z near 0 and the
softmax's normaliser from drifting (a known source of late-training spikes). Its gradient,
2 c z softmax_j, is added in backward from the max and the sum of exponentials the forward already
reduced over the vocabulary (no extra collective); the value returned stays the cross-entropy,
so the logged loss compares with runs without it and with evaluations.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megalite.distributed import comm
from megalite.tensor_parallel.mappings import group_rank, group_size

CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk: 64 MiB of working memory, whatever V and s are
# One rank holding the whole vocabulary (tp=1) takes torch's fused log_softmax / softmax per chunk; the
# tests turn this off to run the vocabulary-parallel path in one process.
FUSED_WHOLE_VOCAB = True


def _all_reduce_(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        comm.record("all_reduce", x)
        dist.all_reduce(x, op=op, group=group)
    return x


def _chunks(seq_len: int, per_position: int, chunk_elements: int) -> list[slice]:
    """Slices of the sequence dimension holding about chunk_elements logits each (at least one position)."""
    step = max(1, chunk_elements // max(per_position, 1))
    return [slice(i, min(i + step, seq_len)) for i in range(0, seq_len, step)]


def _valid(start: int, v_local: int, vocab_size) -> int:
    """How many of this rank's v_local logits are real ids (the rest pad the vocabulary)."""
    return v_local if vocab_size is None else min(max(vocab_size - start, 0), v_local)


def _row_max(logits: torch.Tensor, rows: slice, valid: int) -> torch.Tensor:
    """fp32 max over the real ids of the chunk (-inf where this rank holds none); the cast is exact and
    monotonic, so taking the max first needs no fp32 copy of the chunk."""
    if valid == 0:
        return torch.full(logits[rows].shape[:-1], float("-inf"), dtype=torch.float32, device=logits.device)
    return logits[rows, ..., :valid].amax(dim=-1).float()  # amax: no indices to compute


def _shifted(logits: torch.Tensor, rows: slice, valid: int, max_logit: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits of the chunk minus the per-token max in one pass (into `out` if given), padded ids
    at -inf; the logits themselves never change."""
    m = max_logit[rows].unsqueeze(-1)
    if logits.dtype == torch.float32:
        x = torch.sub(logits[rows], m, out=out)
    else:  # a mixed-dtype sub holds a second fp32 temporary of the chunk: cast once, subtract in place
        x = logits[rows].float()
        x -= m
    if valid < x.shape[-1]:
        x[..., valid:] = float("-inf")
    return x


def _whole_vocab_loss(logits: torch.Tensor, labels: torch.Tensor, chunks: list[slice], valid: int,
                      z: torch.Tensor | None = None) -> torch.Tensor:
    """One rank holds the whole vocabulary: per chunk, torch's fused log_softmax (max, exp, sum and
    log in one vectorized pass, fp32) over the real ids, and the target's entry; about a third
    faster on a CPU than the three separate passes the vocabulary-parallel path needs. With `z`
    given, the log-partition function of each token is written into it (z-loss): logit - logp of any id."""
    loss = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for rows in chunks:
        logp = torch.log_softmax(logits[rows, ..., :valid], dim=-1, dtype=torch.float32)
        target = logp.gather(-1, labels[rows].unsqueeze(-1))
        loss[rows] = target.squeeze(-1).neg()
        if z is not None:
            z[rows] = (logits[rows].gather(-1, labels[rows].unsqueeze(-1)).float() - target).squeeze(-1)
    return loss


def _whole_vocab_grad(logits: torch.Tensor, labels: torch.Tensor, chunks: list[slice], valid: int,
                      grad_loss: torch.Tensor, z_scale: torch.Tensor | None) -> torch.Tensor:
    """d loss / d logits = (softmax - one_hot(target)) * grad_loss, a chunk at a time, the softmax
    fused and written straight into the gradient where its dtype and width allow; padded ids get 0."""
    grad = torch.empty_like(logits)
    direct = logits.dtype == torch.float32 and valid == logits.shape[-1]
    for rows in chunks:
        if direct:
            x = torch.ops.aten._softmax.out(logits[rows], -1, False, out=grad[rows])
        else:
            x = torch.softmax(logits[rows, ..., :valid], dim=-1, dtype=torch.float32)
        if z_scale is not None:  # z-loss: softmax * (1 + 2 c z)
            x *= z_scale[rows].unsqueeze(-1)
        x.scatter_add_(-1, labels[rows].unsqueeze(-1), torch.full_like(x[..., :1], -1.0))
        x *= grad_loss[rows].unsqueeze(-1)
        if not direct:
            grad[rows, ..., :valid] = x
            grad[rows, ..., valid:] = 0
    return grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, vocab_size, chunk_elements, z_loss):
        s, v_local = logits.shape[0], logits.shape[-1]
        start = group_rank(group) * v_local
        chunks = _chunks(s, logits[0].numel(), chunk_elements)
        ctx.whole_vocab, ctx.z_loss = FUSED_WHOLE_VOCAB and group_size(group) == 1, z_loss
        if ctx.whole_vocab:
            ctx.valid, ctx.chunks = _valid(0, v_local, vocab_size), chunks
            z = torch.empty(labels.shape, dtype=torch.float32, device=logits.device) if z_loss else None
            ctx.save_for_backward(logits, labels, z)
            return _whole_vocab_loss(logits, labels, chunks, ctx.valid, z)
        local = labels - start
        owned = (local >= 0) & (local < v_local)  # [s, b]: this rank holds the target's logit
        local = local.masked_fill(~owned, 0)

        valid = _valid(start, v_local, vocab_size)
        max_logit = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        for rows in chunks:
            max_logit[rows] = _row_max(logits, rows, valid)
        _all_reduce_(max_logit, group, dist.ReduceOp.MAX)

        target = torch.empty_like(max_logit)
        sum_exp = torch.empty_like(max_logit)
        for rows in chunks:
            x = _shifted(logits, rows, valid, max_logit)
            target[rows] = x.gather(-1, local[rows].unsqueeze(-1)).squeeze(-1).masked_fill(~owned[rows], 0.0)
            sum_exp[rows] = x.exp_().sum(dim=-1)  # x now holds exp(logit - max)
        _all_reduce_(target, group)
        _all_reduce_(sum_exp, group)
        ctx.save_for_backward(logits, local, owned, max_logit, sum_exp)
        ctx.valid, ctx.chunks = valid, chunks
        return sum_exp.log() - target  # [s, b]

    @staticmethod
    def backward(ctx, grad_loss):
        none = (None,) * 5
        if ctx.whole_vocab:
            logits, labels, z = ctx.saved_tensors
            z_scale = None if z is None else 1.0 + 2.0 * ctx.z_loss * z
            return _whole_vocab_grad(logits, labels, ctx.chunks, ctx.valid, grad_loss, z_scale), *none
        logits, local, owned, max_logit, sum_exp = ctx.saved_tensors
        grad = torch.empty_like(logits)
        in_place = logits.dtype == torch.float32  # fp32 logits: each chunk is computed in its slot of grad
        # z-loss: softmax scaled by 1 + 2 c z, z = max + log(sum_exp): the reduced per-token quantities
        divisor = sum_exp if not ctx.z_loss else sum_exp / (1.0 + 2.0 * ctx.z_loss * (max_logit + sum_exp.log()))
        for rows in ctx.chunks:  # d loss / d logit = softmax - one_hot(target), a chunk at a time
            x = _shifted(logits, rows, ctx.valid, max_logit, out=grad[rows] if in_place else None)
            x.exp_()
            x /= divisor[rows].unsqueeze(-1)
            x.scatter_add_(-1, local[rows].unsqueeze(-1), -owned[rows].to(x.dtype).unsqueeze(-1))
            x *= grad_loss[rows].unsqueeze(-1)
            if not in_place:
                grad[rows] = x
        return grad, *none


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group=None,
                                 vocab_size: int | None = None, chunk_elements: int = CHUNK_ELEMENTS,
                                 z_loss: float = 0.0) -> torch.Tensor:
    """Per-token loss [s, b] in fp32 from local logits [s, b, V/tp] and global label ids [s, b].

    `vocab_size` (optional) is the real vocabulary: logits of padded ids
    (>= vocab_size) are treated as -inf, so they get zero probability and
    zero gradient. Labels must lie in [0, vocab_size); they are not checked
    here (that would cost a device sync). `chunk_elements` bounds the fp32
    working memory (see the module docstring); the result does not depend on it. `z_loss` > 0
    adds the z-loss's gradient (module docstring); the value returned is the cross-entropy.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree; "
                         "expected logits [s, b, V/tp] and labels [s, b]")
    if vocab_size is not None and vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    if chunk_elements <= 0:
        raise ValueError(f"chunk_elements={chunk_elements} must be positive")
    if z_loss < 0:
        raise ValueError(f"z_loss={z_loss} must be >= 0 (PaLM used 1e-4)")
    return _VocabParallelCrossEntropy.apply(logits, labels, tp_group, vocab_size, chunk_elements, float(z_loss))
