"""A failed rank ends the whole job quickly, and rank 0 says which rank, where and when.

The end-to-end tests run `torchrun --nproc_per_node 4 -m megalite train` with
tp=2 x dp=2 on gloo and break rank 3 (coordinates tp=1 pp=0 dp=1) in three ways:
an exception, a SIGKILL from outside, and a hang.
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import pytest

from megalite.distributed import comm
from megalite.distributed.failure import FailureGuard, PeerFailure, Terminated, _in_communication, classify, placement
from megalite.distributed.faults import InjectedFault, fault_from_env, parse_fault
from megalite.topology import Topology
from tests.training_helpers import step_metrics, tiny_overrides

RANK3 = r"rank 3 \(pipeline stage 0, coordinates tp=1 pp=0 dp=1\)"
TIMEOUT_S = 20
MARGIN_S = 40  # process start-up and imports on a loaded two-core machine


def _launch(prefix, run_dir, steps, timeout_s=TIMEOUT_S, fault=None, tag=""):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "megalite", "train", "tiny", "parallel.tp=2", f"parallel.timeout_s={timeout_s}",
           *tiny_overrides(prefix, run_dir, steps=steps, **{"checkpoint.interval": 1000})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MEGALITE_TEST_TAG": tag}
    if fault:
        env["MEGALITE_FAULT_INJECT"] = fault
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, started, timeout_s=TIMEOUT_S):
    out = proc.communicate(timeout=timeout_s + MARGIN_S + 60)[0]
    assert proc.returncode != 0, out[-4000:]
    return out, time.monotonic() - started


def test_raise_on_one_rank_ends_the_job_and_rank0_names_it(counting_data, tmp_path):
    started = time.monotonic()
    out, took = _finish(_launch(counting_data, tmp_path, steps=6, fault="rank=3,step=3,mode=raise"), started)
    assert took < TIMEOUT_S + MARGIN_S, out[-4000:]
    assert "megalite: job failed at step 3" in out, out[-4000:]
    assert re.search(RANK3 + r" failed on \S+ at step 3: error: InjectedFault", out), out[-4000:]
    assert sorted(os.listdir(tmp_path / "failures")) == [f"rank_0000{r}.json" for r in range(4)]


def test_raise_during_setup_ends_the_job_and_rank0_names_it(counting_data, tmp_path):
    """The guard is entered before the Trainer is built: a rank failing there is named too."""
    started = time.monotonic()
    out, took = _finish(_launch(counting_data, tmp_path, steps=6, fault="rank=3,step=setup,mode=raise"), started)
    assert took < TIMEOUT_S + MARGIN_S, out[-4000:]
    assert "megalite: job failed during setup" in out, out[-4000:]
    assert re.search(RANK3 + r" failed on \S+ during setup: error: InjectedFault", out), out[-4000:]
    assert (tmp_path / "failures" / "rank_00003.json").exists()


def _pid_of_rank(tag: str, rank: int) -> int | None:
    """The pid of the torchrun worker with our tag and RANK=rank, from /proc/*/environ."""
    want = {f"MEGALITE_TEST_TAG={tag}".encode(), f"RANK={rank}".encode()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if want <= env:
            return int(pid)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the rank's pid through /proc")
def test_kill_9_of_one_rank_ends_the_job_and_rank0_names_it(counting_data, tmp_path):
    tag = uuid.uuid4().hex
    proc = _launch(counting_data, tmp_path, steps=200, tag=tag)
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.jsonl").exists() or len(step_metrics(tmp_path)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "training never reached step 2"
        time.sleep(0.1)
    pid = _pid_of_rank(tag, 3)
    assert pid is not None, "rank 3's process not found"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    out, took = _finish(proc, killed)
    assert took < TIMEOUT_S + 15, out[-4000:]  # everything was already running: no start-up margin
    match = re.search(RANK3 + r" failed: it died without a record \(killed.*during step (\d+)", out)
    assert match and int(match.group(1)) >= 2, out[-4000:]
    assert "megalite: job failed at step" in out
    assert not (tmp_path / "failures" / "rank_00003.json").exists()


@pytest.mark.slow
def test_hang_times_out_everywhere_with_stacks_labelled_by_coordinates(counting_data, tmp_path):
    started = time.monotonic()
    out, took = _finish(_launch(counting_data, tmp_path, steps=6, timeout_s=8,
                                fault="rank=3,step=3,mode=hang"), started, timeout_s=8)
    assert took < 8 * 2 + MARGIN_S, out[-4000:]
    assert re.search(RANK3 + r" failed on \S+ at step 3: stalled", out), out[-4000:]
    # The ranks waiting on rank 3 timed out in their collectives: only the hung one is blamed.
    assert not re.search(r"rank [012] \(.*failed on \S+ at step 3: stalled", out), out[-4000:]
    assert re.search(r"Timed out|timeout", out), out[-4000:]
    stacks = (tmp_path / "stacks" / "rank_00003.txt").read_text()
    assert stacks.startswith("=== rank 3 (pipeline stage 0, coordinates tp=1 pp=0 dp=1)")
    assert "in before_step" in stacks and "in _fit" in stacks and "no step finished" in stacks
    assert sorted(os.listdir(tmp_path / "stacks")) == [f"rank_0000{r}.txt" for r in range(4)]


# ------------------------------------------------------------ no processes
def test_parse_fault_accepts_the_spec_and_names_bad_input():
    assert parse_fault("rank=3,step=2,mode=kill") == {"rank": 3, "step": 2, "mode": "kill", "phase": None}
    assert parse_fault("step=1,rank=0") == {"rank": 0, "step": 1, "mode": "raise", "phase": None}
    assert parse_fault("rank=2,step=setup") == {"rank": 2, "step": "setup", "mode": "raise", "phase": None}
    assert parse_fault("rank=0,step=4,phase=renamed,mode=kill")["phase"] == "renamed"
    for bad in ("rank=3", "rank=x,step=1", "rank=1,step=1,mode=explode", "rank=1,step=1,color=red",
                "rank=1,step=init", "rank=0,step=4,phase=halfway"):
        with pytest.raises(ValueError, match="MEGALITE_FAULT_INJECT"):
            parse_fault(bad)


def test_classify_separates_causes_from_symptoms():
    assert classify(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1")) == "peer"
    assert classify(RuntimeError("Timed out waiting 10000ms for recv operation to complete")) == "timeout"
    assert classify(InjectedFault("injected fault, timeout")) == "error"
    assert classify(PeerFailure("no progress")) == "stalled"
    assert classify(PeerFailure("waiting on its peers", waiting=True)) == "peer"
    assert classify(ValueError("bad shape")) == "error"


def test_a_thread_blocked_in_comm_wait_is_in_communication_and_one_asleep_is_not():
    release = threading.Event()
    work = SimpleNamespace(wait=release.wait)  # stands in for a pending gloo/NCCL work

    def bucket_wait():  # as the gradient reducer, p2p and ring attention wait on their works
        comm.wait(None, work)

    def hang():
        while not release.is_set():
            time.sleep(0.01)

    threads = [threading.Thread(target=f, daemon=True) for f in (bucket_wait, hang)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    try:  # the first blocks below comm.wait's frame; the second sleeps in `hang`, in its own compute
        assert [_in_communication(t) for t in threads] == [True, False]
    finally:
        release.set()


def _guard(tmp_path, world=4):
    topo = Topology.from_world(world, tp=2)
    groups = SimpleNamespace(rank=0, topology=topo, coords=topo.coords(0))
    return FailureGuard(tmp_path, groups, timeout_s=10, step=lambda: 7)


def _rec(rank, kind, step=7, t=0.0):
    return {"rank": rank, "kind": kind, "step": step, "error": f"E{rank}", "host": "h", "time": t}


def test_report_blames_the_real_error_then_silence_then_the_first_timeout(tmp_path):
    guard = _guard(tmp_path)
    report = guard.report({0: _rec(0, "peer"), 1: _rec(1, "error"), 2: _rec(2, "timeout"), 3: _rec(3, "peer")})
    assert "rank 1 (pipeline stage 0, coordinates tp=1 pp=0 dp=0) failed on h at step 7: error: E1" in report
    assert "rank 2" not in report and "rank 3" not in report
    report = guard.report({0: _rec(0, "peer"), 1: _rec(1, "peer"), 3: _rec(3, "timeout")})
    assert re.search(r"rank 2 \(pipeline stage 0, coordinates tp=0 pp=0 dp=1\) failed: it died without", report)
    report = guard.report({r: _rec(r, "timeout", t=5 - r) for r in range(4)})
    assert "rank 3 (" in report and "rank 0 (" not in report.split("\n", 1)[1]


def test_guard_rejects_a_non_positive_timeout(tmp_path):
    topo = Topology.from_world(1)
    groups = SimpleNamespace(rank=0, topology=topo, coords=topo.coords(0))
    with pytest.raises(ValueError, match="parallel.timeout_s"):
        FailureGuard(tmp_path, groups, timeout_s=0, step=lambda: 0)


def test_a_fault_fires_only_on_its_rank_and_only_when_planned():
    setup = {"MEGALITE_FAULT_INJECT": "rank=2,step=setup,mode=raise"}
    at_step = {"MEGALITE_FAULT_INJECT": "rank=2,step=3,mode=raise"}
    assert fault_from_env(1, setup) is None and fault_from_env(2, {}) is None
    fault_from_env(2, at_step).at_setup()
    fault_from_env(2, setup).before_step(3)
    with pytest.raises(InjectedFault, match="during setup"):
        fault_from_env(2, setup).at_setup()
    fault_from_env(2, at_step).before_step(2)
    with pytest.raises(InjectedFault, match="at step 3"):
        fault_from_env(2, at_step).before_step(3)


def test_a_guard_started_before_the_groups_reports_setup_then_steps(tmp_path, monkeypatch):
    """A guard built from a placement (no process groups yet) records 'setup' until attach()."""
    monkeypatch.setattr("os._exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    topo = Topology.from_world(4, tp=2)
    guard = FailureGuard(tmp_path, placement(topo, 3), timeout_s=10)
    with pytest.raises(SystemExit):
        guard.fail(InjectedFault("boom"))
    rec = guard._read_records()[3]
    assert (rec["phase"], rec["coords"], rec["stage"]) == ("setup", {"tp": 1, "pp": 0, "dp": 1, "cp": 0}, 0)
    report = _guard(tmp_path).report({3: rec})
    assert "job failed during setup" in report
    assert re.search(RANK3 + r" failed on \S+ during setup: error: InjectedFault: boom", report), report
    silent = _guard(tmp_path).report({r: {**_rec(r, "peer", step=0), "phase": "setup"} for r in range(3)})
    assert re.search(RANK3 + r" failed: it died without a record .* during setup", silent), silent
    guard.attach(lambda: 5)
    assert guard._record("error", ValueError("x"))["phase"] == "training"
    assert "at step 5" in _guard(tmp_path).report(guard._read_records())


def test_sigterm_during_setup_is_an_exception_until_attach(tmp_path):
    """torchrun SIGTERMs the other ranks when one dies in setup; they must live to report."""
    before = signal.getsignal(signal.SIGTERM)
    guard = FailureGuard(tmp_path, placement(Topology.from_world(4, tp=2), 1), timeout_s=10)
    guard.start()
    try:
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)
        assert classify(Terminated("x")) == "peer"  # a symptom: the launcher's reaction to another rank
        guard.attach(lambda: 1)
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        guard.stop()
    assert signal.getsignal(signal.SIGTERM) is before
