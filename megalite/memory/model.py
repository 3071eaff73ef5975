"""The memory model: bytes one rank holds, predicted from the config alone.

Activations (what autograd keeps for backward) of one transformer block, per token of a
micro-batch on one tensor-parallel rank, with e the compute dtype's bytes (2 under bf16/fp16
autocast, 4 in fp32), h_sp = h/tp under sequence parallelism (else h), and q = hq*d/tp, kv = hkv*d/tp,
f = ffn/tp this rank's widths:

    norms (x2)       e*h_sp + stats     16-bit: the input and fp32 1/rms (4 bytes; LayerNorm mean too, 8;
                                        under SP per token this rank holds: 4/tp)
                                        fp32 RMSNorm: autograd keeps the input and x/rms, 8*h_sp + 4
                                        fp32 LayerNorm: the input, mean and 1/std, 4*h_sp + 8
    matmul inputs    2 * e*h_sp         qkv's and fc1's (norm outputs; under SP the local chunk, see
                                        tensor_parallel.sequence_parallel_linear); proj's and fc2's below
    attention        e*(2q + 2kv)       rotated q, k, own v, the output (proj's input, the same storage)
                     + 4*hq/tp          sdpa/flash: fp32 log-sum-exp per head
                     + e*hq*s/tp        math path instead: the softmax probabilities (plus one [s, s]
                                        bool mask per micro-batch, not per token)
    MLP              e*(2f + f)         SwiGLU: fc1's output and fc2's input; GELU: e*(f + f)
    MoE layer        instead of the MLP, see below (model.moe_*, the layers is_moe_layer picks)
    q/k norm         e*(q + kv) + 4*(hq + hkv)/tp   model.qk_norm: as a norm over each head's d
                                        features (fp32: 8*(q + kv) + 4*(hq + hkv)/tp); whole heads, so
                                        SP does not divide it
    context parallel  everything / cp    cp > 1: a rank holds s/cp of each sequence; ring attention
                      + 4*q, 4*hq        (kernels.ring_attention) keeps its fp32 output and fp32
                                        log-sum-exp for backward instead of a backend's internals
                                        (whatever the backend); figures are per token of the whole
                                        sequence, as under SP

'selective' keeps the same less the attention core's internals (lse or the probabilities) and
SwiGLU's activation (e*f); 'full' keeps only the block input, e*h_sp, in each recomputed block.
Under autocast every micro-batch's graph also holds the 16-bit copies of the block's matmul
weights (e bytes per matmul parameter on this rank), which do not grow with the batch; under cp
also the rotary tables gathered at the rank's positions (fp32 cos and sin, 4 * d bytes per local
position).

A pipeline stage holds as many (micro-batch, chunk) graphs at once as its schedule leaves in
flight (`in_flight`); parameters, gradients and optimizer state follow `STATE_BYTES`.

An MoE layer (megalite.model.moe, dropless) keeps, in place of fc1's input and the MLP, per token this
rank routes (all s under tp without SP, where every tp rank holds and runs all the experts; s/tp under
SP; s/cp under cp), with E experts, top-k, f = moe_ffn_hidden_size (whole: tp does not split experts)
and r = 4 the router's bytes (moe.py routes in fp32 with autocast off, on the CPU and CUDA alike):

    router           e*h + 2*r*E + r    its input (the norm output, in its own dtype: moe.RouterLogits
                     + 8*k              upcasts it), the probabilities, the logits and log-sum-exp the
                                        z-loss keeps (even at coefficient 0), the top-k expert ids (int64)
                     + r*k + r          sigmoid, or softmax with moe_norm_topk_prob: the top-k weights and
                                        their sum, kept by the renormalising division
    per routed slot  16 + r + e*h       k slots per token: int64 token and slot ids, the slot's weight,
    (k per token)    + e*4f | e*2f      the gathered row, SwiGLU: fc1's output, silu(gate) (plain
                                        autograd, not the dense MLP's _SwiGLU) and fc2's input; GELU: e*2f
                     + e*h              the expert output in the compute dtype, kept by moe.Combine (the
                                        fp32 weighted sum; before it, autograd's index_add over an fp32
                                        copy kept 8*h)
    shared experts   the dense MLP's    model.moe_shared_experts: at width moe_shared_experts*f/tp; its
                                        input is the router's (the norm output, counted once)

Each slot term is one buffer over all the experts (the sorted rows, the grouped matmuls' outputs) or
one per expert (the expert loop's), summing alike, so given the routed-slot count (dropless: exactly k
per token) the bytes do not depend on how the slots split across experts.
'selective' recomputes nothing in the routed experts (only the shared experts' SwiGLU activation);
'full' keeps the block input as for a dense block. Per micro-batch (fixed): under autocast the 16-bit
copies of every expert (E*3*f*h SwiGLU; the fp32 router has none) and the shared experts' tp shard, and in
any dtype 4*E + 4*(2E + 1) bytes
of load-balancing statistics (fp32); not counted: torch._grouped_mm's int32 offsets (4*E bytes) where
moe.py takes that path. The routing is fp32 on CUDA as on the CPU (autocast off), so the router's
terms hold there too, though the checks run on the CPU.

The figures are checked against exact measurements in tools/bench_memory.py (saved-tensor bytes
per layer) and tools/bench_zero_memory.py (state bytes per parameter). Not modelled (refused by
name): dropout (its masks), which the predictions assume off; in MoE layers a capacity factor (the
kept slots depend on the routing) and expert parallelism (a rank computes the slots every ep rank
routes to its experts).
"""
from __future__ import annotations

