"""Spike detection and the responses to it (megalite.stability, Trainer.rollback).

The end-to-end test plants a corrupted batch: while the trainer reads the global batch of samples
[56, 64) (step 8 of an undisturbed run), the logits come out 1000 times too large (a corrupted
batch's effect, planted where no norm undoes it), so the loss explodes. With
train.stability.action=rollback the run detects it, reloads the step-4 checkpoint, records samples
[32, 64) as skipped and continues after them; its curve from then on equals, step by step, a run
that was told from the start to skip [32, 64) (train.skip_samples) and never saw the corrupted batch.
"""
import json
import math

import pytest
import torch.distributed as dist

from megalite.checkpoint import latest_checkpoint, load_checkpoint
from megalite.cli.data import inspect_main
from megalite.config import ConfigError, load_config, validate
from megalite.model.blocks import Head
from megalite.stability import SpikeDetector, agree, skip_ahead, skipped_total
from megalite.train import Trainer, TrainingDiverged, build_groups
from tests.training_helpers import step_metrics, tiny_overrides

STEPS, BATCH, CORRUPT = 14, 8, 56  # samples [56, 64) are step 8's in an undisturbed run
# window and warm-up short enough for 14 steps; the planted spike is thousands of robust sigmas high
STABLE = {"train.stability.window": 10, "train.stability.min_history": 5, "checkpoint.interval": 4}


def _trainer(prefix, run_dir, corrupt: bool, **extra) -> Trainer:
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=STEPS, **extra))
    trainer = Trainer(cfg, build_groups(cfg, 1))
    if corrupt:
        head = next(m for m in trainer.model.modules() if isinstance(m, Head))

        def huge_on_the_corrupt_batch(module, inputs, out):
            batch_start = trainer.data_position - BATCH  # the trainer counts the batch in before its forward
            return out * 1000.0 if batch_start == CORRUPT else out

        head.register_forward_hook(huge_on_the_corrupt_batch)
    return trainer


def test_a_planted_spike_rolls_back_skips_its_range_and_continues_as_a_run_that_never_saw_it(counting_data,
                                                                                           tmp_path, capsys):
    rolled = _trainer(counting_data, tmp_path / "rolled", True, **STABLE, **{"train.stability.action": "rollback"})
    rolled.fit()
    log = capsys.readouterr().out
    assert log.count("rolled back to") == 1 and "step 8: spike: loss" in log
    assert rolled.stability.ranges == [(32, 64)]
    assert json.loads((tmp_path / "rolled" / "skipped_samples.json").read_text()) == [[32, 64]]
    progress = load_checkpoint(latest_checkpoint(rolled.ckpt_dir), 0)["progress"]
    assert progress["skipped_samples"] == [[32, 64]] and progress["consumed_samples"] == STEPS * BATCH + 32

    for batch, says in ((7, "no step trained on global batch 7: the run skipped samples [32, 64)"),
                        (8, "step 5 trained on global batch 8")):  # `megalite inspect` knows what was skipped
        assert inspect_main(["--run-dir", str(tmp_path / "rolled"), "--batch", str(batch)]) == 0
        assert says in capsys.readouterr().out
    never = _trainer(counting_data, tmp_path / "never", False, **{"train.skip_samples": "['32:64']"})
    never.fit()
    got, want = step_metrics(tmp_path / "rolled"), step_metrics(tmp_path / "never")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        # same process, same samples, state reloaded from exact fp32 files: equal up to summation-order
        # ulps at most (a relative 1e-6 is ~8 fp32 ulps)
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert want[5] != pytest.approx(step_metrics(tmp_path / "rolled")[4], rel=1e-3)  # the curve moves on


