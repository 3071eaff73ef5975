"""When one rank dies, the whole job ends quickly and says where.

A distributed job hangs forever by default when one rank dies: its peers wait in
a collective that can never complete. Three things prevent that here:

- Collectives carry the timeout from config (`parallel.timeout_s`, handed to
  `init_distributed`), so a wait for a dead peer raises instead of hanging;
  gloo raises at once when a peer's socket closes.
- `FailureGuard.fail` (called on any exception escaping training) writes a
  small record to `<run_dir>/failures/rank_XXXXX.json` (rank, coordinates,
  step, exception) on the shared run directory and ends the process with
  `os._exit(1)`, so no rank lingers in atexit handlers or destructors that
  would wait on the dead peer. Rank 0 first waits briefly for the others'
  records and prints which rank failed, its pipeline stage, coordinates and
  step; a rank killed with SIGKILL leaves no record, and that silence names it.
- A watchdog thread dumps every thread's Python stack (faulthandler) to
  `<run_dir>/stacks/rank_XXXXX.txt`, labelled with the coordinates, when no
  step finished for about a collective timeout, and ends a stalled rank once
  another rank has recorded a failure (a rank stuck outside any collective would
  otherwise never notice).

The guard is entered before the Trainer is built, so that a rank failing during
setup is reported too: it starts with the run directory and the rank's place in
the topology (`placement`, pure arithmetic on the config) and learns the step
counter once the Trainer exists (`attach`); until then records say "setup".

The failure tests break ranks on purpose through megalite.distributed.faults.
"""
from __future__ import annotations

import faulthandler
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

from megalite.distributed import comm
from megalite.distributed.faults import InjectedFault

# Errors that only say a peer went away or a collective waited too long: they are
# consequences, not causes, and rank 0's report looks past them.
_PEER_ERROR = re.compile(r"closed by peer|connection reset|broken pipe|connection refused|"
                         r"socket closed|read error|nccl.*(abort|error)|aborted", re.IGNORECASE)
_TIMEOUT_ERROR = re.compile(r"timed out|timeout", re.IGNORECASE)
# The order rank 0 looks for the cause in: a real error beats silence beats a stall beats a timeout.
_BLAME_ORDER = ("error", "missing", "stalled", "timeout", "peer")


class PeerFailure(RuntimeError):
    """Another rank recorded a failure while this one made no progress: `waiting` in communication
    (a symptom: blocked on the rank that failed) or not (stalled in its own code: a cause)."""

    def __init__(self, message: str, waiting: bool = False):
        super().__init__(message)
        self.waiting = waiting


def _in_communication(thread: threading.Thread) -> bool:
    """Whether `thread` is blocked in communication: a frame of its stack in torch.distributed (the
    blocking collectives) or in `comm.wait`, through which megalite waits on every asynchronous work
    (gradient buckets, p2p, ring attention, overlapped reduce-scatters); comm.wait does nothing but
    wait, so its frame anywhere on the stack means the rank waits on its peers."""
    frame = sys._current_frames().get(thread.ident)
    marker = f"{os.sep}torch{os.sep}distributed{os.sep}"
    while frame is not None:
        if frame.f_code is comm.wait.__code__ or marker in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class Terminated(RuntimeError):
    """SIGTERM during setup: launchers (torchrun, srun) stop every rank once one has died."""


def _raise_terminated(signum, frame):
    raise Terminated(f"stopped by signal {signum} during setup (the launcher stops every rank once one fails)")


def classify(exc: BaseException) -> str:
    """'peer' (a peer vanished), 'timeout' (a collective waited too long), 'stalled' or 'error'."""
    if isinstance(exc, PeerFailure):
        return "peer" if exc.waiting else "stalled"
    if isinstance(exc, Terminated):
        return "peer"
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (RuntimeError, ConnectionError, OSError)) and not isinstance(exc, InjectedFault):
        if _TIMEOUT_ERROR.search(text):
            return "timeout"
        if _PEER_ERROR.search(text):
            return "peer"
    return "error"


class Placement(NamedTuple):
    """What the guard needs of ProcessGroups (which has the same fields) before they exist."""

    rank: int
    topology: object
    coords: object


def placement(topology, rank: int) -> Placement:
    """This rank's place in `topology`: known from the config alone, before any group is built."""
    return Placement(rank, topology, topology.coords(rank))


def describe(rank: int, coords, cp_size: int = 1) -> str:
    """'rank 3 (pipeline stage 0, coordinates tp=1 pp=0 dp=1)'; with context parallelism also cp=."""
    cp = f" cp={coords.cp}" if cp_size > 1 else ""
    return (f"rank {rank} (pipeline stage {coords.pp}, coordinates tp={coords.tp}{cp} pp={coords.pp} "
            f"dp={coords.dp})")


