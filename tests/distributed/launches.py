"""What the launcher tests share: the tiny tp=2 x dp=2 run every launcher trains, and how losses compare."""
import os
import subprocess
import sys

import pytest

from tests.training_helpers import step_metrics, tiny_overrides

STEPS = 4


def train_cmd(prefix, run_dir) -> list[str]:
    """`-m megalite train` arguments for the tiny tp=2 x dp=2 run every launcher test compares."""
    return ["-m", "megalite", "train", "tiny", "parallel.tp=2", "parallel.timeout_s=60",
            *tiny_overrides(prefix, run_dir, steps=STEPS, **{"checkpoint.interval": 1000})]


def worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def single_node_losses(prefix, run_dir) -> dict:
    """Losses of one `torchrun --standalone --nproc_per_node 4` run: the reference."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           *train_cmd(prefix, run_dir)]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return step_metrics(run_dir)


def assert_same_losses(got: dict, want: dict, label: str) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), label
    for step in want:
        # the same tp=2 x dp=2 program on the same CPU, only launched differently: equal to a few fp32 ulps
        # of the loss (~5; rel 1e-6 is ~8 ulps), while a rank on the wrong data or group moves it by >= 1e-3
        assert got[step] == pytest.approx(want[step], rel=1e-6), f"{label}: step {step}"
