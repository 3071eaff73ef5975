"""The Mixture-of-Experts feed-forward: a router, top-k routed experts, optional shared experts.

    x [s, b, h] -> router logits [n, E] (n = s * b tokens) -> top-k experts per token, weights w
                -> y_t = sum_k w_tk * expert_k(x_t)  (+ shared(x_t))                -> [s, b, h]

Router (model.moe_router). 'softmax': p = softmax(logits) over all E experts, the top k kept and,
with moe_norm_topk_prob, renormalised to sum to 1 (Mixtral's softmax over the top-k logits is the
same thing; Qwen3-MoE's norm_topk_prob). 'sigmoid': scores sigmoid(logits), the top k normalised
to sum to 1 (DeepSeek-V3, without its bias-based balancing). Routing runs in fp32, with autocast off
(CPU and CUDA): logits, probabilities and top-k weights are fp32 whatever the compute dtype; the
router's matmul (`RouterLogits`) upcasts x and keeps it for backward in its own dtype.

Experts. Each is the dense MLP's shape at width f = moe_ffn_hidden_size: fc1 [E, 2f, h] (SwiGLU,
rows alternating gate_j, up_j as the dense MLP's) or [E, f, h] (GELU), fc2 [E, h, f], no biases.
They are computed batched per expert: the tokens routed to the experts are gathered in expert
order and run through all of them by two grouped matmuls (torch._grouped_mm: one kernel each for
fc1 and fc2 over the contiguous runs, on the CPU and on CUDA from compute capability 9.0 in bf16;
it has no autocast rule, so the 16-bit cast is done here), else by a loop over the local experts
(older GPUs, widths h or f whose rows are not a multiple of 16 bytes, and a torch without it);
both compute the same products, and return them in the compute dtype. The weighted sum over a token's
slots is taken in fp32 by `Combine`: the index_add of y.float() * w autograd would run, forward and
backward the same bits, but keeping the slots' outputs y in their own dtype (e*h bytes a slot) instead
of an fp32 copy and the fp32 product (8*h). Dropless by default; with moe_capacity_factor c an expert takes at most
ceil(c * n * k / E) of its slots in token order and drops the rest (the token then gets only its
other experts' share, no renormalisation), counted in the stats.

Auxiliary losses, as Switch Transformer and ST-MoE define them, per MoE layer and micro-batch:
    load balancing  aux = E * sum_i f_i * P_i    f_i = share of the n*k routed slots expert i got,
                                                 P_i = mean router probability of expert i
    z-loss          z = mean_t logsumexp(logits_t)^2
They join the training objective with their coefficients without passing through the pipeline:
`AddAuxLossGrad` returns the layer's output unchanged and, in backward, feeds the loss its own
gradient (coefficient x MoEState.grad_scale, which the runner sets to the loss scale over the
micro-batches), as Megatron-Core's MoEAuxLossAutoScaler does.

Dispatch. The routed slots (token, k) are sorted by expert, token order within an expert (the
capacity cut keeps the first ones), and each expert runs once on its contiguous run of tokens.
Under expert parallelism (`ep_group`, parallel.ep) a rank holds experts [r * E/ep, (r+1) * E/ep)
of the ep group's rank r: the sorted slots go to their experts' ranks by one all-to-all (the
per-expert counts first, by another), are computed there and come back by a second one; both are
autograd functions whose backward is the reverse all-to-all. Routing, capacity and the auxiliary
statistics stay those of the rank's own tokens, as without ep.

Parallelism. Under tensor parallelism the experts are replicated: every tp rank holds them all (or
its ep share) and computes them on its tokens (the whole sequence, or its 1/tp under SP, where
their gradients are partial sums like a norm's, marked so). Ranks that split a micro-batch's
tokens (tp under SP, cp) sum the expert counts f_i over `token_groups` so that every rank routes
against the micro-batch's statistics, and each rank adds its own tokens' part of P_i and of the
z-loss: the parts sum to the one-process values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalite.config import ModelConfig, moe_ffn_hidden_size
from megalite.distributed import comm
from megalite.tensor_parallel import group_rank, group_size, init_shard_, mark, normal_init


@dataclass
class MoEState:
    """What a model's MoE layers share with the training loop: the gradient scale of their auxiliary
    losses (set by the runner before each training batch) and the statistics of the last forwards,
    per layer (cleared by `take_stats`)."""

    grad_scale: float = 1.0
    stats: dict = field(default_factory=dict)

    def take_stats(self) -> dict:
        """Layer -> [{"aux_loss", "z_loss", "dropped", "load" (tokens per expert)}] per micro-batch since
        the last call, summed over the ranks that split the micro-batch; then cleared."""
        out, self.stats = self.stats, {}
        return {layer: [{"aux_loss": float(p[0]), "z_loss": float(p[1]), "dropped": int(p[2]),
                         "load": load.tolist()} for p, load in rows] for layer, rows in out.items()}


class AddAuxLossGrad(torch.autograd.Function):
    """Identity on `out`; in backward, the auxiliary `loss` (a scalar) gets gradient `scale`."""

    @staticmethod
    def forward(ctx, out, loss, scale: float):
        ctx.scale = scale
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.loss_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class AllToAll(torch.autograd.Function):
    """Rows of x [m, ...] in `in_splits` (one count per group rank) to every rank of `group`; returns the
    rows received, `out_splits` from each. Backward sends the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x, group, out_splits: list[int], in_splits: list[int]):
        ctx.group, ctx.splits = group, (out_splits, in_splits)
        return _all_to_all(x, group, out_splits, in_splits)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, ctx.group, in_splits, out_splits), None, None, None


