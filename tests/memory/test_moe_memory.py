"""The memory model's MoE layers (megalite.memory.model, megalite.model.moe) against exact saved-tensor bytes.

Per-token bytes are asserted equal: dropless routing gives every token exactly k slots, and each slot
term is one buffer over all experts, so the figure does not depend on the routing (checked with a
skewed router). The fixed bytes are equal too, give or take torch._grouped_mm's int32 offsets ([E],
kept only where moe.py takes the grouped path), which the model leaves out. Both expert paths are run:
the grouped matmuls (16-byte rows) and the loop over experts (variant expert_loop), whose per-expert
buffers sum to the same bytes.
"""
from __future__ import annotations

import pytest
import torch

from megalite.config import load_config
from megalite.memory import (
    Layout,
    SavedTensorBytes,
    layer_activation_bytes_per_token,
    layer_fixed_bytes,
    model_storages,
    per_token_and_fixed,
)
from megalite.model.blocks import BlockSettings, TransformerBlock
from megalite.model.moe import MoE, MoEState

SEQ, H, E = 32, 64, 4
SHAPE = [f"model.hidden_size={H}", "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=192",
         f"model.max_seq_len={SEQ}", "model.num_layers=4", f"model.moe.num_experts={E}",
         "model.moe.ffn_hidden_size=48"]
VARIANTS = {"softmax_top2": [], "shared": ["model.moe.shared_experts=2"], "sigmoid": ["model.moe.router=sigmoid"],
            "unnormalised": ["model.moe.norm_topk_prob=false"],
            "gelu_top1": ["model.activation=gelu", "model.moe.top_k=1"],
            "expert_loop": ["model.moe.ffn_hidden_size=50"]}  # rows of 50 * 2 or 4 bytes: the loop, not grouped_mm
OFFSETS = 4 * E  # the grouped path's int32 [E] offsets, per micro-batch


def _cfg(*overrides):
    return load_config("tiny", SHAPE + list(overrides)).model


def _measure(cfg, lay: Layout, layer: int = 1, tp_group=None) -> tuple[float, int]:
    torch.manual_seed(0)
    block = TransformerBlock(cfg, BlockSettings(tp_group=tp_group, sequence_parallel=lay.sequence_parallel,
                                                activation_checkpointing=lay.recompute), layer)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    local = SEQ // lay.tp if lay.sequence_parallel else SEQ
    return per_token_and_fixed(block, local, H, lay.precision, tokens=SEQ)


def _assert_fixed(fixed: int, cfg, lay: Layout, layer: int = 1) -> None:
    extra = fixed - layer_fixed_bytes(cfg, lay, SEQ, layer)
    assert extra in ((0, OFFSETS) if lay.recompute != "full" else (0,)), extra


@pytest.fixture(autouse=True)
def _sdpa(monkeypatch):
    monkeypatch.setenv("MEGALITE_ATTENTION", "sdpa")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_block_keeps_what_the_model_predicts(variant, mode, precision):
    cfg, lay = _cfg(*VARIANTS[variant]), Layout(recompute=mode, precision=precision)
    per_token, fixed = _measure(cfg, lay)
    assert per_token == layer_activation_bytes_per_token(cfg, lay, SEQ)
    _assert_fixed(fixed, cfg, lay)


