"""Exact resume: dropout, evaluations, a longer run, and the settings that fix the data order."""
import json

import pytest

from megalite.checkpoint import CheckpointError
from megalite.config import load_config
from megalite.topology import ProcessGroups
from megalite.train import Trainer
from tests.training_helpers import step_metrics, tiny_overrides


def run(prefix, run_dir, stop_after=None, **extra):
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, **extra))
    return Trainer(cfg, ProcessGroups.single()).fit(stop_after=stop_after)


def eval_losses(run_dir) -> dict:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r["valid_loss"] for r in rows if "valid_loss" in r}


DROPOUT = {"model.dropout": 0.1, "train.eval_interval": 2, "data.num_workers": 0}


def test_resume_with_dropout_and_evaluations_reproduces_every_loss(counting_data, tmp_path):
    run(counting_data, tmp_path / "straight", steps=6, **DROPOUT)
    run(counting_data, tmp_path / "stopped", steps=6, stop_after=3, **DROPOUT)
    assert sorted(step_metrics(tmp_path / "stopped")) == [1, 2, 3]
    run(counting_data, tmp_path / "stopped", steps=6, **DROPOUT)
    assert step_metrics(tmp_path / "stopped") == step_metrics(tmp_path / "straight")
    assert eval_losses(tmp_path / "stopped") == eval_losses(tmp_path / "straight")
    assert sorted(eval_losses(tmp_path / "straight")) == [2, 4, 6]


def test_extending_a_run_continues_its_data_order(counting_data, tmp_path):
    """Raising train.steps on resume: every loss matches a run planned that long from the start."""
    schedule = {"optim.decay_steps": 6}  # the same learning rates whatever train.steps says
    run(counting_data, tmp_path / "long", steps=6, **schedule)
    run(counting_data, tmp_path / "extended", steps=3, **schedule)
    run(counting_data, tmp_path / "extended", steps=6, **schedule)
    assert step_metrics(tmp_path / "extended") == step_metrics(tmp_path / "long")


@pytest.mark.parametrize("key, value", [("data.seed", 7), ("train.global_batch_size", 16),
                                        ("data.split", "80,20,0"), ("data.seq_len", 16)])
def test_resume_with_another_data_order_is_refused_by_name(counting_data, tmp_path, key, value):
    run(counting_data, tmp_path, steps=2)
    extra = {key: value, "model.max_seq_len": 32}
    with pytest.raises(CheckpointError) as refused:
        run(counting_data, tmp_path, steps=4, **extra)
    message = str(refused.value)
    assert key in message and "is now" in message and "new train.run_dir" in message, message
    assert sorted(step_metrics(tmp_path)) == [1, 2]  # refused before any step


def test_checkpoint_holds_the_config_and_tools_find_it_outside_the_run(counting_data, tmp_path):
    from megalite.checkpoint import latest_checkpoint
    from megalite.checkpoint.layout import run_config

    ckpt_dir = tmp_path / "elsewhere" / "ckpts"
    run(counting_data, tmp_path / "run", steps=2, **{"checkpoint.dir": str(ckpt_dir), "model.hidden_size": 48})
    step = latest_checkpoint(ckpt_dir)
    assert (step / "config.yaml").is_file()
    assert run_config(step, None).model.hidden_size == 48
    (ckpt_dir / "config.yaml").write_text((step / "config.yaml").read_text().replace("48", "64"))
    assert run_config(step, None).model.hidden_size == 48  # the step's own config wins over older places
    (step / "config.yaml").unlink()
    assert run_config(step, None).model.hidden_size == 64  # older checkpoints: the checkpoint root's
