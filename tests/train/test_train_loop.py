"""The training loop end to end on a tiny model and the synthetic counting corpus."""
import json

import pytest
import torch.distributed as dist

from megalite.checkpoint import CheckpointError
from megalite.config import load_config
from megalite.topology import ProcessGroups
from megalite.train import Trainer, TrainingDiverged, build_groups
from tests.training_helpers import step_metrics as losses
from tests.training_helpers import tiny_overrides


def run_inprocess(prefix, run_dir, stop_after=None, **extra):
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, **extra))
    return Trainer(cfg, ProcessGroups.single()).fit(stop_after=stop_after)


def test_run_directory_has_config_metrics_and_checkpoints(counting_data, tmp_path, capsys):
    final = run_inprocess(counting_data, tmp_path, steps=6, **{"train.eval_interval": 3})
    first = capsys.readouterr().out.splitlines()[:3]  # what was set up, before the first step
    assert first[0] == ("megalite: 1 rank(s) on cpu (fp32): tp=1 pp=1 dp=1, engine native, schedule 1f1b over 4 "
                        "micro-batch(es) of 2"), first
    assert "M parameters (" in first[1] and "256 tokens per step (8 x 32) for 6 steps" in first[1], first
    assert first[2].startswith(f"megalite: run directory {tmp_path} "), first
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s", "peak_mem_gb"):
        assert key in train_rows[0]
    assert any("valid_loss" in r and "valid_ppl" in r for r in rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "latest").exists()
    assert load_config(str(tmp_path / "config.yaml")).train.steps == 6
    assert final["valid_loss"] > 0


def test_resume_after_clean_stop_reproduces_losses_exactly(counting_data, tmp_path):
    run_inprocess(counting_data, tmp_path / "straight")
    run_inprocess(counting_data, tmp_path / "stopped", stop_after=3)
    assert sorted(losses(tmp_path / "stopped")) == [1, 2, 3]
    run_inprocess(counting_data, tmp_path / "stopped")
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_corrupt_checkpoint_is_refused_by_name(counting_data, tmp_path):
    run_inprocess(counting_data, tmp_path, steps=2)
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    victim = next(latest.glob("rank_00000.safetensors"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="rank_00000.safetensors"):
        run_inprocess(counting_data, tmp_path, steps=4)


def test_nan_loss_stops_with_step_and_last_checkpoint(counting_data, tmp_path, monkeypatch):
    cfg = load_config("tiny", tiny_overrides(counting_data, tmp_path, steps=6))
    trainer = Trainer(cfg, ProcessGroups.single())
    real_loss, calls = trainer.model.loss_from_logits, []

    def poisoned(*args):
        calls.append(1)
        out = real_loss(*args)
        return out * float("nan") if len(calls) > 4 * 3 else out  # 4 micro-batches a step: NaN in step 4

    monkeypatch.setattr(trainer.model, "loss_from_logits", poisoned)
    with pytest.raises(TrainingDiverged, match=r"step 4.*step_0+2"):
        trainer.fit()


def _dp_run(prefix, run_dir):
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=4))
    Trainer(cfg, build_groups(cfg, dist.get_world_size())).fit()
    return losses(run_dir) if dist.get_rank() == 0 else None


def test_two_rank_data_parallel_equals_one_rank(counting_data, tmp_path, spawn):
    one = spawn(_dp_run, 1, counting_data, str(tmp_path / "dp1"))[0]
    two = spawn(_dp_run, 2, counting_data, str(tmp_path / "dp2"))[0]
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)


def _resume_on_two_ranks(prefix, run_dir) -> str:
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=4))
    try:
        Trainer(cfg, build_groups(cfg, dist.get_world_size())).fit()
    except CheckpointError as e:
        return str(e)
    return "resumed"


def test_resume_with_another_rank_count_is_refused_with_the_reshard_command(counting_data, tmp_path, spawn):
    run_inprocess(counting_data, tmp_path, steps=2)
    messages = spawn(_resume_on_two_ranks, 2, counting_data, str(tmp_path))
    for message in messages:
        assert "written by 1 ranks but this run has 2" in message, message
        assert "megalite convert reshard" in message and "--dp 2" in message, message


def _train_pp2(prefix, run_dir, steps, partition) -> str:
    extra = {"parallel.pp": 2, "model.num_layers": 4, "parallel.partition": partition}
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=steps, **extra))
    try:
        Trainer(cfg, build_groups(cfg, dist.get_world_size())).fit()
    except CheckpointError as e:
        return str(e)
    return "trained"


def test_resume_with_another_partition_is_refused(counting_data, tmp_path, spawn):
    """Which blocks a stage holds depends on parallel.partition: a rank must not load another's."""
    assert spawn(_train_pp2, 2, counting_data, str(tmp_path), 1, "uniform") == ["trained"] * 2
    for message in spawn(_train_pp2, 2, counting_data, str(tmp_path), 2, "balanced"):
        assert "parallel.partition=uniform but this run uses parallel.partition=balanced" in message, message


def test_z_loss_joins_the_objective_and_not_the_logged_loss(counting_data, tmp_path):
    curves = {}
    for z in (0.0, 0.05):
        cfg = load_config("tiny", tiny_overrides(counting_data, tmp_path / str(z), steps=3, **{"optim.z_loss": z}))
        Trainer(cfg, ProcessGroups.single()).fit()
        curves[z] = losses(tmp_path / str(z), "loss", "grad_norm")
    assert curves[0.0][1][0] == curves[0.05][1][0]  # step 1's loss is the cross-entropy of the same weights
    assert curves[0.0][1][1] != pytest.approx(curves[0.05][1][1], rel=1e-3)  # its gradient is not
    assert curves[0.0][3][0] != pytest.approx(curves[0.05][3][0], rel=1e-4)
