"""The MoE feed-forward (megalite.model.moe): routing and experts against a per-token reference, exact
capacity drops, the auxiliary losses' gradients, a router balanced by its loss, and the metrics.

Tolerances (fp32): the layer against the per-token loop rel 1e-5 of the output's scale (the same
products summed in another order: a few ulps); gradients rel 1e-5 likewise.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megalite.config import ConfigError, load_config, moe_ffn_hidden_size, validate
from megalite.model.moe import MoE, MoEState, summarize
from tests.tolerance import assert_close

H, E = 16, 4


def _cfg(*overrides):
    return load_config("tiny", [f"model.hidden_size={H}", "model.num_heads=2", "model.num_layers=2",
                                f"model.moe.num_experts={E}", "model.moe.ffn_hidden_size=24", *overrides]).model


def _layer(cfg, seed=0) -> MoE:
    layer = MoE(cfg, MoEState(), layer=1)
    layer.init_weights(seed, "blocks.1.mlp")
    return layer


def _per_token(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """y_t = sum over the token's top-k experts of weight * expert(x_t), written one token at a time."""
    cfg_swiglu, out = layer.swiglu, []
    for t in x.reshape(-1, H):
        logits = layer.router @ t
        if layer.router_kind == "sigmoid":
            scores = torch.sigmoid(logits)
            w, idx = scores.topk(layer.top_k)
            w = w / w.sum()
        else:
            p = logits.softmax(-1)
            w, idx = p.topk(layer.top_k)
            w = w / w.sum() if layer.norm_topk else w
        y = torch.zeros(H)
        for weight, e in zip(w, idx):
            a = layer.fc1[e] @ t
            a = F.silu(a[0::2]) * a[1::2] if cfg_swiglu else F.gelu(a)
            y = y + weight * (layer.fc2[e] @ a)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("overrides", [[], ["model.moe.router=sigmoid"], ["model.moe.norm_topk_prob=false"],
                                       ["model.activation=gelu", "model.moe.top_k=1"]],
                         ids=["softmax", "sigmoid", "softmax_unnormalised", "gelu_top1"])
def test_layer_equals_the_per_token_reference(overrides):
    layer = _layer(_cfg(*overrides)).eval()
    x = torch.randn(6, 2, H)
    with torch.no_grad():
        assert_close(layer(x), _per_token(layer, x), rtol=1e-5, atol_frac=1e-5, what=str(overrides))


def test_capacity_factor_drops_exactly_the_slots_past_capacity_in_token_order():
    layer = _layer(_cfg("model.moe.top_k=1", "model.moe.capacity_factor=1.0")).eval()
    with torch.no_grad():
        layer.router.zero_()
        layer.router[0] = 10.0  # every token of a positive sum prefers expert 0
    x = torch.rand(8, 2, H) + 0.1  # 16 tokens, capacity ceil(1.0 * 16 * 1 / 4) = 4
    with torch.no_grad():
        y = layer(x).reshape(16, H)
    stats = layer.state.take_stats()[1][0]
    assert layer.capacity(16) == 4 and stats["dropped"] == 12 and stats["load"] == [4, 0, 0, 0]
    want = _per_token(layer, x).reshape(16, H)
    assert_close(y[:4], want[:4], rtol=1e-5, atol_frac=1e-5, what="the first four tokens, computed")
    assert not y[4:].any()  # the rest dropped: no routed output (and no shared experts here)
    dropless = _layer(_cfg("model.moe.top_k=1"))
    assert dropless.capacity(16) is None