class FailureGuard:
    """Turns any failure of this rank into a record, a report (rank 0) and a fast non-zero exit.

        with FailureGuard(run_dir, placement(topology, rank), timeout_s) as guard:
            trainer = Trainer(...)                # a failure here is reported as "during setup"
            guard.attach(lambda: trainer.step)
            trainer.fit()                         # ... and here with its step

    `groups` is the run's ProcessGroups or a `placement` (rank, topology,
    coordinates); `step` may be given at once instead of through `attach`. Every
    rank must enter the guard together: entering clears the records of an
    earlier attempt in the same run directory and waits at a barrier.
    """

    def __init__(self, run_dir, groups, timeout_s: float, step: Callable[[], int] | None = None,
                 poll_s: float = 1.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive (parallel.timeout_s in the config)")
        self.run_dir, self.groups, self.timeout_s = Path(run_dir), groups, float(timeout_s)
        self.rank, self.world_size = groups.rank, groups.topology.world_size
        self.coords, self.poll_s = groups.coords, poll_s
        self.where = describe(self.rank, self.coords, getattr(groups.topology, "cp", 1))  # this rank, in words
        self.phase, self.step = ("setup", lambda: 0) if step is None else ("training", step)
        self.failures_dir, self.stacks_dir = self.run_dir / "failures", self.run_dir / "stacks"
        # Dump stacks a little before gloo/NCCL raise, while the hang is still in place.
        self.stall_s = max(self.timeout_s * 0.9 - 2 * poll_s, poll_s)
        # Rank 0 waits this long for the other ranks' records before it reports.
        self.grace_s = max(2.0, min(5.0, self.timeout_s / 4))
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread: threading.Thread | None = None
        self._sigterm = None  # the SIGTERM handler replaced during setup

    # ------------------------------------------------------------- lifecycle
    def attach(self, step: Callable[[], int]) -> None:
        """Setup is over: from now on failures and stalls are reported with `step()`."""
        self.step, self.phase = step, "training"
        self._restore_sigterm()

    def __enter__(self) -> "FailureGuard":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)) and self.world_size > 1:
            self.fail(exc)  # never returns
        self.stop()
        return False

    def start(self) -> None:
        """Clear stale records (rank 0), synchronise, and start the watchdog thread."""
        import torch.distributed as dist

        if self.world_size == 1:  # no peers to hang on: nothing to watch
            return
        if self.rank == 0:
            for old in self.failures_dir.glob("rank_*.json"):
                old.unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier()  # nobody may read records before the stale ones are gone
        if self.phase == "setup" and threading.current_thread() is threading.main_thread():
            # torchrun SIGTERMs every rank once one has died; without a handler (the Trainer's
            # own exists only in fit) rank 0 would die before it reports.
            self._sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        self._thread = threading.Thread(target=self._watch, name="megalite-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watchdog (training finished normally)."""
        self._stop.set()
        self._restore_sigterm()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.poll_s + 1)

    def _restore_sigterm(self) -> None:
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    # --------------------------------------------------------------- failure
    def fail(self, exc: BaseException) -> None:
        """Record `exc`, report (rank 0), abort the process groups and exit(1); never returns."""
        if threading.current_thread() is threading.main_thread():
            # torchrun's SIGTERM must not cut the report, also when the watchdog thread writes it:
            # the exception that brought us here restored the default handler on its way out.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not self._lock.acquire(blocking=False):  # the other thread is already failing us
            self._stop.wait()
            os._exit(1)
        try:
            kind = classify(exc)
            record = self._record(kind, exc)
            print(f"megalite: {self.where} {_when(record)}: {kind}: "
                  f"{record['error']}", file=sys.stderr, flush=True)
            if kind == "error":  # the cause: show where it came from
                traceback.print_exception(exc, file=sys.stderr)
            if self.rank == 0:
                print(self.report(self._gather()), file=sys.stderr, flush=True)
            _abort_process_groups()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    def _record(self, kind: str, exc: BaseException) -> dict:
        record = {"rank": self.rank, "coords": self.coords._asdict(), "stage": self.coords.pp,
                  "step": self.step(), "phase": self.phase, "kind": kind,
                  "error": f"{type(exc).__name__}: {exc}".strip()[:2000],
                  "traceback": "".join(traceback.format_exception(exc))[-8000:],
                  "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        try:
            self.failures_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.failures_dir / f".rank_{self.rank:05d}.json.tmp"
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, self.failures_dir / f"rank_{self.rank:05d}.json")  # readers never see half
        except OSError as e:  # a full or read-only disk must not stop the exit
            print(f"megalite: could not write failure record to {self.failures_dir}: {e}", file=sys.stderr)
        return record

    def _read_records(self) -> dict[int, dict]:
        out = {}
        for path in self.failures_dir.glob("rank_*.json"):
            try:
                rec = json.loads(path.read_text())
                out[int(rec["rank"])] = rec
            except (OSError, ValueError, KeyError):
                continue  # being written or foreign: skip
        return out

    def _gather(self) -> dict[int, dict]:
        """Every rank's record, waiting up to grace_s for them to appear."""
        deadline = time.monotonic() + self.grace_s
        records = self._read_records()
        while len(records) < self.world_size and time.monotonic() < deadline:
            time.sleep(0.1)
            records = self._read_records()
        return records

    def report(self, records: dict[int, dict]) -> str:
        """Rank 0's message: which rank failed first (by _BLAME_ORDER), where, and at which step."""
        topo, kinds = self.groups.topology, {}
        for r in range(self.world_size):
            kinds.setdefault(records[r]["kind"] if r in records else "missing", []).append(r)
        kind = next(k for k in _BLAME_ORDER if k in kinds)
        culprits = kinds[kind]
        if kind in ("timeout", "peer"):  # all saw only symptoms: blame the earliest to notice
            culprits = [min(culprits, key=lambda r: records[r]["time"])]
        # The job got as far as its most advanced rank; setup records only when nobody trained.
        latest = max(records.values(), key=lambda rec: (rec.get("phase") != "setup", rec["step"]),
                     default={"step": self.step(), "phase": self.phase})
        lines = [f"megalite: job failed {_when(latest)} ({len(records)} of {self.world_size} ranks left a record "
                 f"in {self.failures_dir})"]
        for r in culprits[:8]:
            where = describe(r, topo.coords(r), getattr(topo, "cp", 1))
            if kind == "missing":
                during = "during setup" if latest.get("phase") == "setup" else f"during step {latest['step']}"
                lines.append(f"megalite: {where} failed: it died without a record (killed, e.g. by the OOM "
                             f"killer or SIGKILL, or crashed hard) {during}")
            else:
                rec = records[r]
                lines.append(f"megalite: {where} failed on {rec['host']} {_when(rec)}: {kind}: {rec['error']}")
        if len(culprits) > 8:
            lines.append(f"megalite: ... and {len(culprits) - 8} more ranks: {culprits[8:]}")
        if self.stacks_dir.exists():
            lines.append(f"megalite: Python stacks of stalled ranks are in {self.stacks_dir}")
        return "\n".join(lines)

    # -------------------------------------------------------------- watchdog
    def _watch(self) -> None:
        last_step, last_change, dumped = self.step(), time.monotonic(), False
        while not self._stop.wait(self.poll_s):
            step, now = self.step(), time.monotonic()
            if step != last_step:
                last_step, last_change, dumped = step, now, False
                continue
            stalled = now - last_change
            if stalled >= self.stall_s and not dumped:
                doing = "setup" if self.phase == "setup" else f"step {step}"
                self.dump_stacks(f"no step finished for {stalled:.1f} s ({doing} in progress)")
                dumped = True
            if stalled >= self.poll_s * 3 and any(r != self.rank for r in self._read_records()):
                waiting = _in_communication(threading.main_thread())
                doing = "waiting on its peers" if waiting else "no progress"
                self.fail(PeerFailure(f"{doing} for {stalled:.1f} s at step {step} and another rank "
                                      f"recorded a failure in {self.failures_dir}", waiting=waiting))

    def dump_stacks(self, reason: str) -> Path | None:
        """Write every thread's Python stack to stacks/rank_XXXXX.txt, headed by rank and coordinates."""
        path = self.stacks_dir / f"rank_{self.rank:05d}.txt"
        try:
            self.stacks_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"=== {self.where} on {socket.gethostname()} pid {os.getpid()} "
                        f"at {time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            print(f"megalite: could not write stacks to {path}: {e}", file=sys.stderr)
            return None
        return path


def _when(record: dict) -> str:
    """'during setup' or 'at step 7'."""
    return "during setup" if record.get("phase") == "setup" else f"at step {record['step']}"


def _abort_process_groups() -> None:
    """Abort NCCL communicators so peers' kernels fail instead of spinning; gloo needs nothing
    (its sockets close when the process exits, which peers see at once)."""
    try:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_backend() == "nccl":
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                abort()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
