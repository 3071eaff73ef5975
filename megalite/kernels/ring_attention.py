"""Ring attention: exact attention over a sequence split across a context-parallel (cp) group.

Layout (causal load balancing, as Megatron-Core and torchtitan do it). The full
sequence of length S is cut into 2 * cp chunks of c = S / (2 * cp) positions;
cp rank i holds chunks i and 2 * cp - 1 - i, concatenated along the sequence
dim, so its local q, k, v are [2c, b, h, d] (sequence-first, as in
megalite.kernels.attention). Why two chunks: under a causal mask a query at
position p does p + 1 units of work, so a plain contiguous split gives the last
rank about 2 * cp - 1 times the work of the first; pairing an early chunk with
its mirror image gives every rank exactly the same number of unmasked
(query, key) pairs, c * (S + 1) (the sum of p + 1 over both chunks), whatever
the rank, and the same computed blocks (block_plan; both tested).
`load_balanced_chunks` cuts a full tensor, `gather_load_balanced` puts the
per-rank pieces back in order (tests), `positions_of` gives the global positions
a rank holds (rotary needs them).

Communication. q stays where it is; k and v travel. k and v are stacked into
one [2, 2c, b, hkv, d] buffer (GQA/MQA: the hkv heads as they are, never
repeated per query head) and passed cp - 1 times around the ring (to rank + 1,
from rank - 1) with torch.distributed isend/irecv; the next block is in flight
while the current one is computed. With documents, the block's doc ids
(int, [b, 2c]) travel with it. Per layer and per training step, each rank sends

    forward   (cp - 1) * 2 * (S / cp) * b * hkv * d * e          bytes of k and v
    backward  (cp - 1) * 2 * (S / cp) * b * hkv * d * e          k and v again (not kept from the forward:
                                                                   that would cost cp times their memory)
            +  cp      * 2 * (S / cp) * b * hkv * d * 4          the fp32 dk/dv accumulators, which visit
                                                                   every rank and end at their owner
    with documents, + (cp - 1) * (S / cp) * b * e_id bytes of doc ids in each pass

where e is the element size of k/v (2 for bf16) and e_id that of doc_ids
(4: data.documents makes int32 ids). `forward_bytes_per_rank` states the forward figure; the test
counts what `ring_exchange` really sends, and `training_bytes_per_rank` (forward plus backward)
is what a training step's metric comm_cp_send_bytes adds up per layer and micro-batch.
Every block makes the whole trip even under a sliding window that no rank needs it for (a shorter trip is a possible
optimisation, not done). The dk/dv sends are not overlapped with compute.

Computation. Each rank keeps, per query, a running max m and running sum l of
exp(score - m) and the unnormalised output, all fp32 (online softmax), and
folds in one kv block per ring step; at the end out = acc / l and
lse = m + log l. Masks use global positions: causal (key <= query), the sliding
window (query - key < window, as megalite.kernels.attention) and documents
(same global document number). Work is planned per (query chunk, key chunk)
pair from positions alone (`block_plan`): a pair no query of which may see any
key (a future chunk under causal, a chunk beyond the window) is skipped, a pair
entirely visible is computed without a mask; the document mask depends on the
data and is always applied, never used to skip (that would need a device sync).

Backward (RingAttention.backward) is a second ring pass, flash-attention style:
the probabilities are recomputed from the saved fp32 lse, p = exp(s - lse);
dq accumulates locally, dk/dv of the visiting block accumulate in fp32 and
travel with it, arriving back at their owner after cp sends. Saved for it:
q, k, v, the fp32 output [b, hq, 2c, d] and the fp32 lse [b, hq, 2c].

What is exact: the same softmax in fp32, the same masks, the same set of keys
per query as megalite.kernels.attention on the full sequence; only the order
of the floating-point sums differs (blocks are combined by rescaling), so
results agree to a few fp32 ulps, not bit for bit. With cp == 1 (or no group)
ring_attention simply calls megalite.kernels.attention. No dropout.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megalite.distributed import comm
from megalite.kernels.attention import DocumentMask, attention


# ------------------------------------------------------------ layout helpers (pure)
def _chunk_ids(cp: int, rank: int) -> tuple[int, int]:
    """The two global chunk numbers rank holds, in local order."""
    if not 0 <= rank < cp:
        raise ValueError(f"rank {rank} is not in a cp group of {cp}")
    return rank, 2 * cp - 1 - rank


def load_balanced_chunks(x: torch.Tensor, cp: int, rank: int, dim: int = 0) -> torch.Tensor:
    """This rank's share of the full tensor x: chunks rank and 2*cp-1-rank of 2*cp along `dim`, concatenated."""
    size = x.shape[dim]
    if size % (2 * cp):
        raise ValueError(f"a sequence of {size} cannot be cut into 2 * cp = {2 * cp} equal chunks")
    chunks = x.chunk(2 * cp, dim)
    first, second = _chunk_ids(cp, rank)
    return torch.cat((chunks[first], chunks[second]), dim)


