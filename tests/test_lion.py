"""Lion (megalite.lion, optim.optimizer=lion): equal to the paper's algorithm written out, resumable, and
the same curve at tp=2 and dp=2 as on one process."""
import pytest
import torch
import torch.distributed as dist

from megalite.config import ConfigError, load_config, validate
from megalite.lion import Lion
from megalite.train import Trainer, build_groups
from tests.training_helpers import step_metrics, tiny_overrides

LION = {"optim.optimizer": "lion", "optim.lr": 1e-3, "optim.weight_decay": 0.3, "optim.beta2": 0.99}


def test_lion_is_the_papers_update_written_out():
    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(11)]
    mine = [p.clone().requires_grad_(True) for p in params]
    opt = Lion([{"params": mine[:1], "weight_decay": 0.1}, {"params": mine[1:], "weight_decay": 0.0}],
               lr=0.01, betas=(0.9, 0.99))
    ref, moments, decays = [p.clone() for p in params], [torch.zeros_like(p) for p in params], (0.1, 0.0)
    for _ in range(10):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(mine, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):  # Algorithm 1 of Chen et al. 2023, one element-wise line at a time
            c = 0.9 * moments[i] + (1 - 0.9) * g
            ref[i] = ref[i] - 0.01 * (torch.sign(c) + decays[i] * ref[i])
            moments[i] = 0.99 * moments[i] + (1 - 0.99) * g
    for p, r, m in zip(mine, ref, moments):
        # fp32 both ways, the same operations grouped differently (lerp vs the written-out sums): a few ulps
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-5, atol=1e-7)


def _run(prefix, run_dir, extra: dict, stop_after=None):
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=8, **{**LION, **extra}))
    trainer = Trainer(cfg, build_groups(cfg, dist.get_world_size() if dist.is_initialized() else 1))
    trainer.fit(stop_after=stop_after)
    return step_metrics(run_dir) if trainer.rank == 0 else None


def test_lion_trains_and_resumes_onto_the_same_curve(counting_data, tmp_path):
    whole = _run(counting_data, tmp_path / "whole", {})
    assert whole[8] < whole[1] - 0.2
    _run(counting_data, tmp_path / "resumed", {}, stop_after=3)
    resumed = _run(counting_data, tmp_path / "resumed", {})
    for step in whole:  # one process, momentum reloaded from exact fp32 files
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6), step


@pytest.mark.parametrize("layout", [{"parallel.tp": 2}, {}])  # tp=2, dp=2
def test_lion_layouts_reproduce_the_one_process_curve(counting_data, tmp_path, spawn, layout):
    one = _run(counting_data, tmp_path / "one", {})
    two = spawn(_run, 2, counting_data, str(tmp_path / "two"), layout)[0]
    for step in one:  # summation order may flip the sign of a near-zero momentum: a few such coordinates move
        assert two[step] == pytest.approx(one[step], rel=1e-5), step  # by 2 lr; the loss moves by < 1e-5


def test_the_native_engine_steps_with_lion(counting_data, tmp_path):
    cfg = load_config("tiny", tiny_overrides(counting_data, tmp_path, steps=1, **LION))
    trainer = Trainer(cfg, build_groups(cfg, 1))
    trainer.fit()
    opt = trainer.engine.optimizer
    assert isinstance(opt, Lion) and [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    assert all(set(state) == {"exp_avg"} for state in opt.state.values())  # one moment, not AdamW's two


def test_lion_with_deepspeed_is_refused_by_name():
    with pytest.raises(ConfigError, match="optim.optimizer=lion with engine.backend=deepspeed: megalite wires"):
        validate(load_config("tiny", ["optim.optimizer=lion", "engine.backend=deepspeed"]), world_size=1)
