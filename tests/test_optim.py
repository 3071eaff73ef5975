"""AdamW grouping and the learning-rate curve."""
import math

import pytest
import torch
from torch import nn

from megalite.config import OptimConfig
from megalite.optim import LRSchedule, build_optimizer, param_groups


def _model():
    return nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))


def test_no_decay_for_one_dimensional_parameters():
    model = _model()
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert decay == {id(model[0].weight), id(model[2].weight)}  # embedding decays by the ndim rule
    assert no_decay == {id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0


def test_frozen_and_tied_parameters_are_handled():
    model = _model()
    model[1].weight.requires_grad_(False)
    head = nn.Linear(4, 10, bias=False)
    head.weight = model[0].weight  # tied
    model.append(head)
    params = [p for g in param_groups(model, 0.1) for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == 4


def test_build_optimizer_uses_config():
    cfg = OptimConfig(lr=1e-3, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.2)
    opt = build_optimizer(_model(), cfg, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.8, 0.9), 1e-6, 0.2)
    assert g["fused"]  # torch's fused CPU AdamW: ten times the foreach path's speed (optim.build_optimizer)


def test_warmup_then_cosine_key_points():
    s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="cosine"), total_steps=110)
    assert s.lr_at(0) == 0.0
    assert s.lr_at(1) == pytest.approx(0.1)  # step 1 already trains
    assert s.lr_at(5) == pytest.approx(0.5)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.55)  # halfway through cosine: midpoint of lr and min_lr
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)  # constant after the decay
    lrs = [s.lr_at(k) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_decay_and_explicit_decay_steps():
    s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="linear", decay_steps=50), 1000)
    assert s.lr_at(0) == 1.0
    assert s.lr_at(25) == pytest.approx(0.5)
    assert s.lr_at(50) == 0.0 and s.lr_at(51) == 0.0


def test_constant_keeps_lr_after_warmup():
    s = LRSchedule(OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=4, decay="constant"), 100)
    assert [s.lr_at(k) for k in (1, 4, 5, 100, 1000)] == [0.5, 2.0, 2.0, 2.0, 2.0]


def test_state_dict_round_trip():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=2)
    s = LRSchedule(cfg, 10)
    lrs = [s.advance() for _ in range(3)]
    assert lrs[0] == 0.5 and s.current_lr == lrs[-1]
    t = LRSchedule(cfg, 10)
    t.load_state_dict(s.state_dict())
    assert t.advance() == s.advance()
    with pytest.raises(KeyError, match="last_step"):
        t.load_state_dict({})


@pytest.mark.parametrize("kwargs, match", [({"decay": "step"}, "optim.decay='step'"),
                                            ({"min_lr": 1.0, "lr": 0.1}, "min_lr"),
                                            ({"decay_steps": 0}, "decay_steps=0")])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(OptimConfig(**kwargs), 100)


def test_warmup_longer_than_run_still_defined():
    s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=20), total_steps=10)
    assert s.lr_at(10) == 0.5 and math.isfinite(s.lr_at(30))
