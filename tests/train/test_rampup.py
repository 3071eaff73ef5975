"""Batch-size ramp-up (train.rampup_batch_size, Megatron's --rampup-batch-size START INCR SAMPLES).

The sizes are checked against megatron-core's own RampupBatchsizeNumMicroBatchesCalculator; a ramped
run reads the training order in order (consumed samples add up), resumes mid-ramp onto the same
curve, and gives the same curve on two data-parallel ranks as on one.
"""
import pytest
import torch.distributed as dist

from megalite.config import ConfigError, load_config, validate
from megalite.config.batch_rampup import batch_size_at, parse_rampup
from megalite.train import Trainer, build_groups
from tests.training_helpers import step_metrics, tiny_overrides

# 2, 4, 6 over the first 24 samples, then the preset's 8; micro-batches of 1 so that dp=2 takes every size
RAMP = {"train.rampup_batch_size": "[2,2,24]", "train.micro_batch_size": 1}
STEPS = 12
KEYS = ("loss", "global_batch_size", "consumed_samples")


def _sizes(ramp, global_batch, steps):
    consumed, out = 0, []
    for _ in range(steps):
        out.append(batch_size_at(consumed, ramp, global_batch))
        consumed += out[-1]
    return out


@pytest.mark.parametrize("gbs,ramp,micro,dp", [(8, (2, 2, 24), 2, 1), (64, (16, 8, 300), 4, 2),
                                               (96, (32, 32, 1000), 8, 4), (24, (8, 8, 1), 8, 1)])
def test_the_ramp_equals_megatron_cores_calculator(gbs, ramp, micro, dp):
    calculators = pytest.importorskip("megatron.core.num_microbatches_calculator")
    theirs = calculators.RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size=gbs, micro_batch_size=micro, data_parallel_size=dp, decrease_batch_size_if_needed=False,
        rank=0, start_global_batch_size=ramp[0], batch_size_increment=ramp[1], ramup_samples=ramp[2])
    consumed, sizes = 0, []
    for _ in range(40):
        theirs.update(consumed, True)
        sizes.append(theirs.get_current_global_batch_size())
        consumed += sizes[-1]
    assert _sizes(ramp, gbs, 40) == sizes


def _run(prefix, run_dir, stop_after=None):
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=STEPS, **RAMP))
    world = dist.get_world_size() if dist.is_initialized() else 1
    trainer = Trainer(cfg, build_groups(cfg, world))
    trainer.fit(stop_after=stop_after)
    return step_metrics(run_dir, *KEYS) if trainer.rank == 0 else None


def test_a_ramped_run_reads_in_order_and_resumes_mid_ramp_onto_the_same_curve(counting_data, tmp_path):
    whole = _run(counting_data, tmp_path / "whole")
    want = _sizes((2, 2, 24), 8, STEPS)
    assert [whole[s][1] for s in range(1, STEPS + 1)] == want == [2, 2, 2, 2, 4, 4, 6, 6, 8, 8, 8, 8]
    assert [whole[s][2] for s in range(1, STEPS + 1)] == [sum(want[:s]) for s in range(1, STEPS + 1)]
    _run(counting_data, tmp_path / "resumed", stop_after=5)  # stops inside the ramp (at 4-sample batches)
    resumed = _run(counting_data, tmp_path / "resumed")
    for step in range(1, STEPS + 1):
        # one process both times, the state reloaded from exact fp32 files: the same bits up to ulps
        assert resumed[step][0] == pytest.approx(whole[step][0], rel=1e-6), step
        assert resumed[step][1:] == whole[step][1:], step


def test_two_data_parallel_ranks_ramp_onto_the_one_rank_curve(counting_data, tmp_path, spawn):
    one = spawn(_run, 1, counting_data, str(tmp_path / "dp1"))[0]
    two = spawn(_run, 2, counting_data, str(tmp_path / "dp2"))[0]
    for step in range(1, STEPS + 1):  # the same samples per step, averaged over two ranks: summation order
        assert two[step][0] == pytest.approx(one[step][0], rel=1e-5), step
        assert two[step][1:] == one[step][1:], step


def test_bad_ramps_are_refused_by_name():
    assert parse_rampup([], 8) is None
    for ramp, match in (("[2,2]", "three integers"), ("[8,2,10]", "0 < START < train.global_batch_size=8"),
                        ("[2,4,10]", "divisible by INCR=4"), ("[2,2,0]", "SAMPLES > 0"),
                        ("[3,5,10]", r"not multiples of .* = 2")):
        with pytest.raises(ConfigError, match=match):
            validate(load_config("tiny", ["train.global_batch_size=8", "train.micro_batch_size=2",
                                          f"train.rampup_batch_size={ramp}"]), world_size=1)
    with pytest.raises(ConfigError, match="native engine without pipeline"):
        validate(load_config("tiny", ["train.global_batch_size=8", "train.micro_batch_size=2",
                                      "train.rampup_batch_size=[2,2,8]", "engine.backend=deepspeed"]), world_size=1)
