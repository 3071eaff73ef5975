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


# ------------------------------------------------------------------ WSD and inverse-square-root, against Megatron
def megatron_lr(n, max_lr, min_lr, warmup, lr_decay_steps, style, wsd_decay_steps=None, wsd_style=None):
    """Megatron-LM's OptimizerParamScheduler.get_lr written out from its definition: `n` the step,
    `lr_decay_steps` absolute (the step the decay ends at), init_lr 0. Megatron's inverse-square-root also
    drops to min_lr past lr_decay_steps (its default: the run's end); megalite's has no end, so the tests
    pass lr_decay_steps=inf for it."""
    if warmup > 0 and n <= warmup:
        return max_lr * n / warmup
    if style == "constant":
        return max_lr
    if n > lr_decay_steps:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(n, 1)))
    ratio = (n - warmup) / (lr_decay_steps - warmup)
    if style == "linear":
        coeff = 1 - ratio
    elif style == "cosine":
        coeff = (math.cos(math.pi * ratio) + 1) / 2
    else:  # WSD
        anneal_start = lr_decay_steps - wsd_decay_steps
        r = (n - anneal_start) / wsd_decay_steps
        coeff = 1.0 if n <= anneal_start else {"linear": 1 - r, "cosine": (math.cos(math.pi * r) + 1) / 2,
                                               "exponential": 2 * math.pow(0.5, r) - 1,
                                               "minus_sqrt": 1 - math.sqrt(r)}[wsd_style]
    return min_lr + coeff * (max_lr - min_lr)


# The same formulas evaluated in another order (e.g. 0.5 ** r against math.pow, a ratio against a difference)
# agree to a few ulps, not bit for bit; 1e-12 relative is far below any visible change in a curve.
REL = 1e-12
WSD_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


@pytest.mark.parametrize("style", WSD_STYLES)
def test_wsd_follows_megatron_for_every_decay_style(style):
    cfg = OptimConfig(lr=3e-3, min_lr=3e-5, warmup_steps=10, decay="wsd", wsd_decay_steps=30, wsd_decay_style=style)
    s = LRSchedule(cfg, total_steps=100)
    for n in range(0, 121):
        assert s.lr_at(n) == pytest.approx(megatron_lr(n, 3e-3, 3e-5, 10, 100, "WSD", 30, style), rel=REL), n
    assert [s.lr_at(n) for n in (10, 40, 70)] == [3e-3] * 3  # stable at the peak until the last 30 steps
    assert s.lr_at(71) < 3e-3 and s.lr_at(100) == pytest.approx(3e-5, rel=REL) and s.lr_at(150) == 3e-5


def test_wsd_key_points_by_hand():
    """Halfway through a decay of lr 1 to min_lr 0: exponential 2 * 0.5^0.5 - 1, minus_sqrt 1 - sqrt(0.5)."""
    half = {"exponential": math.sqrt(2) - 1, "linear": 0.5, "cosine": 0.5, "minus_sqrt": 1 - math.sqrt(0.5)}
    for style, want in half.items():
        s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="wsd", wsd_decay_steps=10,
                                   wsd_decay_style=style), total_steps=40)
        assert s.lr_at(30) == 1.0 and s.lr_at(35) == pytest.approx(want, rel=REL) and s.lr_at(40) == 0.0, style


def test_wsd_decay_fraction_and_start_step():
    # no wsd_decay_steps: 20% of the 90 steps after warmup decay, the last 18
    s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="wsd"), total_steps=100)
    assert (s.wsd_start, s.wsd_steps) == (82, 18)
    for n in range(0, 101):
        assert s.lr_at(n) == pytest.approx(megatron_lr(n, 1.0, 0.1, 10, 100, "WSD", 18, "exponential"), rel=REL)
    # a decay that starts after step 50 and lasts 20 steps is Megatron's WSD with lr_decay_steps = 70
    cool = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="wsd", wsd_decay_start_step=50,
                       wsd_decay_steps=20, wsd_decay_style="minus_sqrt")
    s = LRSchedule(cool, total_steps=100)
    for n in range(0, 101):
        assert s.lr_at(n) == pytest.approx(megatron_lr(n, 1.0, 0.1, 10, 70, "WSD", 20, "minus_sqrt"), rel=REL), n
    # a start step without wsd_decay_steps decays from there to the run's end
    s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="wsd", wsd_decay_start_step=60), 100)
    assert (s.wsd_start, s.wsd_steps) == (60, 40)


