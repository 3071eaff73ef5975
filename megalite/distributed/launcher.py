"""Who started us? Rank, world size and rendezvous address from any launcher.

The same `python -m megalite train ...` runs under torchrun, the deepspeed
launcher, `srun`, `mpirun` (Open MPI, MPICH, Intel MPI) or alone. `discover`
reads the environment (a plain dict, so every path is testable without a
cluster) and `init_distributed` turns the result into a process group.

Precedence: explicit torch-style variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) win over a scheduler's. When the
scheduler started every rank itself (no torchrun/deepspeed launcher sits in
between) the two must agree; a mismatch is an error naming both, because it
means a stale or hand-set variable. With no variables we know, an MPI launch
(any MPI, e.g. MVAPICH) is still found through mpi4py, if it is installed.
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
_TORCH_NAMES = {"rank": "RANK", "world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK",
                "local_world_size": "LOCAL_WORLD_SIZE"}


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
    """'torchrun', 'deepspeed', 'env' (hand-set RANK/WORLD_SIZE), 'slurm', 'openmpi', 'mpich', 'mpi4py'
    or 'single'."""

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


def _first(environ: Mapping[str, str], *names: str) -> tuple[int | None, str]:
    """(value, name) of the first of `names` that is set; (None, the first name) when none is."""
    for name in names:
        value = _int(environ, name)
        if value is not None:
            return value, name
    return None, names[0]


def _slurm(environ: Mapping[str, str]) -> tuple[dict, dict]:
    """(values, the variable each value came from) of an srun task."""
    world, world_name = _first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    local_size, local_name = _first(environ, "SLURM_NTASKS_PER_NODE")
    if local_size is None:
        local_name = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if environ.get(n)),
                          "SLURM_TASKS_PER_NODE")
        per_node = environ.get(local_name)
        local_size = _tasks_on_node(per_node, _int(environ, "SLURM_NODEID") or 0) if per_node else 1
    out = {"rank": _int(environ, "SLURM_PROCID"), "world_size": world or 1,
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
    names = {"rank": "SLURM_PROCID", "world_size": world_name, "local_rank": "SLURM_LOCALID",
             "local_world_size": local_name}
    return out, names


def _scheduler(environ: Mapping[str, str]) -> tuple[str, dict, dict] | None:
    """(name, values, the variable behind each value) of the scheduler that started this task, if any.

    MPI variables come first: an mpirun inside a Slurm allocation starts its
    daemons through srun, so our SLURM_PROCID may be a node index, while the
    MPI rank is always ours.
    """
    for name, var_names in _MPI_VARS.items():
        rank, world, local_rank, local_world = var_names
        if rank in environ:
            values = {"rank": _int(environ, rank), "world_size": _int(environ, world) or 1,
                      "local_rank": _int(environ, local_rank) or 0,
                      "local_world_size": _int(environ, local_world) or 1}
            return name, values, dict(zip(_TORCH_NAMES, var_names))
    if "SLURM_PROCID" in environ:
        return ("slurm", *_slurm(environ))
    return None


def _explicit(environ: Mapping[str, str]) -> tuple[str, dict]:
    """torch-style variables set by torchrun, the deepspeed launcher or by hand."""
    if "GROUP_RANK" in environ or any(k.startswith("TORCHELASTIC_") for k in environ):
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


def _launcher_between(explicit_name: str, explicit: dict, sched: dict) -> bool:
    """True when the scheduler started a launcher (one per task) that then started us.

    torchrun and the deepspeed launcher leave their marks (TORCHELASTIC_*, GROUP_RANK;
    CROSS_RANK, LOCAL_SIZE). A launcher of one's own is recognised by a full set of
    RANK, WORLD_SIZE and LOCAL_RANK describing more ranks than the scheduler started.
    Anything else that differs from the scheduler is a stale variable: an error.
    """
    if explicit_name in ("torchrun", "deepspeed"):
        return True
    own = {"rank", "world_size", "local_rank"} <= explicit.keys()
    return own and explicit["world_size"] > sched["world_size"]


def _check_agreement(explicit: dict, sched_name: str, sched: dict, sched_names: dict) -> None:
    """A scheduler that started every rank itself must agree with hand-set variables."""
    for key, env_name in _TORCH_NAMES.items():
        if key in explicit and explicit[key] != sched[key]:
            hint = (" (a launcher of your own between the scheduler and megalite must set RANK, WORLD_SIZE "
                    "and LOCAL_RANK)" if key == "world_size" else "")
            raise LaunchError(f"{env_name}={explicit[key]} contradicts {sched_names[key]}={sched[key]} set by "
                              f"{sched_name}: a stale or hand-set {env_name}; unset {env_name} (the scheduler's "
                              f"value is then used) or fix the launch{hint}")


def discover(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address of this process.

    Reads torchrun/deepspeed variables, then SLURM_*, OMPI_COMM_WORLD_*, PMI_*;
    with none of them, an MPI launch is asked through mpi4py (see `_mpi4py_world`),
    and otherwise this is rank 0 of 1. A multi-node MPI launch without
    MASTER_ADDR asks mpi4py (if installed) for rank 0's hostname and a free port.
    """
    environ = os.environ if environ is None else environ
    explicit_name, explicit = _explicit(environ)
    values: dict = {"launcher": "single"}
    scheduler = _scheduler(environ)
    if scheduler:
        sched_name, sched, sched_names = scheduler
        if _launcher_between(explicit_name, explicit, sched):
            # The scheduler's counts describe the per-task launchers; only its
            # first host is still a sensible rendezvous fallback.
            values.update({k: sched[k] for k in ("master_addr", "master_port") if k in sched})
        else:
            _check_agreement(explicit, sched_name, sched, sched_names)
            values.update(sched, launcher=sched_name)
    if "rank" in explicit or "world_size" in explicit:
        values["launcher"] = explicit_name
        if not scheduler and "local_world_size" not in explicit:
            # Hand-set RANK/WORLD_SIZE without local variables: assume one node.
            values["local_world_size"] = explicit.get("world_size", 1)
            values["local_rank"] = explicit.get("rank", 0)
    elif not scheduler:
        values.update(_mpi4py_world(environ) or {})
    values.update(explicit)
    _fill_rendezvous(values)
    return LaunchEnv(**values)