from dataclasses import dataclass

from megalite.config import ModelConfig, head_dim, is_moe_layer, moe_ffn_hidden_size, resolved_ffn_hidden_size
from megalite.pipeline.schedules import compute_order  # the very schedule the executor runs

# (weights, gradients, optimizer state) bytes per parameter on one rank, functions of dp (mixed
# precision Adam; the ZeRO paper's rules). The native engine keeps fp32 weights, grads and moments.
STATE_BYTES = {
    "native": lambda dp: (4, 4, 8),
    "zero-1": lambda dp: (2, 2, 12 / dp),
    "zero-2": lambda dp: (2, 2 / dp, 12 / dp),
    "zero-3": lambda dp: (2 / dp, 2 / dp, 12 / dp),
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ATTENTION_BACKENDS = ("flash", "sdpa", "math")


@dataclass(frozen=True)
class Layout:
    """What the activation bytes depend on besides the model: parallelism, recompute, dtype, kernel."""

    tp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"        # train.activation_checkpointing
    precision: str = "fp32"        # train.precision
    attention: str = "sdpa"        # the attention backend the run uses (megalite.kernels.attention)
    cp: int = 1                    # parallel.cp: ring attention over s / cp positions per rank
    ep: int = 1                    # parallel.ep: MoE experts sharded over ep ranks (not modelled: refused)


def _check(cfg: ModelConfig, lay: Layout) -> None:
    if cfg.dropout:
        raise ValueError(f"model.dropout={cfg.dropout}: the memory model leaves dropout masks out; "
                         "predict with model.dropout=0")
    if cfg.moe_num_experts and cfg.moe_capacity_factor is not None:
        raise ValueError(f"model.moe_capacity_factor={cfg.moe_capacity_factor}: the memory model does not yet "
                         "predict an MoE layer with dropped slots (how many an expert keeps depends on the "
                         "routing); predict the dropless layer, an upper bound, with model.moe_capacity_factor=null")
    if cfg.moe_num_experts and lay.ep > 1:
        raise ValueError(f"parallel.ep={lay.ep}: the memory model does not yet predict expert parallelism (a rank "
                         "keeps the slots every ep rank routes to its experts, which depends on the routing); "
                         "predict with ep=1")
    if lay.attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {lay.attention!r} is not one of {ATTENTION_BACKENDS}")
    if lay.recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute {lay.recompute!r} is not one of none, selective, full")
    if lay.precision not in DTYPE_BYTES:
        raise ValueError(f"precision {lay.precision!r} is not one of {tuple(DTYPE_BYTES)}")


def _norm_bytes(cfg: ModelConfig, e: int, h_sp: float, share: float) -> float:
    """One norm's bytes per token; `share` is the fraction of the tokens this rank holds (1/tp under SP)."""
    if cfg.norm == "rmsnorm":
        return _rms_bytes(e, h_sp, share)
    return 4 * h_sp + 8 * share if e == 4 else e * h_sp + 8 * share  # fp32: plain autograd graphs


def _rms_bytes(e: int, width: float, rows: float) -> float:
    """RMSNorm's bytes per token over `width` features in `rows` normalised rows (one fp32 1/rms each)."""
    return 8 * width + 4 * rows if e == 4 else e * width + 4 * rows  # fp32: the input and x/rms


def _is_moe(cfg: ModelConfig, layer: int | None) -> bool:
    """Whether block `layer` has the MoE feed-forward; None: the model's blocks, which must all be alike."""
    if layer is not None:
        return is_moe_layer(cfg, layer)
    kinds = {is_moe_layer(cfg, i) for i in range(1, cfg.num_layers + 1)}
    if len(kinds) > 1:
        raise ValueError(f"model.moe_every={cfg.moe_every}, moe_first_dense={cfg.moe_first_dense} mix dense and "
                         f"MoE layers: pass layer= (1..{cfg.num_layers}) to say which block")
    return kinds.pop()


def _mlp_bytes(f: float, e: int, selective: bool, swiglu: bool) -> float:
    """A dense MLP's bytes per token at this rank's width f, less its input."""
    return e * (2 * f + (0 if selective else f)) if swiglu else e * 2 * f


def _moe_bytes(cfg: ModelConfig, lay: Layout, e: int, share: float) -> float:
    """An MoE feed-forward's bytes per token of the micro-batch, `share` of which this rank routes."""
    k, E, h, f = cfg.moe_top_k, cfg.moe_num_experts, cfg.hidden_size, moe_ffn_hidden_size(cfg)
    r = 4  # the router's dtype: fp32 (moe.py runs the routing with autocast off)
    swiglu = cfg.activation == "swiglu"
    router = e * h + 2 * r * E + r + 8 * k  # input, probabilities, logits + lse (z-loss), int64 expert ids
    if cfg.moe_router == "sigmoid" or cfg.moe_norm_topk_prob:  # the renormalising division keeps both sides
        router += r * k + r
    # int64 token and slot ids, the slot's fp32 weight, its row, the expert's insides, its output (moe.Combine)
    slot = 16 + r + e * h + e * (4 * f if swiglu else 2 * f) + e * h
    out = share * (router + k * slot)
    if cfg.moe_shared_experts:  # a dense tp MLP; its input is the router's (the norm output, kept once)
        width = cfg.moe_shared_experts * f / lay.tp
        out += _mlp_bytes(width, e, lay.recompute == "selective", swiglu)
    return out


def layer_activation_bytes_per_token(cfg: ModelConfig, lay: Layout, seq_len: int, layer: int | None = None) -> float:
    """Bytes one transformer block keeps for backward per token of a micro-batch on one tp rank; `layer`
    (1..L) says which block where dense and MoE blocks mix (model.moe_every, moe_first_dense)."""
    _check(cfg, lay)
    e, tp = DTYPE_BYTES[lay.precision], lay.tp
    h = cfg.hidden_size
    share = 1 / tp if lay.sequence_parallel and tp > 1 else 1  # of the micro-batch's tokens
    h_sp = h * share
    moe = _is_moe(cfg, layer)
    if lay.recompute == "full":
        return e * h_sp / lay.cp
    d = head_dim(cfg)
    hq, hkv = cfg.num_heads / tp, (cfg.num_kv_heads or cfg.num_heads) / tp
    selective = lay.recompute == "selective"
    out = 2 * _norm_bytes(cfg, e, h_sp, share) + e * h_sp + e * (2 * hq * d + 2 * hkv * d)  # qkv's input
    if cfg.qk_norm:  # per-head RMSNorm of q and k, before rotary: never recomputed by 'selective'
        out += _rms_bytes(e, (hq + hkv) * d, hq + hkv)
    if not selective and lay.cp > 1:
        out += 4 * hq + 4 * hq * d  # ring attention: fp32 log-sum-exp and fp32 output
    elif not selective:
        out += 4 * hq if lay.attention != "math" else e * hq * seq_len
    if moe:
        out += _moe_bytes(cfg, lay, e, share)
    else:  # fc1's input, then the MLP
        out += e * h_sp + _mlp_bytes(resolved_ffn_hidden_size(cfg) / tp, e, selective, cfg.activation == "swiglu")
    return out / lay.cp  # per token of the whole sequence, of which this rank holds 1/cp


def _weight_copies(cfg: ModelConfig, lay: Layout, moe: bool) -> int:
    """Matmul parameters of one block on this rank that autocast copies to 16-bit."""
    tp, h = lay.tp, cfg.hidden_size
    d = head_dim(cfg)
    qkv = (cfg.num_heads + 2 * (cfg.num_kv_heads or cfg.num_heads)) * d * h // tp
    mats = 3 if cfg.activation == "swiglu" else 2
    if not moe:
        ffn = mats * resolved_ffn_hidden_size(cfg) * h // tp
    else:  # every expert, replicated over tp (the router runs in fp32: no copy); shared experts a tp MLP
        f, experts = moe_ffn_hidden_size(cfg), cfg.moe_num_experts
        ffn = experts * mats * f * h + mats * cfg.moe_shared_experts * f * h // tp
    return qkv + cfg.num_heads * d * h // tp + ffn


def layer_fixed_bytes(cfg: ModelConfig, lay: Layout, seq_len: int, layer: int | None = None) -> int:
    """Bytes one block's graph keeps per micro-batch whatever its size: the 16-bit weight copies
    under autocast (kept unless the block recomputes everything), the math path's causal mask and an
    MoE layer's fp32 load statistics ([E] shares and the [2E + 1] summed counts)."""
    _check(cfg, lay)
    moe = _is_moe(cfg, layer)
    if lay.recompute == "full":
        return 0
    out = 4 * cfg.moe_num_experts + 4 * (2 * cfg.moe_num_experts + 1) if moe else 0
    if lay.precision != "fp32":
        out += DTYPE_BYTES[lay.precision] * _weight_copies(cfg, lay, moe)
    if lay.cp > 1 and cfg.position == "rope":  # cos and sin at this rank's positions, kept by rotary
        out += 4 * head_dim(cfg) * seq_len // lay.cp
    elif lay.attention == "math" and lay.recompute == "none" and lay.cp == 1:
        out += seq_len * seq_len  # the bool mask, one per micro-batch
    return out


def layer_activation_bytes(cfg: ModelConfig, lay: Layout, seq_len: int, micro_batch: int,
                           layer: int | None = None) -> int:
    """Bytes one block's graph keeps for one micro-batch [s, b] on one tp rank."""
    per_token = layer_activation_bytes_per_token(cfg, lay, seq_len, layer)
    return round(per_token * seq_len * micro_batch) + layer_fixed_bytes(cfg, lay, seq_len, layer)


def in_flight(kind: str, pp: int, stage: int, micro_batches: int, virtual_stages: int = 1) -> int:
    """The most (micro-batch, chunk) forward graphs `stage` holds at once under the schedule `kind`
    (1F1B: min(pp - stage, m); interleaved: its longer warm-up), counted on the schedule itself."""
    live = peak = 0
    for action in compute_order(kind, pp, stage, micro_batches, virtual_stages):
        live += 1 if action.op == "F" else -1
        peak = max(peak, live)
    return peak


def state_bytes(params: int, engine: str, dp: int = 1) -> dict[str, float]:
    """Weights, gradients and optimizer state of `params` parameters on one rank."""
    if engine not in STATE_BYTES:
        raise ValueError(f"engine {engine!r} is not one of {tuple(STATE_BYTES)}")
    w, g, o = STATE_BYTES[engine](dp)
    return {"weights": w * params, "gradients": g * params, "optimizer": o * params}