def _aux_terms(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E * sum_i f_i P_i, mean lse^2), written from the definitions."""
    tokens = x.reshape(-1, H)
    logits = tokens @ layer.router.t()
    probs = logits.softmax(-1)
    chosen = probs.topk(layer.top_k, -1).indices
    f = torch.stack([(chosen == i).sum() for i in range(E)]).float() / (tokens.shape[0] * layer.top_k)
    aux = E * (f * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    return aux, z


def test_auxiliary_losses_reach_the_router_as_if_added_to_the_loss():
    cfg = _cfg("model.moe.aux_loss_coeff=0.3", "model.moe.z_loss_coeff=0.05")
    injected, explicit = _layer(cfg), _layer(cfg)
    explicit.aux_coeff = explicit.z_coeff = 0.0  # the same weights, no injected gradient
    x, g = torch.randn(5, 2, H), torch.randn(5, 2, H)
    (injected(x) * g).sum().backward()
    aux, z = _aux_terms(explicit, x)
    ((explicit(x) * g).sum() + injected.aux_coeff * aux + injected.z_coeff * z).backward()
    for name in ("router", "fc1", "fc2"):
        assert_close(getattr(injected, name).grad, getattr(explicit, name).grad, rtol=1e-5, atol_frac=1e-5,
                     what=name)
    stats = injected.state.take_stats()[1][0]
    aux, z = (float(t.detach()) for t in _aux_terms(injected, x))
    assert stats["aux_loss"] == pytest.approx(aux, rel=1e-5) and stats["z_loss"] == pytest.approx(z, rel=1e-5)
    injected.state.grad_scale = 0.0  # the runner's scale multiplies the injected gradient
    injected.zero_grad()
    (injected(x) * g).sum().backward()
    injected_plain = injected.router.grad.clone()
    explicit.zero_grad()
    (explicit(x) * g).sum().backward()
    assert_close(injected_plain, explicit.router.grad, rtol=1e-6, atol_frac=1e-6, what="scale 0: no aux gradient")


def test_load_balancing_loss_balances_an_imbalanced_router():
    """Only the aux loss trains the router (coefficient 1): from ~all tokens on one expert the load's
    entropy rises to 98% of ln E within 300 Adam steps (observed: 0.0, every token on expert 0, to
    0.93 after 50 steps, 1.375 after 100 and 1.385 at the end, of ln 4 = 1.386)."""
    torch.manual_seed(0)
    layer = _layer(_cfg("model.moe.aux_loss_coeff=1.0", "model.moe.top_k=1"))
    with torch.no_grad():
        layer.router.normal_(std=0.01)
        layer.router[0] += 1.0
    opt = torch.optim.Adam([layer.router], lr=0.02)
    x = torch.randn(64, 4, H) + 1.0  # a shared direction, so the biased row wins almost everywhere

    def entropy() -> float:
        return summarize(layer.state.take_stats())["moe_load_entropy"]

    with torch.no_grad():
        layer(x)
    start = entropy()
    for _ in range(300):
        opt.zero_grad()
        (layer(x) * 0).sum().backward()  # no task loss: the gradient is the aux loss's alone
        opt.step()
        layer.state.take_stats()
    with torch.no_grad():
        layer(x)
    end = entropy()
    assert start < 0.5 * math.log(E) and end > 0.98 * math.log(E), (start, end)


def test_summary_of_known_loads():
    stats = {1: [{"aux_loss": 1.0, "z_loss": 2.0, "dropped": 3, "load": [2, 2, 0, 0]}],
             3: [{"aux_loss": 3.0, "z_loss": 4.0, "dropped": 1, "load": [1, 1, 1, 1]}]}
    got = summarize(stats)
    assert got["moe_load_entropy_l1"] == pytest.approx(math.log(2))
    assert got["moe_load_entropy_l3"] == pytest.approx(math.log(4))
    assert (got["moe_aux_loss"], got["moe_z_loss"], got["moe_dropped_tokens"]) == (2.0, 3.0, 4)
    assert (got["moe_load_min"], got["moe_load_max"]) == (0.0, 2.0)
    assert summarize({}) == {}
    from megalite.metrics import on_console

    assert on_console("moe_load_entropy", 1.0) and not on_console("moe_load_entropy_l3", 1.0)  # jsonl only


def test_config_names_and_rules():
    nested = load_config("tiny", ["model.moe.num_experts=8", "model.moe_top_k=1", "model.moe.every=2"]).model
    assert (nested.moe_num_experts, nested.moe_top_k, nested.moe_every) == (8, 1, 2)
    assert moe_ffn_hidden_size(nested) == 768  # the tiny preset's resolved SwiGLU width
    for bad, message in ((["model.moe.top_k=5"], "model.moe_top_k=5 must be <= model.moe_num_experts=4"),
                         (["model.moe.every=9"], "no layer is MoE"),
                         (["model.moe.capacity_factor=0"], "model.moe_capacity_factor=0.0 must be > 0"),
                         (["train.compile=true"], "train.compile=True with model.moe_num_experts=4"),
                         (["parallel.ep=3"], "parallel.ep=3 must divide model.moe_num_experts=4"),
                         (["parallel.ep=2", "engine.backend=deepspeed", "engine.zero_stage=3"], "own AutoEP"),
                         (["parallel.ep=4"], r"parallel.ep=4 must divide dp \* cp = 2\*1 = 2")):
        with pytest.raises(ConfigError, match=message):
            validate(load_config("tiny", ["model.moe.num_experts=4", *bad]), world_size=2)
    with pytest.raises(ConfigError, match="parallel.ep=2 needs an MoE model"):
        validate(load_config("tiny", ["parallel.ep=2"]), world_size=2)


def test_mfu_counts_the_parameters_a_token_touches_and_the_total_counts_every_expert():
    from megalite.model import Transformer, active_matmul_parameters, matmul_parameters, total_parameters

    cfg = load_config("tiny", ["model.moe.num_experts=4", "model.moe.top_k=1", "model.moe.every=2"]).model
    model = Transformer(cfg)
    assert total_parameters(cfg) == model.num_parameters()  # every expert, counted
    moe = [b.mlp for b in model.blocks.values() if isinstance(getattr(b, "mlp", None), MoE)]
    assert [m.layer for m in moe] == [2, 4]
    per_expert = moe[0].fc1[0].numel() + moe[0].fc2[0].numel()
    assert active_matmul_parameters(cfg) == matmul_parameters(cfg) - len(moe) * (4 - 1) * per_expert
    dense = load_config("tiny").model
    assert active_matmul_parameters(dense) == matmul_parameters(dense)


def _ep_layer_run(ep: int) -> tuple:
    """On each rank of an ep group: the layer's output and input gradient for this rank's own tokens, its
    experts' gradients, and the all-to-all bytes it sent (forward and backward)."""
    import torch.distributed as dist

    from megalite.distributed.comm import take_comm_bytes

    rank = dist.get_rank()
    layer = MoE(_cfg("model.moe.capacity_factor=1.25"), MoEState(), layer=1, ep_group=dist.group.WORLD)
    layer.init_weights(0, "blocks.1.mlp")
    torch.manual_seed(100 + rank)  # each rank its own tokens, as dp replicas have
    x = torch.randn(6, 2, H, requires_grad=True)
    take_comm_bytes()
    y = layer(x)
    (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
    sent = take_comm_bytes().get("ep_all_to_all", 0)
    return y.detach(), x.grad, layer.fc1.grad, layer.fc2.grad, sent, layer.state.take_stats()[1][0]["dropped"]


def test_expert_parallel_layer_equals_the_whole_layer_and_sends_every_slot_four_times(spawn):
    """ep=2: rank r holds experts 2r, 2r+1 of the whole layer; its tokens' outputs and gradients equal the
    whole layer's on the same tokens (rel 1e-5: the same products), each expert's gradient is the sum of
    both ranks' tokens' parts, and the ranks together send every kept slot's row 4 times (dispatch and
    combine, forward and backward): 4 * slots * h * 4 bytes."""
    results = spawn(_ep_layer_run, 2, 2)
    whole = _layer(_cfg("model.moe.capacity_factor=1.25"))
    fc1_grad, fc2_grad, kept = torch.zeros_like(whole.fc1), torch.zeros_like(whole.fc2), 0
    for rank, (y, x_grad, g1, g2, _, dropped) in enumerate(results):
        torch.manual_seed(100 + rank)
        x = torch.randn(6, 2, H, requires_grad=True)
        whole.zero_grad()
        want = whole(x)
        (want * torch.arange(want.numel()).reshape(want.shape).sin()).sum().backward()
        assert_close(y, want.detach(), rtol=1e-5, atol_frac=1e-5, what=f"rank {rank} output")
        assert_close(x_grad, x.grad, rtol=1e-5, atol_frac=1e-5, what=f"rank {rank} input gradient")
        fc1_grad += whole.fc1.grad
        fc2_grad += whole.fc2.grad
        kept += 12 * 2 - dropped
    for rank, (_, _, g1, g2, _, _) in enumerate(results):
        assert_close(g1, fc1_grad[2 * rank:2 * rank + 2], rtol=1e-5, atol_frac=1e-5, what=f"rank {rank} fc1 grad")
        assert_close(g2, fc2_grad[2 * rank:2 * rank + 2], rtol=1e-5, atol_frac=1e-5, what=f"rank {rank} fc2 grad")
    assert sum(r[4] for r in results) == 4 * kept * H * 4


def _skip_together() -> bool:
    import torch.distributed as dist

    from megalite.engine import NativeEngine
    from megalite.model import Transformer

    cfg = load_config("tiny", ["model.hidden_size=16", "model.num_heads=2", "model.num_layers=1",
                               "model.moe.num_experts=2", "model.moe.top_k=1", "model.vocab_size=64"])
    model = Transformer(cfg.model, ep_group=dist.group.WORLD)
    engine = NativeEngine(model, cfg.optim, cfg.train, 4, dp_group=dist.group.WORLD,
                          expert_groups=(dist.group.WORLD, None), micro_batches=1)
    tokens = torch.randint(0, 64, (2, 8))
    engine.backward(model.loss(tokens, tokens).mean())
    if dist.get_rank() == 1:  # only this rank's expert saw it
        model.blocks[1].mlp.fc1.grad[0, 0, 0] = float("nan")
    return engine.step().skipped


def test_a_non_finite_expert_gradient_on_one_ep_rank_skips_the_step_everywhere(spawn):
    assert spawn(_skip_together, 2) == [True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_experts_equal_the_loop_over_experts(dtype, monkeypatch):
    from megalite.model import Transformer, moe

    cfg = load_config("tiny", ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=48",
                               "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
                               "model.num_kv_heads=2"]).model
    assert moe._grouped_mm_takes(torch.zeros(1, 32), 48, dtype)  # the CPU runs the experts grouped
    assert not moe._grouped_mm_takes(torch.zeros(1, 30), 48, dtype)  # rows of 30 elements: not 16-byte multiples

    def run(grouped: bool):
        torch.manual_seed(0)
        layer = next(m for m in Transformer(cfg).modules() if isinstance(m, moe.MoE))
        x = torch.randn(16, 2, 32, requires_grad=True)
        with monkeypatch.context() as patch:
            if not grouped:
                patch.setattr(moe, "_grouped_mm_takes", lambda *args: False)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                y = layer(x)
            y.float().square().sum().backward()
        return y, x.grad, layer.fc1.grad, layer.fc2.grad

    for a, b in zip(run(True), run(False)):  # the same products in the same order: the same bits
        assert torch.equal(a, b)


def test_routing_runs_in_fp32_under_bf16_autocast():
    """CPU bf16 autocast: the router's logits, probabilities and weights are fp32 and equal the fp32 routing
    of the same (bf16) input; the router's gradient too (fp32 products of the same numbers)."""
    for router in ("softmax", "sigmoid"):
        layer = _layer(_cfg(f"model.moe.router={router}"))
        x = torch.randn(24, H).to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer.route(x)
        want = layer.route(x.float())
        for a, b, name in zip(got, want, ("experts", "weights", "probs", "logits")):
            assert a.dtype == b.dtype and (a.dtype == torch.int64 or a.dtype == torch.float32), (router, name)
            assert torch.equal(a, b), (router, name)


def _old_combine(y, weights, slots, token_of, n):
    """The combine step as autograd ran it before moe.Combine: fp32 y times the weights, index_add."""
    return torch.zeros(n, y.shape[1]).index_add(0, token_of, y.float() * weights.reshape(-1)[slots, None])


@pytest.mark.parametrize("capacity", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_equals_the_autograd_weighted_sum_bit_for_bit(dtype, capacity):
    """moe.Combine (keeping y in its own dtype) gives the very bits of index_add over y.float() * w, forward
    and backward, dropless and with dropped slots (capacity factor 0.5, top-2 of 4 experts)."""
    from megalite.model.moe import Combine

    layer = _layer(_cfg("model.moe.top_k=2", *([f"model.moe.capacity_factor={capacity}"] if capacity else [])))
    torch.manual_seed(1)
    n = 40
    experts, weights, _, _ = layer.route(torch.randn(n, H))
    slots, _, dropped = layer._slots(experts)
    assert (dropped > 0) == (capacity is not None)
    token_of = slots // layer.top_k
    runs = []
    for combine in ("new", "old"):
        torch.manual_seed(2)
        y = torch.randn(slots.numel(), H).to(dtype).requires_grad_()
        w = weights.detach().clone().requires_grad_()
        out = (Combine.apply(y, w.reshape(-1)[slots], token_of, n) if combine == "new"
               else _old_combine(y, w, slots, token_of, n))
        (out * torch.randn_like(out)).sum().backward()
        runs.append((out, y.grad, w.grad))
    for a, b in zip(*runs):
        assert a.dtype == b.dtype and torch.equal(a, b)