# Per-process rank variables of MPI launchers we do not read directly (MVAPICH, PMIx,
# Cray PALS, LSF jsrun, ...): only with one of them is mpi4py asked, because
# initialising MPI in a plain `python` run is slow and interferes with fork.
_MPI_HINT = re.compile(r"^(PMIX|PMI|MV2|MPIRUN|PALS|JSM_NAMESPACE|OMPI|MPI)_\w*RANK")


def _load_mpi():
    """mpi4py's MPI module (initialises MPI), or None when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI


def _mpi4py_world(environ: Mapping[str, str]) -> dict | None:
    """The last resort: rank, size, local rank and local size from MPI itself.

    Asked only when a variable hints at an MPI launch; None when mpi4py is missing
    or MPI reports a single process. The local rank comes from splitting the world
    by shared memory (the ranks on this node).
    """
    if not any(_MPI_HINT.match(name) for name in environ):
        return None
    mpi = _load_mpi()
    if mpi is None:
        return None
    world = mpi.COMM_WORLD
    if world.Get_size() == 1:
        return None
    node = world.Split_type(mpi.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        return {"rank": world.Get_rank(), "world_size": world.Get_size(), "local_rank": node.Get_rank(),
                "local_world_size": node.Get_size(), "launcher": "mpi4py"}
    finally:
        node.Free()


def _fill_rendezvous(values: dict) -> None:
    """Multi-node launches need rank 0's address; single-node ones use localhost."""
    world = values.get("world_size", 1)
    if world == 1 or "master_addr" in values or values.get("local_world_size", 1) >= world:
        return
    if values["launcher"] in (*_MPI_VARS, "mpi4py"):
        addr, port = _mpi_rendezvous()
        values["master_addr"] = addr
        values.setdefault("master_port", port)
        return
    raise LaunchError(f"{values['launcher']} launch of {world} ranks over several nodes has no MASTER_ADDR; "
                      "export MASTER_ADDR (rank 0's host) and MASTER_PORT on every node")


def free_port(host: str = "") -> int:
    """A TCP port free on `host` ('' = every interface) now; the rendezvous binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
        info = (socket.gethostname(), free_port())
    return comm.bcast(info, root=0)


def device_index(env: LaunchEnv, device_count: int, environ: Mapping[str, str] | None = None) -> int:
    """The CUDA device this rank uses: its local rank, or 0 when it sees exactly one GPU.

    A launcher that hands each rank its own GPU (`srun --gpus-per-task=1`, or a
    per-rank CUDA_VISIBLE_DEVICES) makes that GPU cuda:0 in every rank; otherwise
    every rank of the node sees all its GPUs and takes the local_rank-th one. Seeing
    fewer GPUs than there are ranks on the node is an error on every rank (not only
    on those past the end), so the whole job stops with the same message.
    """
    if env.local_rank < device_count and device_count >= env.local_world_size:
        return env.local_rank
    if device_count == 1:
        return 0
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES", "<unset>")
    raise LaunchError(f"local_rank={env.local_rank} of {env.local_world_size} ranks on this node, but this rank "
                      f"sees {device_count} GPU(s) (CUDA_VISIBLE_DEVICES={visible}); give every rank one GPU "
                      f"of its own (e.g. srun --gpus-per-task=1) or let it see the whole node, and launch at "
                      f"most as many ranks per node as there are GPUs")


def init_distributed(env: LaunchEnv, backend: str | None = None, timeout_s: float = 600) -> bool:
    """Initialise torch.distributed for `env` when world_size > 1; returns whether it did.

    The backend defaults to nccl when CUDA is present, else gloo; with nccl the
    rank's GPU (`device_index`) is selected first. The torch-style variables are
    exported so that libraries that read them (DeepSpeed) see the same launch.
    """
    import torch
    import torch.distributed as dist

    if env.world_size == 1 or dist.is_initialized():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # NCCL needs each rank on its own GPU before the first collective
        torch.cuda.set_device(device_index(env, torch.cuda.device_count()))
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
