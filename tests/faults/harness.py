"""What the fault tests share: a command run the way an operator runs it, and proof that nothing else changed.

`megalite(...)` runs the command line in this process (no torch import per case) and returns its exit
code and stderr; `megalite_process(...)` runs it as a real process, for faults that end one (kill -9,
a hang that holds a lock). `snapshot(dir)` is every file under a directory with its size and digest,
so a test can assert that a refused command wrote nothing and a failed one touched only what it says.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from megalite.checkpoint import load_checkpoint
from tests.training_helpers import step_metrics, tiny_overrides

STEPS = 6  # checkpoints at steps 2, 4 and 6 (tiny_overrides saves every 2 steps)


def megalite(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of `megalite ARGV` run in this process, as the console script runs it."""
    from megalite.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def megalite_process(*argv, env: dict | None = None, wait: bool = True):
    """`python -m megalite ARGV` as a real process: a CompletedProcess, or the Popen when wait=False."""
    cmd = [sys.executable, "-m", "megalite", *map(str, argv)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def train_args(prefix, run_dir, steps: int = STEPS, **extra) -> list[str]:
    """`megalite train` arguments for the seconds-long tiny run of tests.training_helpers."""
    return ["train", "tiny", *tiny_overrides(prefix, run_dir, steps=steps, **extra)]


def first_line(stderr: str) -> str:
    """The first line megalite itself printed (config notes before it are skipped)."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("megalite: note:")]
    return lines[0] if lines else ""


def snapshot(root) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) of every file under `root` (nothing when it does not exist).

    The run locks (`.lock`) are left out: taking the lock, which names its holder, is the one write a
    run makes before its checks."""
    root = Path(root)
    out = {}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock") if root.exists() else []
    for path in files:
        out[str(path.relative_to(root))] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def losses(run_dir) -> dict[int, float]:
    return step_metrics(run_dir, "loss")


def assert_resumes_exactly(capsys, prefix, run_dir, straight: dict, resume=None) -> None:
    """The run directory's newest good checkpoint (or `resume`) loads and training from it reproduces the
    straight run's losses bit for bit."""
    step_dir = Path(run_dir) / "checkpoints"
    load_checkpoint(resume or step_dir, 0)
    extra = {"train.resume": resume} if resume else {}
    code, err = megalite(capsys, *train_args(prefix, run_dir, **extra))
    assert code == 0, err
    assert losses(run_dir) == straight