def test_after_a_rollback_the_rate_is_damped_for_the_steps_asked(counting_data, tmp_path):
    damped = {**STABLE, "train.stability.action": "rollback", "train.stability.rollback_lr_scale": 0.5,
              "train.stability.rollback_lr_steps": 3}
    _trainer(counting_data, tmp_path / "damped", True, **damped).fit()
    _trainer(counting_data, tmp_path / "never", False, **{"train.skip_samples": "['32:64']"}).fit()
    got, want = (step_metrics(tmp_path / name, "lr") for name in ("damped", "never"))
    assert [got[s] / want[s] for s in range(1, STEPS + 1)] == pytest.approx([1.0] * 4 + [0.5] * 3 + [1.0] * 7)


def test_skip_drops_the_update_of_a_loss_spike_and_log_only_reports(counting_data, tmp_path, capsys):
    logged = _trainer(counting_data, tmp_path / "log", True, **STABLE, **{"train.stability.action": "log"})
    logged.fit()
    assert "step 8: spike: loss" in capsys.readouterr().out and logged.stability.ranges == []
    skip = _trainer(counting_data, tmp_path / "skip", True, **STABLE, **{"train.stability.action": "skip"})
    skip.fit()
    assert "its update is skipped" in capsys.readouterr().out
    rows, applied = (step_metrics(tmp_path / name, "loss", "skipped", "lr") for name in ("skip", "log"))
    assert [s for s, (_, skipped, _) in rows.items() if skipped] == [8]
    assert rows[9][2] == applied[8][2]  # the schedule did not advance over the dropped update
    assert all(math.isfinite(loss) and loss < 20 for s, (loss, _, _) in rows.items() if s != 8)
    assert rows[9][0] != pytest.approx(applied[9][0], rel=1e-4)  # log applied the corrupted update


def test_rollbacks_are_bounded_and_a_spike_without_a_checkpoint_ends_the_run(counting_data, tmp_path):
    over = {**STABLE, "train.stability.action": "rollback", "train.stability.max_rollbacks": 0}
    with pytest.raises(TrainingDiverged, match=r"train.stability_max_rollbacks=0 rollbacks were spent"):
        _trainer(counting_data, tmp_path / "bounded", True, **over).fit()


def test_the_detector_uses_a_robust_window_and_only_rises_count():
    d = SpikeDetector(window=5, threshold=6.0, min_history=3)
    for step, v in enumerate([3.0, 2.9, 3.1, 100.0, 3.0], 1):
        d.accept(step, "loss", v)  # one outlier in the window barely moves median and MAD
    assert not d.is_spike("loss", 3.2) and not d.is_spike("loss", 0.5) and d.is_spike("loss", 4.0)
    assert d.is_spike("loss", math.nan) and d.is_spike("loss", math.inf)
    d.forget_after(2)
    assert [v for _, v in d.history["loss"]] == [3.0, 2.9] and not d.is_spike("loss", 50.0)  # too little history


def test_skip_ranges_parse_chain_and_are_validated():
    assert skip_ahead(32, [(32, 64), (64, 80)]) == 80 and skip_ahead(16, [(32, 64)]) == 16
    assert skipped_total([(0, 16), (8, 24), (40, 48)]) == 32
    for bad, match in ((["train.skip_samples=['8:4']"], "must be 'START:END'"),
                       (["train.skip_samples=['4:12']"], "multiples of train.global_batch_size=8"),
                       (["train.stability.action=skip", "engine.backend=deepspeed"], "native engine"),
                       (["train.stability.action=rollback", "checkpoint.interval=0"], "checkpoints to roll back"),
                       (["train.stability.min_history=20"], "must be <= train.stability_window=10")):
        with pytest.raises(ConfigError, match=match):
            validate(load_config("tiny", ["train.global_batch_size=8", "train.micro_batch_size=8",
                                          "train.stability.window=10", *bad]), world_size=1)


def _verdict(flag_rank: int) -> bool:
    import torch

    return agree(dist.get_rank() == flag_rank, torch.device("cpu"))


def test_one_ranks_spike_is_every_ranks(spawn):
    assert spawn(_verdict, 2, 1) == [True, True] and spawn(_verdict, 2, -1) == [False, False]