def gather_load_balanced(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Inverse of load_balanced_chunks: the full tensor from every rank's share, given in rank order."""
    cp = len(parts)
    ordered: list[torch.Tensor | None] = [None] * (2 * cp)
    for rank, part in enumerate(parts):
        first, second = _chunk_ids(cp, rank)
        ordered[first], ordered[second] = part.chunk(2, dim)
    return torch.cat(ordered, dim)


def positions_of(S: int, cp: int, rank: int) -> torch.Tensor:
    """Global positions (int64 [S / cp]) rank holds, in local order: where rotary must look them up."""
    return load_balanced_chunks(torch.arange(S), cp, rank)


def _visibility(q_chunk: int, k_chunk: int, c: int, causal: bool, window: int | None) -> str:
    """'none', 'all' or 'some' of the (query, key) pairs of two chunks that the position masks allow.

    Chunks are contiguous ranges, so query - key spans [q0 - k1, q1 - k0]; causal allows the differences
    >= 0, the window those <= window - 1.
    """
    if not causal:
        return "all"
    q0, q1 = q_chunk * c, q_chunk * c + c - 1
    k0, k1 = k_chunk * c, k_chunk * c + c - 1
    lo, hi = q0 - k1, q1 - k0
    top = math.inf if window is None else window - 1
    if hi < 0 or lo > top:
        return "none"
    return "all" if lo >= 0 and hi <= top else "some"


def block_plan(cp: int, rank: int, src: int, c: int, causal: bool = True,
               window: int | None = None) -> list[tuple[int, list[int], bool]]:
    """What rank computes against the kv block of rank src: per local query chunk a (0, 1) that sees
    anything, (a, local key chunks of the block it needs, whether a position mask is needed)."""
    plan = []
    for a, q_chunk in enumerate(_chunk_ids(cp, rank)):
        seen = [(kk, _visibility(q_chunk, k_chunk, c, causal, window))
                for kk, k_chunk in enumerate(_chunk_ids(cp, src))]
        keys = [kk for kk, vis in seen if vis != "none"]
        if keys:
            plan.append((a, keys, any(vis == "some" for kk, vis in seen if kk in keys)))
    return plan


def forward_bytes_per_rank(S: int, cp: int, b: int, hkv: int, d: int, element_size: int,
                           doc_id_size: int = 0) -> int:
    """Bytes each rank sends in one ring_attention forward (see the module docstring)."""
    return (cp - 1) * (S // cp) * b * (2 * hkv * d * element_size + doc_id_size)


def training_bytes_per_rank(S: int, cp: int, b: int, hkv: int, d: int, element_size: int,
                            doc_id_size: int = 0) -> int:
    """Bytes each rank sends for one layer's forward and backward (the module docstring): k/v (and doc
    ids) twice, plus the fp32 dk/dv accumulators once around the whole ring."""
    kv = forward_bytes_per_rank(S, cp, b, hkv, d, element_size, doc_id_size)
    return 2 * kv + cp * 2 * (S // cp) * b * hkv * d * 4


# ------------------------------------------------------------ communication
def ring_exchange(tensors: list[torch.Tensor], group, send_to: int, recv_from: int,
                  first_tag: int = 0) -> tuple[list, list]:
    """Start sending each tensor to group rank send_to and receiving a like one from recv_from.

    Returns (received buffers, work handles to wait on). Every byte the kernel sends goes through here
    (the byte-count test wraps it). Each tensor has its own tag (first_tag, first_tag + 1, ...): messages
    in flight at the same time between the same two ranks must not be paired up by arrival order.
    """
    received, works = [], []
    for tag, t in enumerate(tensors, first_tag):
        comm.record("send", t, "cp")  # metrics: comm_cp_send_bytes per step
        buf = torch.empty_like(t)
        works.append(dist.isend(t.contiguous(), group=group, group_dst=send_to, tag=tag))
        works.append(dist.irecv(buf, group=group, group_src=recv_from, tag=tag))
        received.append(buf)
    return received, works


_DKV_TAG = 2  # kv and doc ids use tags 0 and 1; dk/dv cross the same link while they are in flight


def _wait(works) -> None:
    comm.wait(*works)


# ------------------------------------------------------------ block math (fp32)
def _key_slice(block: torch.Tensor, keys: list[int], c: int, dim: int) -> torch.Tensor:
    """The local key chunks `keys` (a sorted subset of [0, 1]) of a block, along dim."""
    return block.narrow(dim, keys[0] * c, len(keys) * c)  # [0], [1] or [0, 1]: always one contiguous range


def _block_mask(q_pos, k_pos, q_doc, k_doc, causal, window, need_position_mask):
    """Boolean [b | 1, 1, 1, sq, tk] (True = may attend) for one query chunk against some key chunks,
    or None when everything is visible."""
    mask = None
    if need_position_mask:
        diff = q_pos[:, None] - k_pos[None, :]  # [sq, tk]
        mask = diff >= 0
        if window is not None:
            mask &= diff < window
        mask = mask[None]
    if q_doc is not None:
        same = q_doc[:, :, None] == k_doc[:, None, :]  # [b, sq, tk]: documents are global numbers
        mask = same if mask is None else mask & same
    return None if mask is None else mask[:, None, None]


def _chunk_positions(cp: int, rank: int, c: int, device) -> list[torch.Tensor]:
    return [torch.arange(g * c, g * c + c, device=device) for g in _chunk_ids(cp, rank)]


def _block_scores(q_rows, kv, keys, c, q_pos, k_pos, doc_ids, docs, rows, causal, window, need_mask, scale):
    """Scaled, masked scores [b, hkv, r, c, t] of one query chunk against the visiting block's `keys`,
    and that block's k and v as [b, hkv, t, d] fp32 (the same in forward and backward)."""
    kb, vb = (_key_slice(kv[i], keys, c, 0).float().permute(1, 2, 0, 3) for i in (0, 1))  # [b, hkv, t, d]
    scores = torch.einsum("bgrsd,bgtd->bgrst", q_rows, kb) * scale
    mask = _block_mask(q_pos, _key_slice(k_pos, keys, c, 0), None if docs is None else doc_ids[:, rows],
                       None if docs is None else _key_slice(docs, keys, c, 1), causal, window, need_mask)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores, kb, vb


class RingAttention(torch.autograd.Function):
    """The ring kernel as an autograd Function; ring_attention is the entry point. group None: cp = 1."""

    @staticmethod
    def forward(ctx, q, k, v, doc_ids, group, causal, scale, window):
        cp = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        s2, b, hq, d = q.shape
        hkv, c, r = k.shape[2], s2 // 2, hq // k.shape[2]
        # [2c, b, hq, d] -> [b, hkv, r, 2c, d]: query head g*r + i shares kv head g (as attention._math)
        qg = q.float().permute(1, 2, 0, 3).reshape(b, hkv, r, s2, d)
        kv = torch.stack((k, v))  # [2, 2c, b, hkv, d]: one buffer on the wire per step
        m = torch.full((b, hkv, r, s2), float("-inf"), device=q.device)
        l = torch.zeros(b, hkv, r, s2, device=q.device)
        acc = torch.zeros(b, hkv, r, s2, d, device=q.device)
        q_pos = _chunk_positions(cp, rank, c, q.device)
        docs = doc_ids
        for step in range(cp):
            src = (rank - step) % cp
            works = []
            if step < cp - 1:  # the next block is on its way while this one is computed
                travel = [kv] if docs is None else [kv, docs]
                nxt, works = ring_exchange(travel, group, (rank + 1) % cp, (rank - 1) % cp)
            k_pos = torch.cat(_chunk_positions(cp, src, c, q.device))
            for a, keys, need_mask in block_plan(cp, rank, src, c, causal, window):
                rows = slice(a * c, a * c + c)
                scores, kb, vb = _block_scores(qg[..., rows, :], kv, keys, c, q_pos[a], k_pos, doc_ids, docs, rows,
                                               causal, window, need_mask, scale)
                m_old = m[..., rows]
                m_new = torch.maximum(m_old, scores.amax(-1))
                # a row that has seen no visible key yet keeps m = -inf; shift by 0 there so that
                # exp(-inf - shift) is 0 rather than exp(-inf + inf) = NaN
                shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
                p = torch.exp(scores - shift[..., None])
                alpha = torch.exp(m_old - shift)  # rescales what was summed under the old max
                l[..., rows] = l[..., rows] * alpha + p.sum(-1)
                acc[..., rows, :] = acc[..., rows, :] * alpha[..., None] + torch.einsum("bgrst,bgtd->bgrsd", p, vb)
                m[..., rows] = m_new
            _wait(works)
            if step < cp - 1:
                kv = nxt[0]
                docs = None if docs is None else nxt[1]
        # every query sees at least itself (causal) or its document, so l > 0
        out = acc / l[..., None]
        lse = m + torch.log(l)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.group, ctx.causal, ctx.scale, ctx.window = group, causal, scale, window
        return out.reshape(b, hq, s2, d).permute(2, 0, 1, 3).reshape(s2, b, hq * d).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        group, causal, scale, window = ctx.group, ctx.causal, ctx.scale, ctx.window
        cp = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        s2, b, hq, d = q.shape
        hkv, c, r = k.shape[2], s2 // 2, hq // k.shape[2]
        qg = q.float().permute(1, 2, 0, 3).reshape(b, hkv, r, s2, d)
        do = dout.float().reshape(s2, b, hq, d).permute(1, 2, 0, 3).reshape(b, hkv, r, s2, d)
        delta = (do * out).sum(-1)  # [b, hkv, r, 2c]: rowsum(dout * out) = sum_t p * dp, the softmax jacobian term
        dq = torch.zeros_like(qg)
        kv = torch.stack((k, v))
        dkv = torch.zeros(kv.shape, device=q.device)  # fp32 accumulators of the visiting block, [2, 2c, b, hkv, d]
        q_pos = _chunk_positions(cp, rank, c, q.device)
        docs = doc_ids
        for step in range(cp):
            src = (rank - step) % cp
            works = []
            if step < cp - 1:
                travel = [kv] if docs is None else [kv, docs]
                nxt, works = ring_exchange(travel, group, (rank + 1) % cp, (rank - 1) % cp)
            k_pos = torch.cat(_chunk_positions(cp, src, c, q.device))
            for a, keys, need_mask in block_plan(cp, rank, src, c, causal, window):
                rows = slice(a * c, a * c + c)
                qa, doa = qg[..., rows, :], do[..., rows, :]
                scores, kb, vb = _block_scores(qa, kv, keys, c, q_pos[a], k_pos, doc_ids, docs, rows, causal, window,
                                               need_mask, scale)
                p = torch.exp(scores - lse[..., rows, None])  # the forward's probabilities, from its lse
                dp = torch.einsum("bgrsd,bgtd->bgrst", doa, vb)
                ds = p * (dp - delta[..., rows, None]) * scale
                dq[..., rows, :] += torch.einsum("bgrst,bgtd->bgrsd", ds, kb)
                # sum over the r query heads of each group: GQA's kv gradient, [b, hkv, t, d] -> [t, b, hkv, d]
                dk = torch.einsum("bgrst,bgrsd->tbgd", ds, qa)
                dv = torch.einsum("bgrst,bgrsd->tbgd", p, doa)
                _key_slice(dkv[0], keys, c, 0).add_(dk)
                _key_slice(dkv[1], keys, c, 0).add_(dv)
            # this block's accumulators move on with it (the cp-th send brings them home). Not overlapped
            # with compute: they are complete only now, and the next step adds into what arrives
            if cp > 1:
                received, dkv_works = ring_exchange([dkv], group, (rank + 1) % cp, (rank - 1) % cp, _DKV_TAG)
                _wait(dkv_works)
                dkv = received[0]
            _wait(works)
            if step < cp - 1:
                kv = nxt[0]
                docs = None if docs is None else nxt[1]
        dq = dq.reshape(b, hq, s2, d).permute(2, 0, 1, 3).to(q.dtype)  # -> [2c, b, hq, d]
        return dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, causal: bool = True,
                   scale: float | None = None, doc_ids: torch.Tensor | None = None,
                   window: int | None = None) -> torch.Tensor:
    """Exact attention of this rank's load-balanced queries over the whole sequence of the cp group.

    q [2c, b, hq, d], k/v [2c, b, hkv, d]: this rank's chunks (load_balanced_chunks along dim 0) of a
    sequence of S = 2c * cp -> out [2c, b, hq * d], this rank's rows of attention(...) on the full
    sequence. doc_ids [b, 2c] (optional): the global document number of each local position. window:
    a query sees itself and window - 1 positions back (causal only). group None or of size 1: plain
    megalite.kernels.attention.
    """
    s2, b, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != s2 or k.shape[1] != b or k.shape[3] != d or hq % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree; expected q "
                         "[2c, b, hq, d] and k, v [2c, b, hkv, d] with hq a multiple of hkv")
    if window is not None and (not causal or window < 1):
        raise ValueError(f"a sliding window needs causal attention and window >= 1; got window={window}, "
                         f"causal={causal}")
    if doc_ids is not None and (tuple(doc_ids.shape) != (b, s2) or doc_ids.is_floating_point()):
        raise ValueError(f"doc_ids must be an integer tensor [b, s_local] = [{b}, {s2}]; got {doc_ids.dtype} "
                         f"{tuple(doc_ids.shape)}")
    if group is None or dist.get_world_size(group) == 1:
        documents = None if doc_ids is None else DocumentMask(doc_ids)
        return attention(q, k, v, causal=causal, scale=scale, documents=documents, window=window)
    if s2 % 2:
        raise ValueError(f"a load-balanced rank holds two equal chunks; got {s2} local positions")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    return RingAttention.apply(q, k, v, None if doc_ids is None else doc_ids.contiguous(), group, causal, scale,
                               window)