def _moe_saved(layer: MoE, x: torch.Tensor, precision: str) -> tuple[int, list[int]]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.autocast("cpu", dtype=dtype, enabled=precision != "fp32"), \
            SavedTensorBytes(exclude=model_storages(layer)) as saved:
        layer(x.to(dtype).requires_grad_())
    return saved.total, layer.state.take_stats()[1][0]["load"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_moe_bytes_do_not_depend_on_the_split_across_experts(precision):
    """All slots on experts 0 and 1 (2 and 3 get none) keep the bytes of a random router's spread."""
    layer = MoE(_cfg(), MoEState(), layer=1)
    layer.init_weights(0, "blocks.1.mlp")
    x = torch.randn(SEQ, 2, H).abs() + 1  # every feature positive: the router below picks experts 0 and 1
    spread, spread_load = _moe_saved(layer, x, precision)
    with torch.no_grad():
        layer.router.copy_(torch.tensor([0.02, 0.01, -0.01, -0.01])[:, None].expand(E, H))  # logits of ~1
    skewed, skewed_load = _moe_saved(layer, x, precision)
    assert skewed_load == [2 * SEQ, 2 * SEQ, 0, 0] and spread_load != skewed_load
    assert skewed == spread


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_moe_every_mixes_dense_and_moe_blocks(precision):
    """model.moe_every=2: block 1 is a dense block (the dense model's bytes), block 2 an MoE block."""
    cfg, lay = _cfg("model.moe.every=2"), Layout(precision=precision)
    dense = load_config("tiny", SHAPE[:6]).model
    for layer in (1, 2):
        per_token, fixed = _measure(cfg, lay, layer)
        assert per_token == layer_activation_bytes_per_token(cfg, lay, SEQ, layer)
        _assert_fixed(fixed, cfg, lay, layer)
    assert layer_activation_bytes_per_token(cfg, lay, SEQ, 1) == layer_activation_bytes_per_token(dense, lay, SEQ)
    assert layer_activation_bytes_per_token(cfg, lay, SEQ, 2) > layer_activation_bytes_per_token(cfg, lay, SEQ, 1)
    with pytest.raises(ValueError, match="model.moe_every=2, moe_first_dense=0 mix dense and MoE layers"):
        layer_activation_bytes_per_token(cfg, lay, SEQ)


TP_LAYOUTS = [Layout(tp=2, sequence_parallel=sp, precision=p, recompute=m)
              for sp in (False, True) for p in ("fp32", "bf16") for m in ("none", "selective")]


def _tp_bytes(cfg) -> list[tuple[float, int]]:
    import os

    import torch.distributed as dist

    os.environ["MEGALITE_ATTENTION"] = "sdpa"  # as the workers choose on the CPU (no flash-attn)
    return [_measure(cfg, lay, tp_group=dist.group.WORLD) for lay in TP_LAYOUTS]


def test_tensor_parallel_replicates_the_experts_and_sequence_parallel_splits_the_tokens(spawn):
    """tp=2 with shared experts (a tp MLP): without SP each rank routes every token through all experts;
    under SP its own s/tp tokens, so the routed part halves. Fixed bytes are compared in fp32 only (a pool
    worker's autocast weight copies vary, see test_memory_model._cp_bytes)."""
    cfg = _cfg("model.moe.shared_experts=2")
    measured = spawn(_tp_bytes, 2, cfg)[0]
    for lay, (per_token, fixed) in zip(TP_LAYOUTS, measured):
        assert per_token == layer_activation_bytes_per_token(cfg, lay, SEQ), lay
        if lay.precision == "fp32":
            _assert_fixed(fixed, cfg, lay)
    plain, sp = (layer_activation_bytes_per_token(cfg, Layout(tp=2, sequence_parallel=s), SEQ) for s in (False, True))
    assert sp < plain / 1.5  # the replicated experts' bytes are split only by SP


@pytest.mark.parametrize("overrides, lay, match", [
    (["model.moe.capacity_factor=1.25"], Layout(), "model.moe_capacity_factor=1.25: .* model.moe_capacity_factor=null"),
    ([], Layout(ep=2), "parallel.ep=2: .* predict with ep=1"),
])
def test_unmodelled_moe_cases_are_refused_by_name(overrides, lay, match):
    for fn in (layer_activation_bytes_per_token, layer_fixed_bytes):
        with pytest.raises(ValueError, match=match):
            fn(_cfg(*overrides), lay, SEQ)


def test_a_dense_model_ignores_ep():
    assert layer_activation_bytes_per_token(load_config("tiny", SHAPE[:6]).model, Layout(ep=2), SEQ) > 0


def _cp_bytes(cfg, lay: Layout) -> tuple[float, int]:
    import os

    import torch.distributed as dist

    os.environ["MEGALITE_ATTENTION"] = "sdpa"
    torch.manual_seed(0)
    block = TransformerBlock(cfg, BlockSettings(activation_checkpointing=lay.recompute, cp_group=dist.group.WORLD), 1)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return per_token_and_fixed(block, SEQ // 2, H, lay.precision, tokens=SEQ)  # per token of the sequence


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_context_parallel_moe_routes_the_ranks_own_tokens(spawn, mode, precision):
    """cp=2: each rank routes its s/cp positions (routing statistics summed over cp), so the MoE part halves
    with the rest. Fixed bytes in fp32 only (the rotary tables at the rank's positions, the load statistics;
    a pool worker's autocast weight copies vary, see test_memory_model._cp_bytes)."""
    cfg, lay = _cfg("model.moe.shared_experts=2"), Layout(recompute=mode, precision=precision, cp=2)
    per_token, fixed = spawn(_cp_bytes, 2, cfg, lay)[0]
    assert per_token == layer_activation_bytes_per_token(cfg, lay, SEQ)
    if precision == "fp32":
        _assert_fixed(fixed, cfg, lay)
