"""One run per run directory and per checkpoint root: an exclusive lock taken before anything is written.

    with RunLock([run_dir, checkpoint_dir]):   # rank 0 only; the other ranks learn its verdict
        ...train...

Each directory gets a `.lock` file held with `fcntl.flock(LOCK_EX | LOCK_NB)`; the kernel drops the
lock when its process exits however it exits (kill -9 included), so a stale `.lock` file never
blocks a later run, and a run that holds the lock knows no one else writes there: its cleanup of
unfinished saves (checkpoint.io) cannot touch another run's save in progress. The file says who
holds it (pid, host, start time), and a refused run names them. The lock is re-entrant within one
process (`megalite train` takes it, and the Trainer it builds takes it again), so only another
process is refused. flock works on local filesystems and on NFSv4 and Lustre mounted with flock
support; where it is not supported the error says so.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
_HELD: dict[str, list] = {}  # resolved directory -> [open file descriptor, holders in this process]


class RunLocked(RuntimeError):
    """Another process holds the lock of a run directory or checkpoint root."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "an unknown process"


def _acquire(directory: Path) -> None:
    import fcntl

    key = str(directory.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's name must survive a refusal
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise RunLocked(f"{directory} is in use by another run ({_holder(path)}); wait for it to end, or give "
                            "this run its own train.run_dir (and checkpoint.dir)") from None
        raise RunLocked(f"cannot lock {path} ({e.strerror}): this filesystem does not support flock; put "
                        "train.run_dir and checkpoint.dir on one that does") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
             .encode())
    _HELD[key] = [fd, 1]


def _release(directory: Path) -> None:
    key = str(directory.resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        os.close(held[0])  # closing the descriptor drops the flock; the file stays (it is harmless)


class RunLock:
    """The locks of `directories` (duplicates and nesting are fine), taken in order on enter.

    `acquire` raises RunLocked naming the holder when another process has one of them, having taken
    none; `release` gives back what this object took.
    """

    def __init__(self, directories):
        self.directories = list(dict.fromkeys(Path(d) for d in directories if d is not None))
        self._taken: list[Path] = []

    def acquire(self) -> "RunLock":
        try:
            for directory in self.directories:
                _acquire(directory)
                self._taken.append(directory)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        while self._taken:
            _release(self._taken.pop())

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_for_all_ranks(directories, rank: int, broadcast=None) -> RunLock | None:
    """Rank 0 takes the lock; every rank raises RunLocked when it was refused.

    `broadcast(obj) -> obj` sends rank 0's verdict (None, or the refusal's message) to the other ranks
    (they wait for it); None in a one-process run. Returns rank 0's held lock (None elsewhere).
    """
    lock, verdict = None, None
    if rank == 0:
        try:
            lock = RunLock(directories).acquire()
        except RunLocked as e:
            verdict = str(e)
    if broadcast is not None:
        verdict = broadcast(verdict)
    if verdict is not None:
        raise RunLocked(verdict)
    return lock
