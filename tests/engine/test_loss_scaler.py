"""Dynamic loss scaling: overflow skips, hysteresis, halving, growth, agreement across ranks."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from megalite.engine.loss_scaler import ConstantScaler, DynamicLossScaler, any_non_finite, build_scaler


def _params(*grads):
    out = []
    for g in grads:
        p = nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g, dtype=torch.float32)
        out.append(p)
    return out


def test_found_inf_sees_inf_and_nan_only():
    s = DynamicLossScaler(8.0, window=2, min_scale=1.0)
    assert not s.found_inf(_params([1.0, 2.0], [3.0]))
    assert s.found_inf(_params([1.0], [float("inf")]))
    assert s.found_inf(_params([float("nan")]))
    assert not s.found_inf([nn.Parameter(torch.zeros(2))])  # no grads at all
    assert ConstantScaler().found_inf(_params([float("-inf")]))
    assert ConstantScaler().found_inf(_params(*[[1.0]] * 50, [2.0, float("nan")]))  # one nan among many


def test_16_bit_gradients_are_checked_per_tensor():
    """fp32 gradients are checked through their total norm; 16-bit ones per tensor, since the fp16 norm
    of large finite gradients would overflow."""
    big = nn.Parameter(torch.zeros(64, dtype=torch.float16))
    big.grad = torch.full((64,), 60000.0, dtype=torch.float16)
    assert not any_non_finite([big])
    big.grad[3] = float("inf")
    assert any_non_finite([big])


def test_overflow_skips_and_halves_after_hysteresis_then_grows():
    s = DynamicLossScaler(1024.0, window=3, min_scale=1.0, hysteresis=2)
    assert s.update(True) is True and s.loss_scale == 1024.0  # first overflow tolerated
    assert s.update(True) is True and s.loss_scale == 512.0
    assert s.update(True) is True and s.loss_scale == 256.0  # hysteresis spent: every overflow halves
    assert [s.update(False) for _ in range(2)] == [False, False] and s.loss_scale == 256.0
    assert s.update(False) is False and s.loss_scale == 512.0  # a full clean window doubles
    assert s.update(True) is True and s.loss_scale == 512.0  # growth restored the hysteresis


def test_hysteresis_one_halves_at_once_and_respects_min_scale():
    s = DynamicLossScaler(4.0, window=100, min_scale=2.0, hysteresis=1)
    s.update(True)
    assert s.loss_scale == 2.0
    s.update(True)
    assert s.loss_scale == 2.0


def test_scale_and_unscale_round_trip():
    s = DynamicLossScaler(64.0, window=10, min_scale=1.0)
    assert s.scale(torch.tensor(0.5)).item() == 32.0
    params = _params([64.0, -128.0])
    s.unscale(params)
    assert params[0].grad.tolist() == [1.0, -2.0]


def test_state_dict_round_trip():
    s = DynamicLossScaler(64.0, window=10, min_scale=1.0)
    s.update(True), s.update(True), s.update(False)
    t = DynamicLossScaler(64.0, window=10, min_scale=1.0)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict() == {"loss_scale": 32.0, "clean_steps": 1, "hysteresis_left": 0}
    fresh = DynamicLossScaler(64.0, window=10, min_scale=1.0)
    fresh.load_state_dict({})  # resuming in fp16 from a bf16 run keeps the initial scale
    assert fresh.loss_scale == 64.0
    with pytest.raises(KeyError, match="clean_steps"):
        t.load_state_dict({"loss_scale": 2.0})


def test_build_scaler_and_bad_values():
    assert isinstance(build_scaler("fp16", 8.0, 10, 1.0), DynamicLossScaler)
    assert type(build_scaler("bf16", 8.0, 10, 1.0)) is ConstantScaler
    with pytest.raises(ValueError, match="'fp8'"):
        build_scaler("fp8", 8.0, 10, 1.0)
    with pytest.raises(ValueError, match="min_scale=4"):
        DynamicLossScaler(2.0, 10, 4.0)
    with pytest.raises(ValueError, match="loss_scale_window=0"):
        DynamicLossScaler(2.0, 0, 1.0)


def _inf_on_rank_one():
    value = float("inf") if dist.get_rank() == 1 else 1.0
    return any_non_finite(_params([value]), group=dist.group.WORLD)


def test_all_ranks_agree_on_overflow(spawn):
    assert spawn(_inf_on_rank_one, 2) == [True, True]