def _all_to_all(x: torch.Tensor, group, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    comm.record("all_to_all", x, "ep")
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class RouterLogits(torch.autograd.Function):
    """logits [n, E] = x.float() @ w.float().t() in fp32 (run it with autocast off). Saves x and w in their
    own dtypes (the upcast is exact) rather than an fp32 copy of a 16-bit x."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(x.float(), w.float())

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = grad.mm(w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad.t().mm(x.float()).to(w.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


class Combine(torch.autograd.Function):
    """The weighted sum, in fp32: out [n, h] = zeros.index_add(0, token_of, y.float() * w[:, None]) of the
    slots' expert outputs y [m, h] (any dtype) and weights w [m] (fp32). The same computation autograd
    would do on those ops, forward and backward, but keeping only y in its own dtype, w and token_of
    (autograd keeps an fp32 copy of a 16-bit y for the multiply and the product for index_add)."""

    @staticmethod
    def forward(ctx, y, w, token_of, n: int):
        ctx.save_for_backward(y, w, token_of)
        return y.new_zeros((n, y.shape[1]), dtype=torch.float32).index_add(0, token_of, y.float() * w[:, None])

    @staticmethod
    def backward(ctx, grad):
        y, w, token_of = ctx.saved_tensors
        g = grad.index_select(0, token_of)
        grad_y = (g * w[:, None]).to(y.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g * y.float()).sum(1, keepdim=True).reshape(-1) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w, None, None


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (a checkpoint's recompute)."""
    return torch._C._current_graph_task_id() != -1


def _sum_over(t: torch.Tensor, groups) -> torch.Tensor:
    """t summed over every group in `groups` (no autograd: used on counts)."""
    for group in groups:
        dist.all_reduce(t, group=group)
    return t


def _grouped_mm_takes(rows: torch.Tensor, width: int, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs the experts here: it exists, the device has a kernel for `dtype`
    (the CPU any float; CUDA bf16 from sm90) and every operand's rows are 16-byte multiples."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16):
        return False
    if rows.device.type == "cuda" and (dtype != torch.bfloat16 or torch.cuda.get_device_capability(rows.device)[0] < 9):
        return False
    size = torch.finfo(dtype).bits // 8
    return rows.device.type in ("cpu", "cuda") and (rows.shape[-1] * size) % 16 == 0 and (width * size) % 16 == 0


class MoE(nn.Module):
    """The MoE feed-forward of one transformer layer (see the module docstring).

    `token_groups`: the process groups over which a micro-batch's tokens are split (tp under SP,
    cp); `grad_share`: the factor the averaging of gradients over cp divides a token-split rank's
    part by (cp), restored on the auxiliary losses' gradients; `state` the model's MoEState;
    `layer` this layer's number (1 .. L), the key of its stats.
    """

    def __init__(self, cfg: ModelConfig, state: MoEState, layer: int, sequence_parallel: bool = False,
                 token_groups=(), grad_share: int = 1, shared: nn.Module | None = None, ep_group=None):
        super().__init__()
        self.num_experts, self.top_k, self.layer, self.state = cfg.moe_num_experts, cfg.moe_top_k, layer, state
        self.router_kind, self.norm_topk = cfg.moe_router, cfg.moe_norm_topk_prob
        self.aux_coeff, self.z_coeff, self.capacity_factor = (cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff,
                                                              cfg.moe_capacity_factor)
        self.token_groups, self.grad_share = tuple(g for g in token_groups if g is not None), grad_share
        self.swiglu = cfg.activation == "swiglu"
        h, f, e = cfg.hidden_size, moe_ffn_hidden_size(cfg), cfg.moe_num_experts
        self.init_std, self.out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.ep_group, self.ep, self.ep_rank = ep_group, group_size(ep_group), group_rank(ep_group)
        if e % self.ep:
            raise ValueError(f"model.moe_num_experts={e} is not divisible by parallel.ep={self.ep}")
        self.local = e // self.ep  # experts this rank holds: [ep_rank * local, (ep_rank + 1) * local)
        self.router = nn.Parameter(torch.empty(e, h))
        self.fc1 = nn.Parameter(torch.empty(self.local, 2 * f if self.swiglu else f, h))
        self.fc2 = nn.Parameter(torch.empty(self.local, h, f))
        if self.ep > 1:
            for p in (self.fc1, self.fc2):
                mark(p, expert_parallel=True)
        self.shared = shared  # an MLP every token passes through (model.moe_shared_experts), or None
        if sequence_parallel:  # each tp rank routes its own tokens: gradients are partial sums over tp
            for p in (self.router, self.fc1, self.fc2):
                mark(p, sequence_parallel=True)

    def init_weights(self, seed: int, prefix: str) -> None:
        """Router and fc1 ~ N(0, init_std), fc2 ~ N(0, init_std / sqrt(2L)) as the dense MLP's output."""
        init_shard_(self.router, normal_init(self.init_std), seed, f"{prefix}.router", None, 0, 1)
        for name, std in (("fc1", self.init_std), ("fc2", self.out_std)):  # this rank's experts of the whole
            init_shard_(getattr(self, name), normal_init(std), seed, f"{prefix}.{name}", 0, self.ep_rank, self.ep)

    # ------------------------------------------------------------ routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens [n, h] -> (experts [n, k] int64, weights [n, k] fp32, probabilities [n, E] fp32, logits)."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 routing, under autocast too
            return self._route(x)

    def _route(self, x: torch.Tensor):
        logits = RouterLogits.apply(x, self.router)  # [n, E] fp32
        if self.router_kind == "sigmoid":
            probs = torch.sigmoid(logits)
            weights, experts = probs.topk(self.top_k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
        else:
            probs = logits.softmax(-1)
            weights, experts = probs.topk(self.top_k, dim=-1)
            if self.norm_topk:
                weights = weights / weights.sum(-1, keepdim=True)
        return experts, weights, probs, logits

    def capacity(self, tokens: int) -> int | None:
        """Slots per expert per micro-batch (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens [m, h] -> [m, h] (under autocast the matmuls run in 16-bit)."""
        a = torch.matmul(x, self.fc1[e].t())
        a = F.silu(a[:, 0::2]) * a[:, 1::2] if self.swiglu else F.gelu(a)
        return torch.matmul(a, self.fc2[e].t())

    # ------------------------------------------------------------ forward
    def _slots(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The routed slots (flat indices into [n, k]) sorted by expert, token order within one, past
        capacity dropped; and the slots each expert keeps [E]; and how many were dropped."""
        n, k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat * n + torch.arange(n, device=flat.device).repeat_interleave(k), stable=True)
        load = torch.bincount(flat, minlength=self.num_experts)
        cap = self.capacity(n)
        if cap is None or int(load.max()) <= cap:
            return order, load, 0
        starts = torch.cumsum(load, 0) - load
        rank_in_expert = torch.arange(order.numel(), device=flat.device) - starts[flat[order]]
        kept = order[rank_in_expert < cap]
        return kept, load.clamp(max=cap), int(order.numel() - kept.numel())

    def _run_local_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [m, h] grouped by this rank's local experts, `counts` [local] of them -> outputs [m, h] in the
        experts' compute dtype (16-bit under autocast)."""
        dtype = torch.get_autocast_dtype(rows.device.type) if torch.is_autocast_enabled(rows.device.type) \
            else rows.dtype
        if rows.shape[0] and _grouped_mm_takes(rows, self.fc2.shape[-1], dtype):
            return self._grouped_experts(rows.to(dtype), counts, dtype)
        parts = [self._expert(j, rows_j) for j, rows_j in enumerate(rows.split(counts.tolist()))]
        return torch.cat(parts) if parts else rows.new_zeros(rows.shape, dtype=torch.float32)

    def _grouped_experts(self, rows: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Every local expert on its run of `rows` by two grouped matmuls (the products of `_expert`)."""
        ends = torch.cumsum(counts, 0).to(torch.int32)
        a = torch._grouped_mm(rows, self.fc1.to(dtype).transpose(1, 2), offs=ends)
        a = F.silu(a[:, 0::2]) * a[:, 1::2] if self.swiglu else F.gelu(a)
        return torch._grouped_mm(a, self.fc2.to(dtype).transpose(1, 2), offs=ends)

    def _dispatch(self, rows: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        """Sorted rows [m, h] (load [E] per expert) -> their experts' outputs, computed where they live."""
        if self.ep == 1:
            return self._run_local_experts(rows, load)
        per_rank = load.reshape(self.ep, self.local)  # what goes to each rank, per expert there
        incoming = torch.empty_like(per_rank)
        dist.all_to_all_single(incoming, per_rank, group=self.ep_group)  # row r: from rank r, per local expert
        sent, received = per_rank.sum(1).tolist(), incoming.sum(1).tolist()
        arrived = AllToAll.apply(rows, self.ep_group, received, sent)  # grouped by source, then expert
        by_expert = torch.argsort(torch.arange(self.local, device=rows.device).repeat(self.ep)
                                  .repeat_interleave(incoming.reshape(-1)), stable=True)
        computed = torch.empty_like(arrived, dtype=torch.float32)
        computed[by_expert] = self._run_local_experts(arrived[by_expert], incoming.sum(0)).float()
        return AllToAll.apply(computed, self.ep_group, sent, received)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, h = x.shape
        tokens = x.reshape(-1, h)
        experts, weights, probs, logits = self.route(tokens)
        slots, load, dropped = self._slots(experts)
        token_of = slots // self.top_k
        y = self._dispatch(tokens[token_of], load)
        out = Combine.apply(y, weights.reshape(-1)[slots], token_of, tokens.shape[0])  # fp32 weighted sum
        out = out.to(x.dtype).reshape(s, b, h)
        if self.shared is not None:
            out = out + self.shared(x)
        return self._with_aux_losses(out, experts, probs, logits, load.float(), dropped)

    def _with_aux_losses(self, out, experts, probs, logits, load, dropped) -> torch.Tensor:
        """Record the stats; attach the load-balancing and z-losses' gradients to `out` when training."""
        n = torch.tensor([float(probs.shape[0])], device=probs.device)
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts).float()
        routed = _sum_over(torch.cat((counts, n, load)).detach(), self.token_groups)  # the micro-batch's
        counts_all, n_all, load_all = routed[:self.num_experts], routed[self.num_experts], routed[-self.num_experts:]
        f = counts_all / (n_all * self.top_k)
        aux = self.num_experts * (f * probs.sum(0)).sum() / n_all  # this rank's part of E * sum f_i P_i
        z = torch.logsumexp(logits, -1).square().sum() / n_all      # and of mean(lse^2)
        parts = _sum_over(torch.stack((aux, z, torch.tensor(float(dropped), device=aux.device))).detach(),
                          self.token_groups)
        if not _in_backward():  # a recomputed forward (activation checkpointing) is not counted twice
            self.state.stats.setdefault(self.layer, []).append((parts, load_all))  # tensors: no sync here
        if not (self.training and torch.is_grad_enabled()):
            return out
        scale = self.state.grad_scale * self.grad_share
        total = self.aux_coeff * aux + self.z_coeff * z
        return AddAuxLossGrad.apply(out, total, scale)


def summarize(stats: dict) -> dict:
    """The step's MoE metrics from `MoEState.take_stats()` (layer -> per-micro-batch stats), {} when dense.

    moe_aux_loss, moe_z_loss: mean over layers and micro-batches (without coefficients);
    moe_dropped_tokens: routed slots dropped by the capacity factor, summed; moe_load_min/max: the
    least and most loaded expert's share of its layer's slots times E (1 is perfect balance), over
    all layers; moe_load_entropy: mean over layers of the entropy (nats) of the slot shares, whose
    maximum is ln E; moe_load_entropy_l<i>: that of layer i.
    """
    if not stats:
        return {}
    out, entropies, shares = {}, [], []
    for layer in sorted(stats):
        load = torch.tensor([row["load"] for row in stats[layer]]).sum(0)
        share = load / load.sum().clamp_min(1)
        entropy = float(-(share * share.clamp_min(1e-30).log()).sum())
        out[f"moe_load_entropy_l{layer}"] = entropy
        entropies.append(entropy)
        shares.append(share * len(share))
    rows = [row for layer in stats.values() for row in layer]
    every = torch.cat(shares)
    out.update({"moe_aux_loss": sum(r["aux_loss"] for r in rows) / len(rows),
                "moe_z_loss": sum(r["z_loss"] for r in rows) / len(rows),
                "moe_dropped_tokens": sum(r["dropped"] for r in rows),
                "moe_load_min": float(every.min()), "moe_load_max": float(every.max()),
                "moe_load_entropy": sum(entropies) / len(entropies)})
    return out
