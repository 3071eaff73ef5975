"""Who started us? Rank, world size and rendezvous address from any launcher.

The same `python -m megalite train ...` runs under torchrun, the deepspeed
launcher, `srun`, `mpirun` (Open MPI, MPICH, Intel MPI) or alone. `discover`
reads the environment (a plain dict, so every path is testable without a
cluster) and `init_distributed` turns the result into a process group.

Precedence: explicit torch-style variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) win over a scheduler's. When the
scheduler started every rank itself (its task count equals WORLD_SIZE and no
torchrun/deepspeed launcher sits in between) the two must agree; a mismatch is
an error naming both, because it means a stale or hand-set variable.
"""
from __future__ import annotations

import os
import re
import socket
import zlib
from dataclasses import dataclass
from datetime import timedelta
from itertools import product
from typing import Mapping

DEFAULT_PORT = 29500

# (rank, world size, local rank, local world size) variable names per scheduler.
_MPI_VARS = {
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


class LaunchError(RuntimeError):
    """The environment describes an impossible or contradictory launch."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher told us."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "single"
    """'torchrun', 'deepspeed', 'env' (hand-set RANK/WORLD_SIZE), 'slurm', 'openmpi', 'mpich' or 'single'."""

    def __post_init__(self):
        if not (0 <= self.rank < self.world_size and 0 <= self.local_rank < self.local_world_size):
            raise LaunchError(f"{self.launcher} launch gives rank={self.rank} of world_size={self.world_size}, "
                              f"local_rank={self.local_rank} of local_world_size={self.local_world_size}; "
                              "each rank must lie in 0..size-1")
        if not 0 < self.master_port < 65536:
            raise LaunchError(f"master_port={self.master_port} is not a TCP port (1..65535)")


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} must be an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist without scontrol: 'node[01-03,07],gpu5' -> node01 node02 node03 node07 gpu5.

    Zero padding is kept ('[08-10]' -> 08 09 10) and several bracket groups in one
    name expand as a product ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2).
    """
    hosts = []
    for item in _split_top_level(nodelist):
        parts = re.split(r"(\[[^\[\]]*\])", item)  # literal, [range], literal, ...
        if not item or any("[" in p[1:] or "]" in p[:-1] or (p[:1] == "[") != (p[-1:] == "]") for p in parts):
            raise LaunchError(f"cannot parse Slurm nodelist {nodelist!r}; expected names like 'node[01-04,07],gpu5'")
        choices = [_expand_brackets(p[1:-1], nodelist) if p.startswith("[") else [p] for p in parts]
        hosts.extend("".join(combo) for combo in product(*choices))
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split on the commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += (ch == "[") - (ch == "]")
        if depth not in (0, 1):
            break
        if ch == "," and depth == 0:
            items.append(nodelist[start:i].strip())
            start = i + 1
    if depth != 0 or not nodelist.strip():
        raise LaunchError(f"cannot parse Slurm nodelist {nodelist!r}; expected names like 'node[01-04,07],gpu5'")
    return items


def _expand_brackets(body: str, nodelist: str) -> list[str]:
    out = []
    for piece in body.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", piece)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise LaunchError(f"cannot parse range {piece!r} in Slurm nodelist {nodelist!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM_TASKS_PER_NODE '4(x2),3' means nodes 0-1 run 4 tasks and node 2 runs 3."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[min(node_id, len(counts) - 1)]


def _slurm(environ: Mapping[str, str]) -> dict:
    world = _int(environ, "SLURM_STEP_NUM_TASKS") or _int(environ, "SLURM_NTASKS") or 1
    local_size = _int(environ, "SLURM_NTASKS_PER_NODE")
    if local_size is None:
        per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
        local_size = _tasks_on_node(per_node, _int(environ, "SLURM_NODEID") or 0) if per_node else 1
    out = {"rank": _int(environ, "SLURM_PROCID"), "world_size": world,
           "local_rank": _int(environ, "SLURM_LOCALID") or 0, "local_world_size": local_size}
    nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                or environ.get("SLURM_NODELIST"))
    if nodelist:
        out["master_addr"] = expand_nodelist(nodelist)[0]
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if job_id:
        # Every task derives the same port from the job id; distinct jobs sharing a
        # node most likely get distinct ports.
        out["master_port"] = 15000 + zlib.crc32(job_id.encode()) % 20000
    return out


def _scheduler(environ: Mapping[str, str]) -> tuple[str, dict] | None:
    """The scheduler's own view of this task, if any started us.

    MPI variables come first: an mpirun inside a Slurm allocation starts its
    daemons through srun, so our SLURM_PROCID may be a node index, while the
    MPI rank is always ours.
    """
    for name, (rank, world, local_rank, local_world) in _MPI_VARS.items():
        if rank in environ:
            return name, {"rank": _int(environ, rank), "world_size": _int(environ, world) or 1,
                          "local_rank": _int(environ, local_rank) or 0,
                          "local_world_size": _int(environ, local_world) or 1}
    if "SLURM_PROCID" in environ:
        return "slurm", _slurm(environ)
    return None


def _explicit(environ: Mapping[str, str]) -> tuple[str, dict]:
    """torch-style variables set by torchrun, the deepspeed launcher or by hand."""
    if "TORCHELASTIC_RUN_ID" in environ:
        name = "torchrun"
    elif "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:
        name = "deepspeed"
    else:
        name = "env"
    local_world = _int(environ, "LOCAL_WORLD_SIZE")
    values = {"rank": _int(environ, "RANK"), "world_size": _int(environ, "WORLD_SIZE"),
              "local_rank": _int(environ, "LOCAL_RANK"),
              "local_world_size": local_world if local_world is not None else _int(environ, "LOCAL_SIZE"),
              "master_addr": environ.get("MASTER_ADDR") or None, "master_port": _int(environ, "MASTER_PORT")}
    return name, {k: v for k, v in values.items() if v is not None}


def _nested(explicit_name: str, explicit: dict, sched: dict) -> bool:
    """True when the scheduler started a launcher (one per node) that then started us."""
    if explicit_name in ("torchrun", "deepspeed"):
        return True
    return "world_size" in explicit and explicit["world_size"] != sched["world_size"]


_TORCH_NAMES = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
                "local_world_size": "LOCAL_WORLD_SIZE"}
