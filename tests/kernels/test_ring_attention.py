"""Ring attention (context parallelism) equals single-process attention on the full sequence.

Pure helpers first (the load-balanced layout, its causal balance, the block plan's
skipping), then the kernel at cp = 1 in one process, then gloo ranks at cp = 2 and
cp = 4 (one spawn of 4 ranks runs every case, see _ring_worker; a module fixture
shares the results): outputs and q/k/v gradients, gathered back to full order,
against megalite.kernels.attention on the whole sequence; and the bytes each rank
sends, counted at ring_exchange, against the module docstring's formula.

Tolerances (tests/tolerance.py, relative to the compared values): fp32, rtol 1e-5
with a floor of 1e-5 * max|want|. Both sides do the same softmax in fp32 over the
same keys; the ring only sums in another order (per-block partial sums combined by
exp(m_old - m_new) rescaling, dk/dv summed block by block as they travel), which
moves results by a few fp32 ulps (measured on 2 CPU cores, cp = 1, 2, 4: max|diff|
up to 8e-7 of max|want| on the gradients, 2e-7 on the outputs; the worst element
used 0.047 of its allowance, a margin of 20x). The floor covers gradient elements that are sums of
terms of typical size cancelling to ~0, where rtol alone would demand more than
the rounding of those terms allows. The errors tested for (a missing mask, a
block counted twice or not at all, a gradient left at the wrong rank) are O(1e-1).
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.distributed as dist

from megalite.data.documents import document_ids
from megalite.kernels.attention import DocumentMask, attention
from megalite.kernels.ring_attention import (
    RingAttention,
    block_plan,
    forward_bytes_per_rank,
    gather_load_balanced,
    load_balanced_chunks,
    positions_of,
    ring_attention,
    training_bytes_per_rank,
)
from tests.tolerance import assert_close, worst

ring_mod = importlib.import_module("megalite.kernels.ring_attention")
RTOL, ATOL_FRAC = 1e-5, 1e-5  # fp32, same math in another summation order (see above)
S, B, D = 32, 2, 8  # cp = 2: chunks of 8; cp = 4: chunks of 4
EOD = 0


# ------------------------------------------------------------ layout helpers
@pytest.mark.parametrize("cp", [2, 4])
def test_load_balanced_chunks_round_trip_and_positions(cp):
    full = torch.arange(3 * S * 5).view(3, S, 5)  # sequence along dim 1
    parts = [load_balanced_chunks(full, cp, r, dim=1) for r in range(cp)]
    assert all(p.shape == (3, S // cp, 5) for p in parts)
    assert torch.equal(gather_load_balanced(parts, dim=1), full)
    c = S // (2 * cp)
    for r in range(cp):
        want = list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
        assert positions_of(S, cp, r).tolist() == want
        assert torch.equal(parts[r], full[:, positions_of(S, cp, r)])
    assert sorted(torch.cat([positions_of(S, cp, r) for r in range(cp)]).tolist()) == list(range(S))
    with pytest.raises(ValueError, match="cannot be cut"):
        load_balanced_chunks(torch.zeros(S + 2), cp, 0)


def _allowed(q_pos, k_pos, window=None):
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff < (window or 10**9))


def test_causal_work_is_balanced_across_ranks():
    """S=64, cp=4: each rank's unmasked (query, key) pairs, and the block area the kernel computes."""
    s, cp = 64, 4
    c = s // (2 * cp)
    everything = torch.arange(s)
    unmasked = [int(_allowed(positions_of(s, cp, r), everything).sum()) for r in range(cp)]
    computed = [sum(c * c * len(keys) for src in range(cp) for _, keys, _ in block_plan(cp, r, src, c))
                for r in range(cp)]
    contiguous = [int(_allowed(everything[r * s // cp:(r + 1) * s // cp], everything).sum()) for r in range(cp)]
    print(f"\nS={s} cp={cp}: unmasked pairs per rank {unmasked} (total {sum(unmasked)} = S(S+1)/2), "
          f"computed block area per rank {computed}; a contiguous split would give {contiguous}")
    assert sum(unmasked) == s * (s + 1) // 2 and unmasked == [c * (s + 1)] * cp
    for figures in (unmasked, computed):
        assert max(figures) <= 1.05 * min(figures), figures
    assert max(contiguous) > 5 * min(contiguous)  # what the two-chunk layout is for


@pytest.mark.parametrize("window", [None, 3, 5, 9])
def test_block_plan_skips_only_masked_pairs(window):
    """Every (query chunk, key chunk) pair with a visible (query, key) is computed, with a mask unless
    every pair of it is visible; the skipped ones have none."""
    cp, c = 4, 4
    s = 2 * cp * c
    for rank in range(cp):
        for src in range(cp):
            planned = {(a, kk): mask for a, keys, mask in block_plan(cp, rank, src, c, True, window) for kk in keys}
            for a in (0, 1):
                for kk in (0, 1):
                    seen = _allowed(positions_of(s, cp, rank)[a * c:(a + 1) * c],
                                    positions_of(s, cp, src)[kk * c:(kk + 1) * c], window)
                    assert ((a, kk) in planned) == bool(seen.any()), (rank, src, a, kk)
                    if (a, kk) in planned and not planned[a, kk]:  # computed without a position mask
                        assert seen.all(), (rank, src, a, kk)


# ------------------------------------------------------------ cases
def _doc_ids() -> torch.Tensor:
    """[B, S] document numbers with odd layouts: sample 0 starts with a document boundary (an EOD first, so
    position 0 is a one-token document), has further one-token documents and one of 13 tokens across chunk
    and rank boundaries; sample 1 has a document of 20 tokens spanning most ranks, then a one-token one."""
    tokens = torch.ones(B, S, dtype=torch.int64)
    for sample, eods in ((0, (0, 1, 14, 15, 24)), (1, (19, 20))):
        tokens[sample, list(eods)] = EOD
    return document_ids(tokens, EOD).to(torch.int64)


# (name, hq, hkv, causal, documents, window as a multiple of the chunk: "short" c - 1, "long" 2c + 1)
CASES = [("gqa", 4, 2, True, False, None), ("mqa", 4, 1, True, False, None),
         ("gqa docs", 4, 2, True, True, None), ("mqa docs", 4, 1, True, True, None),
         ("gqa window<chunk", 4, 2, True, False, "short"), ("gqa window>chunk", 4, 2, True, False, "long"),
         ("mqa docs window<chunk", 4, 1, True, True, "short"), ("gqa docs window>chunk", 4, 2, True, True, "long"),
         ("gqa non-causal docs", 4, 2, False, True, None), ("mha non-causal", 2, 2, False, False, None)]


def _window(kind, c):
    return None if kind is None else (c - 1 if kind == "short" else 2 * c + 1)


def _full_inputs(hq, hkv, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, hq, D, generator=g)
    k, v = torch.randn(S, B, hkv, D, generator=g), torch.randn(S, B, hkv, D, generator=g)
    dout = torch.randn(S, B, hq * D, generator=g)
    return [x.to(dtype) for x in (q, k, v)], dout.to(dtype)


def _reference(case, c):
    _, hq, hkv, causal, docs, window = case
    (q, k, v), dout = _full_inputs(hq, hkv, seed=hq * 10 + hkv)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    documents = DocumentMask(_doc_ids()) if docs else None
    out = attention(q, k, v, causal=causal, scale=0.4, documents=documents, window=_window(window, c))
    out.backward(dout)
    return out.detach(), [x.grad for x in (q, k, v)]


def _ring(case, c, cp, rank, group, dtype=torch.float32):
    _, hq, hkv, causal, docs, window = case
    (q, k, v), dout = _full_inputs(hq, hkv, seed=hq * 10 + hkv, dtype=dtype)
    q, k, v = (load_balanced_chunks(x, cp, rank).requires_grad_() for x in (q, k, v))
    ids = load_balanced_chunks(_doc_ids(), cp, rank, dim=1) if docs else None
    out = ring_attention(q, k, v, group, causal=causal, scale=0.4, doc_ids=ids, window=_window(window, c))
    return out, load_balanced_chunks(dout, cp, rank), (q, k, v)


def _gather(t, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return gather_load_balanced(parts)


class _CountingExchange:
    """Wraps ring_exchange and adds up the bytes this rank sends."""

    def __init__(self, inner):
        self.inner, self.sent = inner, 0

    def __call__(self, tensors, *args, **kwargs):
        self.sent += sum(t.numel() * t.element_size() for t in tensors)
        return self.inner(tensors, *args, **kwargs)


def _parity(cases, group):
    """worst() of out, dq, dk, dv gathered from the ranks of `group` against full attention, per case."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    c = S // (2 * cp)
    results = []
    for case in cases:
        want_out, want_grads = _reference(case, c)
        out, dout, inputs = _ring(case, c, cp, rank, group)
        out.backward(dout)
        got = [_gather(out.detach(), group)] + [_gather(x.grad, group) for x in inputs]
        for what, g, w in zip(("out", "dq", "dk", "dv"), got, [want_out] + want_grads):
            results.append(worst(g, w, RTOL, ATOL_FRAC, f"cp={cp} {case[0]}: {what}"))
    return results


def _bytes_sent(group):
    """{"fp32" | "bf16 docs": (bytes sent in the forward, in the backward)} of this rank, GQA hq=4 hkv=2."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    counter = _CountingExchange(ring_mod.ring_exchange)
    ring_mod.ring_exchange = counter  # the kernel looks it up in its module at every step
    counts = {}
    try:
        for name, dtype, docs in (("fp32", torch.float32, False), ("bf16 docs", torch.bfloat16, True)):
            counter.sent = 0
            out, dout, _ = _ring(("bytes", 4, 2, True, docs, None), S // (2 * cp), cp, rank, group, dtype)
            forward = counter.sent
            out.backward(dout)
            counts[name] = (forward, counter.sent - forward)
    finally:
        ring_mod.ring_exchange = counter.inner
    return counts


def _ring_worker(cases):
    """On 4 ranks: cp = 4 over all of them, then cp = 2 on the pairs {0, 1} and {2, 3}, each pair running
    half of the cases (one pool of 4 workers instead of pools of 4 and 2: process start-up is most of the
    cost on two cores). Returns {cp: (parity results, byte counts)} of this rank."""
    world = dist.group.WORLD
    out = {4: (_parity(cases, world), _bytes_sent(world))}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    pair = dist.get_rank() // 2
    out[2] = (_parity(cases[pair::2], pairs[pair]), _bytes_sent(pairs[pair]))
    return out


@pytest.fixture(scope="module")
def spawned(spawn):
    """cp -> per-rank (parity results, byte counts), cp = 2 listed for ranks 0..3 (two pairs)."""
    per_rank = spawn(_ring_worker, 4, CASES)
    return {cp: [r[cp] for r in per_rank] for cp in (2, 4)}


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_equals_full_attention_outputs_and_gradients(spawned, cp):
    rows = [row for results, _ in spawned[cp] for row in results]
    assert len(rows) == 4 * 4 * len(CASES) if cp == 4 else 2 * 4 * len(CASES)  # every case ran, on every rank
    ratio, message = max(rows)
    assert ratio <= 1, message


@pytest.mark.parametrize("cp", [2, 4])
def test_bytes_sent_match_the_docstring_formula(spawned, cp):
    hkv = 2
    for name, e, e_id in (("fp32", 4, 0), ("bf16 docs", 2, 8)):
        # the module docstring: forward (cp-1) * 2 * (S/cp) * b * hkv * d * e (+ (cp-1) * (S/cp) * b * e_id);
        # backward the same again plus cp * 2 * (S/cp) * b * hkv * d * 4 of fp32 dk/dv
        forward = (cp - 1) * 2 * (S // cp) * B * hkv * D * e + (cp - 1) * (S // cp) * B * e_id
        backward = forward + cp * 2 * (S // cp) * B * hkv * D * 4
        assert forward_bytes_per_rank(S, cp, B, hkv, D, e, e_id) == forward
        assert training_bytes_per_rank(S, cp, B, hkv, D, e, e_id) == forward + backward
        counted = [counts[name] for _, counts in spawned[cp]]
        print(f"cp={cp} {name}: counted (forward, backward) bytes per rank {counted}; "
              f"analytic ({forward}, {backward})")
        assert counted == [(forward, backward)] * 4


# ------------------------------------------------------------ cp = 1, one process
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_one_rank_kernel_equals_attention(case):
    """The ring kernel with no group (cp = 1: one step over the rank's own two chunks, which are the whole
    sequence) against attention; ring_attention itself at cp = 1 is attention, to the bit."""
    c = S // 2
    want_out, want_grads = _reference(case, c)
    _, hq, hkv, causal, docs, window = case
    (q, k, v), dout = _full_inputs(hq, hkv, seed=hq * 10 + hkv)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    ids = _doc_ids() if docs else None
    out = RingAttention.apply(q, k, v, ids, None, causal, 0.4, _window(window, c))
    out.backward(dout)
    for what, got, want in zip(("out", "dq", "dk", "dv"), [out.detach(), q.grad, k.grad, v.grad],
                               [want_out] + want_grads):
        assert_close(got, want, RTOL, ATOL_FRAC, what)
    plain = ring_attention(q, k, v, None, causal=causal, scale=0.4, doc_ids=ids, window=_window(window, c))
    assert torch.equal(plain, want_out)


def test_arguments_are_checked():
    q, k = torch.zeros(8, 1, 4, 8), torch.zeros(8, 1, 3, 8)
    with pytest.raises(ValueError, match="disagree"):
        ring_attention(q, k, k)
    with pytest.raises(ValueError, match="sliding window needs causal"):
        ring_attention(q, q, q, causal=False, window=2)
    with pytest.raises(ValueError, match="doc_ids must be"):
        ring_attention(q, q, q, doc_ids=torch.zeros(1, 7, dtype=torch.int64))
