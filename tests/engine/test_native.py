"""NativeEngine against unsharded references: data parallel, accumulation, clipping, fp16 skips."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megalite.checkpoint.state import flatten, unflatten
from megalite.config import Config, OptimConfig, TrainConfig
from megalite.engine import NativeEngine, build_engine
from tests.tolerance import assert_close, worst

OPTIM = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1, clip_grad=0.0)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))


def _batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def _engine(model, optim=OPTIM, precision="fp32", **kw):
    train = TrainConfig(precision=precision, initial_loss_scale=1024.0, loss_scale_window=1000)
    return NativeEngine(model, optim, train, total_steps=10, **kw)


def _capture(engine):
    """Record the gradients the optimizer sees (after reduction, unscaling and clipping)."""
    seen, step = [], engine.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([p.grad.clone() for p in engine.params])
        return step(*args, **kwargs)

    engine.optimizer.step = recording_step
    return seen


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# fp32, one rank vs two (or one batch vs two micro-batches): the same products summed in another order
# (per-rank partial sums + an all-reduce), a few ulps; measured max|diff| <= 1.1e-7 of max|want|. Two AdamW
# steps carry that into the weights about unamplified (m / sqrt(v) of a gradient known to 1e-7 relative,
# lr 1e-2). rtol 1e-5 and atol 1e-5 * max|want| leave >= 50x; a missing all-reduce or a wrong average
# (>= 1e-2 relative) fails.
RTOL, ATOL_FRAC = 1e-5, 1e-5


def _worst_of(got, want, what):
    """The worst worst() over matching tensors."""
    return max(worst(g, w, RTOL, ATOL_FRAC, f"{what} {i}") for i, (g, w) in enumerate(zip(got, want)))


def _dp_matches_full_batch():
    rank = dist.get_rank()
    ref_model = _model()
    ref = _engine(ref_model)
    dp_model = _model()
    dp = _engine(dp_model, dp_group=dist.group.WORLD, bucket_elems=50)  # several buckets
    ref_grads, dp_grads = _capture(ref), _capture(dp)
    norms = []
    for step in range(2):
        x, y = _batch(seed=step)
        ref.backward(_loss(ref_model, x, y))
        dp.backward(_loss(dp_model, x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]))
        norms.append((ref.step().grad_norm, dp.step().grad_norm))
    grads = max(_worst_of(dp, ref, f"rank {rank} step {step} grad")
                for step, (ref, dp) in enumerate(zip(ref_grads, dp_grads)))
    params = _worst_of(dp_model.parameters(), ref_model.parameters(), f"rank {rank} param")
    return grads, params, norms


def test_data_parallel_equals_one_rank_on_the_concatenated_batch(spawn):
    for grads, params, norms in spawn(_dp_matches_full_batch, 2):
        assert grads[0] <= 1 and params[0] <= 1, (grads[1], params[1])
        assert [dp for _, dp in norms] == pytest.approx([ref for ref, _ in norms], rel=RTOL)  # as the grads


def test_accumulating_two_micro_batches_equals_one_big_batch():
    big_model, acc_model = _model(), _model()
    big, acc = _engine(big_model), _engine(acc_model)
    big_grads, acc_grads = _capture(big), _capture(acc)
    x, y = _batch()
    big.backward(_loss(big_model, x, y))
    for half in (slice(0, 4), slice(4, 8)):
        acc.backward(_loss(acc_model, x[half], y[half]) / 2)  # the caller divides by accumulation steps
    assert acc.step().grad_norm == pytest.approx(big.step().grad_norm, rel=RTOL)  # tolerances: see RTOL
    for i, (got, want) in enumerate(zip(acc_grads[0], big_grads[0])):
        assert_close(got, want, RTOL, ATOL_FRAC, f"grad {i}")
    for i, (got, want) in enumerate(zip(acc_model.parameters(), big_model.parameters())):
        assert_close(got, want, RTOL, ATOL_FRAC, f"param {i}")
    assert all(p.grad is None for p in acc_model.parameters())  # step clears gradients


def test_clipping_scales_to_the_limit_and_reports_the_unclipped_norm():
    model = _model()
    x, y = _batch()
    _loss(model, x, y).backward()
    true_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    model.zero_grad()
    engine = _engine(model, optim=OptimConfig(lr=1e-2, warmup_steps=0, clip_grad=true_norm / 10))
    seen = _capture(engine)
    engine.backward(_loss(model, x, y))
    result = engine.step()
    assert result.grad_norm == pytest.approx(true_norm, rel=1e-6)
    assert torch.nn.utils.get_total_norm(seen[0]).item() == pytest.approx(true_norm / 10, rel=1e-4)


def test_lr_follows_the_schedule():
    model = _model()
    engine = _engine(model)
    x, y = _batch()
    lrs = []
    for _ in range(3):
        engine.backward(_loss(model, x, y))
        lrs.append(engine.step().lr)
    assert lrs[:2] == pytest.approx([5e-3, 1e-2])
    assert engine.optimizer.param_groups[0]["lr"] == lrs[-1] < 1e-2


def test_fp16_overflow_skips_the_step_and_leaves_state_untouched():
    model, ref_model = _model(), _model()
    engine, ref = _engine(model, precision="fp16"), _engine(ref_model)
    seen, ref_seen = _capture(engine), _capture(ref)
    x, y = _batch()
    engine.backward(_loss(model, x, y))
    ref.backward(_loss(ref_model, x, y))
    first = engine.step()
    ref.step()
    assert not first.skipped and first.loss_scale == 1024.0
    for i, (got, want) in enumerate(zip(seen[0], ref_seen[0])):  # the scale was divided back out
        # fp32 gradients scaled and unscaled by a power of two are exact (bitwise equal here); rtol 1e-6
        # (~8 ulps) allows an unscale by a rounded reciprocal, a scale left in (1024x) fails
        assert_close(got, want, rtol=1e-6, atol_frac=1e-6, what=f"unscaled grad {i}")
    params, opt_state = copy.deepcopy(list(model.parameters())), copy.deepcopy(engine.optimizer.state_dict())
    for expected_scale in (1024.0, 512.0):  # hysteresis 2: the second overflow halves the scale
        engine.backward(_loss(model, x, y))
        model[0].weight.grad[0, 0] = float("inf")
        result = engine.step()
        assert result.skipped and result.loss_scale == 1024.0  # the scale this step's backward used
        assert engine.scaler.loss_scale == expected_scale
        assert _max_diff(params, model.parameters()) == 0.0
        assert all(p.grad is None for p in model.parameters())
        assert engine.schedule.last_step == 1
        state = engine.optimizer.state_dict()["state"]
        assert all(torch.equal(state[i][k], opt_state["state"][i][k]) for i in state for k in state[i])
    engine.backward(_loss(model, x, y))
    assert not engine.step().skipped and engine.schedule.last_step == 2


def test_bf16_nan_gradient_is_skipped_too():
    model = _model()
    engine = _engine(model, precision="bf16")
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, x, y)
    engine.backward(loss)
    model[3].bias.grad[0] = float("nan")
    before = copy.deepcopy(list(model.parameters()))
    result = engine.step()
    assert result.skipped and result.loss_scale == 1.0
    assert _max_diff(before, model.parameters()) == 0.0


def test_state_dict_survives_flatten_and_resumes_identically():
    a_model, b_model = _model(), _model(seed=5)
    a = _engine(a_model, precision="fp16")
    x, y = _batch()
    for _ in range(2):
        a.backward(_loss(a_model, x, y))
        a.step()
    b_model.load_state_dict(a_model.state_dict())
    b = _engine(b_model, precision="fp16")
    tensors, skeleton = flatten(a.state_dict())
    # flatten aliases CPU tensors (saving copies them to disk); clone to mimic a load from disk
    b.load_state_dict(unflatten({k: t.clone() for k, t in tensors.items()}, skeleton))
    for engine, model in ((a, a_model), (b, b_model)):
        engine.backward(_loss(model, x, y))
        engine.step()
    assert _max_diff(a_model.parameters(), b_model.parameters()) == 0.0
    assert b.schedule.last_step == 3


def test_low_precision_weights_are_refused():
    with pytest.raises(ValueError, match="fp32 master weights"):
        _engine(_model().to(torch.bfloat16), precision="bf16")


def test_build_engine_picks_the_backend():
    cfg, groups = Config(), SimpleNamespace(dp_group=None, mp_group=None)
    assert isinstance(build_engine(cfg, _model(), groups, "cpu"), NativeEngine)
    cfg.engine.backend = "megatron"
    with pytest.raises(ValueError, match="'megatron'"):
        build_engine(cfg, _model(), groups, "cpu")
    cfg.engine.backend, cfg.engine.zero_stage = "native", 2
    with pytest.raises(ValueError, match="zero_stage=2"):
        build_engine(cfg, _model(), groups, "cpu")
