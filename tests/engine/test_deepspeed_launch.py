"""DeepSpeed runs as real processes: kill -9 and resume under torchrun, and the hostfile launcher recipes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from tests.engine.test_deepspeed import _train, zero  # noqa: E402
from tests.spawn_pool import free_port  # noqa: E402
from tests.training_helpers import step_metrics as losses  # noqa: E402
from tests.training_helpers import tiny_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KILL_STEPS = 8  # the crash is planted at step 4 (a fault that holds rank 0 there), so a short run suffices


def _env(**extra) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _torchrun(prefix, run_dir, extra, env=None) -> subprocess.Popen:
    """2 ranks under torchrun (which starts each rank in a session of its own: see `_crash`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "megalite", "train", "tiny",
           *tiny_overrides(prefix, run_dir, steps=KILL_STEPS, **{"train.device": "cpu", **extra})]
    return subprocess.Popen(cmd, env=_env(**(env or {})), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _crash(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a node crash does. torchrun starts each rank in a
    session of its own, so killing the launcher's process group would leave the ranks running (still
    writing to the run directory, whose lock then refuses the resumed run): each process is killed."""
    import psutil

    procs = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    launcher.wait()


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout=240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            _crash(proc)
            raise AssertionError("training made no progress")
        time.sleep(0.05)


@pytest.mark.slow
def test_resume_after_kill_9_is_exact(counting_data, tmp_path, spawn):
    """SIGKILL the launcher and both ranks at once (a node crash) inside step 4's save (its step directory
    published, `latest` not yet moved), resume with train.resume=auto: every step's loss equals the
    uninterrupted run's exactly. ZeRO-3, whose state is sliced over the ranks; the other stages' resume
    is test_deepspeed.py::test_resume_is_exact, and kills at every save phase are tests/faults'."""
    extra = zero(3, **{"checkpoint.interval": 1, "train.resume": "auto"})
    straight = spawn(_train, 2, counting_data, str(tmp_path / "straight"), extra, steps=KILL_STEPS)[0]
    run_dir = tmp_path / "killed"
    killed = _torchrun(counting_data, run_dir, extra,
                       env={"MEGALITE_FAULT_INJECT": "rank=0,step=4,phase=renamed,mode=hang"})
    _wait_for_file(run_dir / "checkpoints" / "step_00000004" / "manifest.json", killed)
    time.sleep(1.0)  # let rank 0 reach the planted hang (a kill before it is a crash all the same)
    _crash(killed)
    assert len(losses(run_dir)) < KILL_STEPS, "the run finished before the kill; nothing was tested"
    resumed = _torchrun(counting_data, run_dir, extra)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-4000:]
    assert "resumed from" in out
    assert losses(run_dir) == dict(enumerate((loss for loss, _ in straight), start=1))


def _deepspeed_sh(prefix, run_dir, hostfile, **env):
    overrides = tiny_overrides(prefix, run_dir, steps=2, **{
        "optim.warmup_steps": 1, "train.device": "cpu", "checkpoint.interval": 0,
        "engine.backend": "deepspeed", "engine.zero_stage": 1})
    return subprocess.Popen(["bash", str(ROOT / "launch" / "deepspeed.sh"), "-", "tiny", *overrides],
                            env=_env(HOSTFILE=str(hostfile), **env), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def one_host_run(counting_data, tmp_path_factory):
    """One `HOSTFILE=... launch/deepspeed.sh - ...` run with `localhost slots=2`: (hostfile, exit code,
    output, run dir). Both hostfile tests read it (one launch, ~15 s, instead of one each)."""
    tmp = tmp_path_factory.mktemp("one_host")
    hostfile = tmp / "hostfile"
    hostfile.write_text("# one node\nlocalhost slots=2\n")
    proc = _deepspeed_sh(counting_data, tmp / "run", hostfile, MASTER_PORT=str(free_port()),
                         MASTER_ADDR="127.0.0.1")
    out = proc.communicate(timeout=300)[0]
    return hostfile, proc.returncode, out, tmp / "run"


@pytest.mark.slow
def test_hostfile_with_one_host_runs_locally_without_ssh(one_host_run):
    """`HOSTFILE=... launch/deepspeed.sh - ...` with `localhost slots=2`: deepspeed's ssh check is skipped
    (one host is launched locally), and the slots give 2 ranks."""
    hostfile, returncode, out, run_dir = one_host_run
    assert returncode == 0, out[-4000:]
    assert f"--hostfile {hostfile}" in out and "--no_ssh_check" in out and "dist_world_size=2" in out
    assert sorted(losses(run_dir)) == [1, 2]


@pytest.mark.slow
def test_hostfile_two_nodes_without_ssh_one_command_per_node(counting_data, tmp_path, one_host_run):
    """Two 'nodes' (localhost and 127.0.0.1, one slot each) started separately with NODE_RANK=0/1 (--no_ssh)
    form one 2-rank run with the single-host run's losses."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = [_deepspeed_sh(counting_data, tmp_path / "run", hostfile, MASTER_PORT=port, MASTER_ADDR="127.0.0.1",
                           NODE_RANK=str(r)) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    for rank, (p, out) in enumerate(zip(nodes, outs)):
        assert p.returncode == 0, f"node {rank}:\n{out[-4000:]}"
        assert f"--no_ssh --node_rank {rank}" in out
    _, single_returncode, single_out, single_dir = one_host_run
    assert single_returncode == 0, single_out[-4000:]
    assert losses(tmp_path / "run") == losses(single_dir)
