"""One run per run directory: a second run is refused before it writes anything, naming the holder."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from megalite.checkpoint import save_checkpoint
from megalite.distributed.run_lock import RunLock, RunLocked, lock_for_all_ranks
from tests.faults.harness import first_line, megalite, megalite_process, snapshot, train_args


@pytest.fixture(scope="module")
def hung_run(counting_data, tmp_path_factory):
    """A real training process that hangs in step 3 (so it holds its run directory), ended after the tests."""
    run_dir = tmp_path_factory.mktemp("locked") / "run"
    proc = megalite_process(*train_args(counting_data, run_dir),
                            env={"MEGALITE_FAULT_INJECT": "rank=0,step=3,mode=hang"}, wait=False)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step_00000002" / "manifest.json").is_file():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the first run never reached step 2"
        time.sleep(0.05)
    yield run_dir, proc
    proc.kill()
    proc.wait()


def test_a_second_run_in_the_same_run_dir_is_refused_before_writing(capsys, counting_data, hung_run):
    run_dir, first = hung_run
    before = snapshot(run_dir)
    code, err = megalite(capsys, *train_args(counting_data, run_dir, **{"train.seed": 7}))
    assert code == 1, err
    line = first_line(err)
    assert line.startswith(f"megalite: {run_dir} is in use by another run (pid {first.pid} on "
                           f"{socket.gethostname()}, since "), err
    assert snapshot(run_dir) == before  # config.yaml (with its other seed), metrics, checkpoints: untouched


def test_another_run_cannot_clean_up_a_locked_checkpoint_root(tmp_path, hung_run):
    run_dir, _ = hung_run
    root = run_dir / "checkpoints"
    in_progress = root / "step_00000003.tmp"  # what a save in progress of the first run looks like
    in_progress.mkdir()
    with pytest.raises(RunLocked, match="is in use by another run"):
        save_checkpoint(root, 9, 0, {"w": torch.zeros(2)})
    assert in_progress.is_dir() and not (root / "step_00000009").exists()


def _lock_elsewhere(directory) -> int:
    """Exit code of another process that tries the lock: 0 when it got it, 3 when refused."""
    code = ("import sys; from megalite.distributed.run_lock import RunLock, RunLocked\n"
            "try:\n    RunLock([sys.argv[1]]).acquire()\nexcept RunLocked:\n    sys.exit(3)")
    return subprocess.run([sys.executable, "-c", code, str(directory)], timeout=60).returncode


def test_the_lock_is_reentrant_in_one_process_and_released_on_exit(tmp_path):
    with RunLock([tmp_path, tmp_path / "checkpoints"]):
        with RunLock([tmp_path]):  # the Trainer retakes what `megalite train` took
            pass
        save_checkpoint(tmp_path / "checkpoints", 1, 0, {"w": torch.zeros(2)})  # and the save takes it again
        holder = (tmp_path / ".lock").read_text()
        assert holder.startswith(f"pid {os.getpid()} on {socket.gethostname()}, since ")
        assert _lock_elsewhere(tmp_path) == 3  # still held after the inner holders let go
    assert _lock_elsewhere(tmp_path) == 0


def test_other_ranks_follow_rank_0s_verdict(tmp_path):
    message = f"{tmp_path} is in use by another run (pid 1 on elsewhere)"
    with pytest.raises(RunLocked, match="pid 1 on elsewhere"):
        lock_for_all_ranks([tmp_path], rank=1, broadcast=lambda verdict: message)  # rank 1 tries no lock
    assert not (tmp_path / ".lock").exists()
    sent = []
    lock = lock_for_all_ranks([tmp_path], rank=0, broadcast=lambda verdict: sent.append(verdict) or verdict)
    assert sent == [None] and (tmp_path / ".lock").exists()
    lock.release()