@pytest.mark.parametrize("warmup", [0, 1, 16])
def test_inverse_square_root_follows_megatron(warmup):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warmup, decay="inverse-square-root")
    s = LRSchedule(cfg, total_steps=200)
    for n in range(0, 2001):
        want = megatron_lr(n, 1e-3, 1e-4, warmup, math.inf, "inverse-square-root")
        assert s.lr_at(n) == pytest.approx(want, rel=REL), n
    w = max(warmup, 1)
    assert s.lr_at(4 * w) == pytest.approx(5e-4, rel=REL)  # four times the warmup: 1 / sqrt(4) of the peak
    assert s.lr_at(100 * w) == pytest.approx(1e-4, rel=REL)  # 1e-3 / sqrt(100) meets the floor; it holds after
    assert s.lr_at(10_000) == 1e-4


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_the_older_kinds_still_follow_megatron(decay):
    s = LRSchedule(OptimConfig(lr=2.0, min_lr=0.2, warmup_steps=5, decay=decay), total_steps=45)
    for n in range(0, 60):
        assert s.lr_at(n) == pytest.approx(megatron_lr(n, 2.0, 0.2, 5, 45, decay), rel=REL), n


@pytest.mark.parametrize("kwargs, match", [
    ({"wsd_decay_steps": 0}, "optim.wsd_decay_steps=0 must be >= 1"),
    ({"wsd_decay_fraction": 1.5}, r"optim.wsd_decay_fraction=1.5 must be in \(0, 1\]"),
    ({"wsd_decay_steps": 95}, "inside the warmup of 10 steps; lower optim.wsd_decay_steps"),
    ({"wsd_decay_start_step": 5}, "inside the warmup of 10 steps; raise optim.wsd_decay_start_step"),
    ({"wsd_decay_start_step": 100}, "optim.wsd_decay_start_step=100 leaves no step to decay"),
])
def test_bad_wsd_settings_are_refused_by_the_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(OptimConfig(decay="wsd", warmup_steps=10, **kwargs), 100)


def test_milestones_and_description():
    s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, decay="wsd", wsd_decay_steps=20), 100)
    assert s.milestones(100) == [1, 10, 80, 90, 100]
    assert s.describe() == "wsd: warmup 10 steps, stable to step 80, exponential decay over 20 steps to 0"
    s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="cosine"), 100)
    assert s.milestones(100) == [1, 50, 100]


# ------------------------------------------------------------------ a cooldown branched from a stable-phase checkpoint
COOLDOWN = {"optim.decay": "wsd", "optim.wsd_decay_start_step": 4, "optim.wsd_decay_steps": 4,
            "optim.wsd_decay_style": "minus_sqrt", "optim.min_lr": 3e-5}


def test_cooldown_resumed_from_a_stable_checkpoint_follows_its_own_config(counting_data, tmp_path):
    """A run planned for 12 steps (WSD, its decay in the last 4, exponential) stops in its stable phase at step
    4; resumed with a cooldown config (decay after step 4, over 4 steps, minus_sqrt, 8 steps in all) its
    rates and losses are those of the cooldown config run from scratch, not the plan it was saved under."""
    from megalite.config import load_config
    from megalite.topology import ProcessGroups
    from megalite.train import Trainer
    from tests.training_helpers import step_metrics, tiny_overrides

    def run(run_dir, steps, stop_after=None, **extra):
        cfg = load_config("tiny", tiny_overrides(counting_data, run_dir, steps=steps, **extra))
        Trainer(cfg, ProcessGroups.single()).fit(stop_after=stop_after)
        return cfg

    stable = {"optim.decay": "wsd", "optim.wsd_decay_steps": 4, "optim.min_lr": 3e-5}
    planned = run(tmp_path / "branch", 12, stop_after=4, **stable)
    cooldown = run(tmp_path / "branch", 8, **COOLDOWN)
    run(tmp_path / "scratch", 8, **COOLDOWN)
    branch, scratch = (step_metrics(tmp_path / d, "lr", "loss") for d in ("branch", "scratch"))
    assert branch == scratch and sorted(branch) == list(range(1, 9))
    schedule = LRSchedule(cooldown.optim, 8)
    assert [branch[n][0] for n in range(1, 9)] == [schedule.lr_at(n) for n in range(1, 9)]
    assert branch[4][0] == branch[3][0] == 3e-3 and branch[8][0] == pytest.approx(3e-5, rel=REL)
    saved_plan = LRSchedule(planned.optim, 12)
    assert [saved_plan.lr_at(n) for n in range(5, 9)] == [3e-3] * 4  # the saved plan was still stable there
