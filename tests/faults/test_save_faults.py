"""Saves that die: kill -9 at each phase of a save (planted deterministically, not by timing luck) and a
full disk. Each leaves a `latest` that loads, and the run resumes to the straight run's losses exactly."""
import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from megalite.checkpoint import latest_checkpoint
from megalite.distributed.faults import SAVE_PHASES
from tests.faults.harness import assert_resumes_exactly, first_line, megalite, megalite_process, train_args

# keep_last=1 makes step 4's save prune step 2, so the "pruning" phase is reached
KEEP_ONE = {"checkpoint.keep_last": 1}
# where each kill leaves the checkpoint root: the step `latest` names, and the unfinished leftovers
AFTER_KILL = {"tensors": ("step_00000002", ["step_00000004.tmp"]),
              "renamed": ("step_00000002", ["step_00000004"]),
              "pruning": ("step_00000004", ["step_00000002.deleting.tmp"])}


@pytest.mark.parametrize("phase", SAVE_PHASES)
def test_kill_9_during_a_save_leaves_a_latest_that_resumes_exactly(capsys, counting_data, tmp_path, straight, phase):
    killed = megalite_process(*train_args(counting_data, tmp_path, **KEEP_ONE),
                              env={"MEGALITE_FAULT_INJECT": f"rank=0,step=4,phase={phase},mode=kill"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    root = tmp_path / "checkpoints"
    pointed, leftovers = AFTER_KILL[phase]
    assert latest_checkpoint(root).name == pointed
    assert all((root / name).exists() for name in leftovers), sorted(os.listdir(root))
    assert_resumes_exactly(capsys, counting_data, tmp_path, straight)
    assert not list(root.glob("*.tmp"))  # the resumed run's first save cleaned what the kill left


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command here: cannot make a small filesystem to fill")
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root in a machine that allows it): {out.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A filesystem with room for one checkpoint of the tiny run (about 0.8 MB) and its run files, not two."""
    where = tmp_path / "disk"
    _mount_tmpfs(where, "1200k")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def test_a_full_disk_during_a_save_removes_the_partial_save_and_says_what_it_needed(capsys, counting_data,
                                                                                   small_disk, straight):
    run_dir = small_disk / "run"
    code, err = megalite(capsys, *train_args(counting_data, run_dir, **{"checkpoint.keep_last": 10}))
    assert code == 1, err
    line = first_line(err)
    assert line.startswith(f"megalite: saving step_00000004 to {run_dir / 'checkpoints'} failed: "
                           f"{os.strerror(errno.ENOSPC)} (rank 0 needs about "), err
    assert " are free); removed the partial save; `latest` still names step_00000002." in line, err
    root = run_dir / "checkpoints"
    assert not list(root.glob("*.tmp")) and latest_checkpoint(root).name == "step_00000002"
    # the operator frees space, as the message says, and resumes
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True, capture_output=True, timeout=30)
    assert_resumes_exactly(capsys, counting_data, run_dir, straight)