_SLURM_NAMES = {"rank": "SLURM_PROCID", "world_size": "SLURM_STEP_NUM_TASKS/SLURM_NTASKS",
                "local_rank": "SLURM_LOCALID", "local_world_size": "SLURM_NTASKS_PER_NODE/SLURM_TASKS_PER_NODE"}


def _check_agreement(explicit: dict, sched_name: str, sched: dict) -> None:
    """A scheduler that started every rank itself must agree with hand-set variables."""
    sched_names = _SLURM_NAMES if sched_name == "slurm" else dict(zip(_TORCH_NAMES, _MPI_VARS[sched_name]))
    for key, env_name in _TORCH_NAMES.items():
        if key in explicit and explicit[key] != sched[key]:
            raise LaunchError(f"{env_name}={explicit[key]} contradicts {sched_names[key]}={sched[key]} set by "
                              f"{sched_name}; unset {env_name} (the scheduler's value is then used) or fix the launch")


def discover(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address of this process.

    Reads torchrun/deepspeed variables, then SLURM_*, OMPI_COMM_WORLD_*, PMI_*;
    with none of them this is rank 0 of 1. A multi-node MPI launch without
    MASTER_ADDR asks mpi4py (if installed) for rank 0's hostname and a free port.
    """
    environ = os.environ if environ is None else environ
    explicit_name, explicit = _explicit(environ)
    values: dict = {"launcher": "single"}
    scheduler = _scheduler(environ)
    if scheduler:
        sched_name, sched = scheduler
        if _nested(explicit_name, explicit, sched):
            # The scheduler's counts describe the per-node launchers; only its
            # first host is still a sensible rendezvous fallback.
            values.update({k: sched[k] for k in ("master_addr", "master_port") if k in sched})
        else:
            _check_agreement(explicit, sched_name, sched)
            values.update(sched, launcher=sched_name)
    if "rank" in explicit or "world_size" in explicit:
        values["launcher"] = explicit_name
        if not scheduler and "local_world_size" not in explicit:
            # Hand-set RANK/WORLD_SIZE without local variables: assume one node.
            values["local_world_size"] = explicit.get("world_size", 1)
            values["local_rank"] = explicit.get("rank", 0)
    values.update(explicit)
    _fill_rendezvous(values)
    return LaunchEnv(**values)


def _fill_rendezvous(values: dict) -> None:
    """Multi-node launches need rank 0's address; single-node ones use localhost."""
    world = values.get("world_size", 1)
    if world == 1 or "master_addr" in values or values.get("local_world_size", 1) >= world:
        return
    if values["launcher"] in _MPI_VARS:
        addr, port = _mpi_rendezvous()
        values["master_addr"] = addr
        values.setdefault("master_port", port)
        return
    raise LaunchError(f"{values['launcher']} launch of {world} ranks over several nodes has no MASTER_ADDR; "
                      "export MASTER_ADDR (rank 0's host) and MASTER_PORT on every node")


def _mpi_rendezvous() -> tuple[str, int]:
    """Rank 0's hostname and a free port on it, broadcast over MPI (needs mpi4py)."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError("MPI launch without MASTER_ADDR: export MASTER_ADDR (the first rank's host) and "
                          "MASTER_PORT via mpirun -x, or pip install mpi4py so rank 0 can broadcast them") from None
    comm = MPI.COMM_WORLD
    info = None
    if comm.Get_rank() == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            info = (socket.gethostname(), s.getsockname()[1])
    return comm.bcast(info, root=0)


def init_distributed(env: LaunchEnv, backend: str | None = None, timeout_s: float = 600) -> bool:
    """Initialise torch.distributed for `env` when world_size > 1; returns whether it did.

    The backend defaults to nccl when CUDA is present, else gloo; with nccl the
    GPU `local_rank` is selected first. The torch-style variables are exported so that
    libraries that read them (DeepSpeed) see the same launch.
    """
    import torch
    import torch.distributed as dist

    if env.world_size == 1 or dist.is_initialized():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # NCCL needs each rank on its own GPU before the first collective
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise LaunchError(f"local_rank={env.local_rank} but this node shows {count} GPU(s); launch at most "
                              f"{count} ranks per node or fix CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(env.local_rank)
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                            timeout=timeout)
    _default_group_timeout(timeout)
    return True


def _default_group_timeout(timeout: timedelta) -> None:
    """Make groups created later without a timeout (dist.new_group) use the run's timeout.

    new_group falls back to torch's 30-minute default, not the world group's
    timeout, so a tp/dp collective waiting on a dead rank would hang for half an
    hour. The fallback is a module global of distributed_c10d; where a torch
    release lacks it nothing changes (pass timeout= to new_group instead).
    """
    from torch.distributed import distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)
