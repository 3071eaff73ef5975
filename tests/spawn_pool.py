"""The one helper for multi-rank tests: a pool of gloo worker processes.

Starting a Python process that imports torch costs seconds, so each world size
gets one pool of long-lived workers for the whole test session. Every call
creates a fresh process group on a free port, runs the function on every rank,
tears the group down and returns the per-rank results in rank order. A rank that
raises, or a call that outlives its timeout, fails the test with every rank's
traceback and replaces the pool, so one broken test cannot hang the next.
"""
from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share two cores; oversubscription only slows them
    while True:
        task = tasks.get()
        if task is None:
            # Nothing more is read from this pool, so nothing is left to flush: skip the interpreter's
            # teardown (a spawned process ends through sys.exit, which unloads torch and its threads:
            # seconds per idle worker on two busy cores, paid at the session's end).
            os._exit(0)
        fn, args, kwargs, port, timeout_s = task
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=timeout_s))
            out = ("ok", fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - everything goes back to the test
            out = ("error", traceback.format_exc())
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, out))


class DistributedPool:
    """`world_size` long-lived gloo workers; call `run(fn, *args)` as often as you like."""

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, self.tasks[r], self.results),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout_s: float = 300, **kwargs) -> list:
        """Run fn(*args, **kwargs) on every rank inside a fresh process group."""
        port = free_port()
        for q in self.tasks:
            q.put((fn, args, kwargs, port, timeout_s))
        outs = {}
        try:
            while len(outs) < self.world_size:
                rank, out = self.results.get(timeout=timeout_s + 30)
                outs[rank] = out
        except queue.Empty:
            missing = sorted(set(range(self.world_size)) - set(outs))
            raise TimeoutError(f"ranks {missing} did not finish {fn.__name__} in {timeout_s}s; "
                               f"errors so far: {self._errors(outs)}") from None
        errors = self._errors(outs)
        if errors:
            raise RuntimeError(f"{fn.__name__} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return [outs[r][1] for r in range(self.world_size)]

    @staticmethod
    def _errors(outs: dict) -> list[str]:
        return [f"--- rank {r} ---\n{o[1]}" for r, o in sorted(outs.items()) if o[0] == "error"]

    def stop(self) -> None:
        """Ask every worker to exit (they finish what they run first)."""
        for q in self.tasks:
            q.put(None)

    def reap(self, deadline: float) -> None:
        """Wait for the workers until `deadline` (time.monotonic()), then kill what is left: one grace
        period for the whole pool, not one per worker (idle workers cost seconds each to exit on two
        busy cores, and waiting for them in turn added ~20 s to the end of the session)."""
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()

    def close(self) -> None:
        self.stop()
        self.reap(time.monotonic() + 5)


class Spawner:
    """Keeps one pool per world size; a failed call replaces that pool."""

    def __init__(self):
        self.pools: dict[int, DistributedPool] = {}

    def __call__(self, fn, world_size: int, *args, **kwargs) -> list:
        pool = self.pools.get(world_size) or self.pools.setdefault(world_size, DistributedPool(world_size))
        try:
            return pool.run(fn, *args, **kwargs)
        except BaseException:
            self.pools.pop(world_size).close()
            raise

    def close(self) -> None:
        for pool in self.pools.values():  # all asked at once, then one shared grace period
            pool.stop()
        deadline = time.monotonic() + 5
        for pool in self.pools.values():
            pool.reap(deadline)
        self.pools.clear()
