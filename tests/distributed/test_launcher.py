"""Launcher discovery from plain environment dicts, nodelist expansion, init_distributed."""
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist

from megalite.distributed import LaunchEnv, LaunchError, discover, expand_nodelist, init_distributed, launcher

MASTER = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}


def _slurm(procid=3, ntasks=8, localid=3, **extra):
    env = {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
           "SLURM_LOCALID": str(localid), "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "424242"}
    env.update(extra)
    return env


def test_no_launcher_is_a_single_process():
    assert discover({}) == LaunchEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def test_torchrun():
    env = discover({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                    "TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "1", **MASTER})
    assert env == LaunchEnv(5, 16, 1, 4, "10.0.0.1", 6000, "torchrun")


def test_deepspeed_launcher_uses_local_size():
    env = discover({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "2",
                    "CROSS_RANK": "1", "CROSS_SIZE": "2", **MASTER})
    assert env == LaunchEnv(2, 4, 0, 2, "10.0.0.1", 6000, "deepspeed")


def test_hand_set_variables_assume_one_node():
    env = discover({"RANK": "1", "WORLD_SIZE": "2"})
    assert env == LaunchEnv(1, 2, 1, 2, "127.0.0.1", 29500, "env")


def test_slurm():
    env = discover(_slurm())
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 3, 4)
    assert env.master_addr == "gpu07" and env.launcher == "slurm"
    assert 1024 < env.master_port < 65536
    assert discover(_slurm(procid=5, localid=1)).master_port == env.master_port  # every task agrees
    assert discover(_slurm(SLURM_JOB_ID="424243")).master_port != env.master_port


def test_slurm_details():
    env = discover(_slurm(procid=9, ntasks=11, localid=1, SLURM_NODEID="2", SLURM_TASKS_PER_NODE="4(x2),3"))
    assert env.local_world_size == 3  # the third node runs 3 tasks
    assert discover(_slurm(SLURM_NTASKS_PER_NODE="4", SLURM_TASKS_PER_NODE="junk")).local_world_size == 4
    assert discover(_slurm(MASTER_PORT="7777")).master_port == 7777
    assert discover(_slurm(SLURM_STEP_NODELIST="gpu[10-11]")).master_addr == "gpu10"
    assert discover(_slurm(MASTER_ADDR="head")).master_addr == "head"


def test_explicit_variables_that_agree_with_slurm_are_fine():
    env = discover(_slurm(RANK="3", WORLD_SIZE="8", LOCAL_RANK="3"))
    assert (env.rank, env.world_size, env.launcher) == (3, 8, "env")


@pytest.mark.parametrize("extra, names", [
    (dict(RANK="1"), ["RANK=1", "SLURM_PROCID=3"]),
    (dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="0"), ["LOCAL_RANK=0", "SLURM_LOCALID=3"]),
])
def test_explicit_variables_that_contradict_slurm_raise(extra, names):
    with pytest.raises(LaunchError) as info:
        discover(_slurm(**extra))
    assert all(n in str(info.value) for n in names)


def test_explicit_contradicting_open_mpi_names_both():
    with pytest.raises(LaunchError, match="RANK=0 contradicts OMPI_COMM_WORLD_RANK=1"):
        discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "RANK": "0"})


def test_torchrun_inside_srun_is_not_a_conflict():
    """srun starts one torchrun per node; SLURM_PROCID is the node's index, not our rank."""
    env = discover(_slurm(procid=1, ntasks=2, localid=0, RANK="9", WORLD_SIZE="16", LOCAL_RANK="1",
                          LOCAL_WORLD_SIZE="8", TORCHELASTIC_RUN_ID="j", **MASTER))
    assert env == LaunchEnv(9, 16, 1, 8, "10.0.0.1", 6000, "torchrun")


def test_deepspeed_launcher_inside_srun_is_not_a_conflict():
    env = discover(_slurm(procid=1, ntasks=2, localid=0, RANK="9", WORLD_SIZE="16", LOCAL_RANK="1",
                          LOCAL_SIZE="8", CROSS_RANK="1", CROSS_SIZE="2", **MASTER))
    assert env == LaunchEnv(9, 16, 1, 8, "10.0.0.1", 6000, "deepspeed")


def test_a_launcher_of_ones_own_inside_srun_sets_rank_world_and_local_rank():
    env = discover(_slurm(procid=1, ntasks=2, localid=0, RANK="9", WORLD_SIZE="16", LOCAL_RANK="1",
                          LOCAL_WORLD_SIZE="8", **MASTER))
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)


@pytest.mark.parametrize("environ, names", [
    # srun started 4 tasks; a stale RANK/WORLD_SIZE=8 must not turn them into half of an 8-rank job.
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "4",
      "RANK": "3", "WORLD_SIZE": "8"}, ["WORLD_SIZE=8", "SLURM_NTASKS=4"]),
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "8", "WORLD_SIZE": "8"},
     ["WORLD_SIZE=8", "SLURM_STEP_NUM_TASKS=4"]),
    # mpirun started 4 ranks; a stale WORLD_SIZE=2 used to make every one of them rank 0.
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "WORLD_SIZE": "2"}, ["WORLD_SIZE=2", "OMPI_COMM_WORLD_SIZE=4"]),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "WORLD_SIZE": "4", "RANK": "1"}, ["WORLD_SIZE=4", "PMI_SIZE=2"]),
])
def test_a_stale_world_size_that_contradicts_the_scheduler_names_both(environ, names):
    with pytest.raises(LaunchError, match="unset WORLD_SIZE") as info:
        discover(environ)
    assert all(n in str(info.value) for n in names), str(info.value)


def test_open_mpi():
    env = discover({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "4", **MASTER})
    assert env == LaunchEnv(6, 8, 2, 4, "10.0.0.1", 6000, "openmpi")


def test_mpirun_inside_a_slurm_allocation_uses_the_mpi_rank():
    env = discover({**_slurm(procid=1, ntasks=2, localid=0), "OMPI_COMM_WORLD_RANK": "5",
                    "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
                    **MASTER})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 8, 1, "openmpi")


def test_mpich_and_intel_mpi():
    env = discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert env == LaunchEnv(1, 2, 1, 2, "127.0.0.1", 29500, "mpich")  # one node: localhost


def test_multi_node_mpi_without_master_asks_mpi(monkeypatch):
    monkeypatch.setattr(launcher, "_mpi_rendezvous", lambda: ("node0", 41000))
    env = discover({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert (env.master_addr, env.master_port, env.rank) == ("node0", 41000, 3)


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is not None, reason="mpi4py is installed")
def test_multi_node_mpi_without_master_or_mpi4py_says_what_to_do():
    with pytest.raises(LaunchError, match="MASTER_ADDR.*mpi4py"):
        discover({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})


# ------------------------------------------------- mpi4py as the last resort
class FakeComm:
    def __init__(self, rank, size, node_rank=None, node_size=None):
        self.rank, self.size, self.node = rank, size, (node_rank, node_size)
        self.freed = False

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, split_type, key):
        assert split_type == FakeMPI.COMM_TYPE_SHARED and key == self.rank
        return FakeComm(*self.node)

    def Free(self):
        self.freed = True


class FakeMPI:
    COMM_TYPE_SHARED = "shared"

    def __init__(self, comm):
        self.COMM_WORLD = comm


MVAPICH = {"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_SIZE": "8"}


def test_an_mpi_launch_we_do_not_know_is_read_through_mpi4py(monkeypatch):
    monkeypatch.setattr(launcher, "_load_mpi", lambda: FakeMPI(FakeComm(5, 8, 1, 4)))
    env = discover({**MVAPICH, **MASTER})
    assert env == LaunchEnv(5, 8, 1, 4, "10.0.0.1", 6000, "mpi4py")
    monkeypatch.setattr(launcher, "_mpi_rendezvous", lambda: ("node0", 41000))
    assert discover(MVAPICH).master_addr == "node0"  # several nodes: rank 0's host, broadcast


def test_mpi4py_on_one_node_uses_localhost(monkeypatch):
    monkeypatch.setattr(launcher, "_load_mpi", lambda: FakeMPI(FakeComm(1, 2, 1, 2)))
    assert discover({"PMIX_RANK": "1"}) == LaunchEnv(1, 2, 1, 2, "127.0.0.1", 29500, "mpi4py")


@pytest.mark.parametrize("environ", [{}, {"HOME": "/root", "I_MPI_ROOT": "/opt/intel"},
                                     {"RANK": "0", "WORLD_SIZE": "1", "PMIX_RANK": "0"}])
def test_mpi4py_is_not_asked_without_a_hint_or_when_variables_suffice(monkeypatch, environ):
    def refuse():
        raise AssertionError("MPI must not be initialised here")
    monkeypatch.setattr(launcher, "_load_mpi", refuse)
    assert discover(environ).world_size == 1


def test_mpi4py_reporting_one_process_or_missing_is_a_single_process(monkeypatch):
    monkeypatch.setattr(launcher, "_load_mpi", lambda: FakeMPI(FakeComm(0, 1)))
    assert discover(MVAPICH).launcher == "single"
    monkeypatch.setattr(launcher, "_load_mpi", lambda: None)
    assert discover(MVAPICH).launcher == "single"


# --------------------------------------------------------------- the device
def _local(local_rank, local_world_size):
    return LaunchEnv(rank=local_rank, world_size=8, local_rank=local_rank, local_world_size=local_world_size)


@pytest.mark.parametrize("local_rank, local_world, count, want", [
    (3, 4, 4, 3),   # every rank sees the node's GPUs: the local_rank-th
    (3, 4, 8, 3),
    (0, 1, 8, 0),
    (3, 4, 1, 0),   # srun --gpus-per-task=1 / per-rank CUDA_VISIBLE_DEVICES: the one visible GPU
    (7, 8, 1, 0),
])
def test_device_index(local_rank, local_world, count, want):
    assert launcher.device_index(_local(local_rank, local_world), count, environ={}) == want


@pytest.mark.parametrize("local_rank, count", [(3, 2), (0, 2), (1, 0)])
def test_device_index_names_rank_count_and_visible_devices_when_it_cannot_choose(local_rank, count):
    with pytest.raises(LaunchError) as info:
        launcher.device_index(_local(local_rank, 4), count, environ={"CUDA_VISIBLE_DEVICES": "2,3"})
    message = str(info.value)
    for part in (f"local_rank={local_rank}", f"sees {count} GPU", "CUDA_VISIBLE_DEVICES=2,3", "--gpus-per-task=1"):
        assert part in message, message


@pytest.mark.parametrize("environ, match", [
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "several nodes has no MASTER_ADDR"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' must be an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank=2 of world_size=2"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "master_port=70000"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2(y3)"}, "SLURM_TASKS_PER_NODE"),
])
def test_bad_environments(environ, match):
    with pytest.raises(LaunchError, match=match):
        discover(environ)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07],gpu5", ["node01", "node02", "node03", "node04", "node07", "gpu5"]),
    ("gpu5,node[1-2]", ["gpu5", "node1", "node2"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("c[3]-ib,d-1", ["c3-ib", "d-1"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[01-", "node[4-2]", "node[a-b]", "node]1["])
def test_expand_nodelist_rejects_garbage(bad):
    with pytest.raises(LaunchError, match="nodelist"):
        expand_nodelist(bad)


def test_init_distributed_is_a_no_op_for_one_process():
    assert init_distributed(LaunchEnv()) is False
    assert not dist.is_initialized()


def _reinit_through_init_distributed(port, backend):
    """Inside a spawned rank: drop the helper's group and rebuild it the way train_main does."""
    rank = dist.get_rank()
    dist.destroy_process_group()
    env = discover({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    did = init_distributed(env, backend=backend, timeout_s=60)
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return did, t.item(), os.environ["RANK"], dist.get_backend()


def test_init_distributed_builds_a_working_group(spawn):
    from tests.spawn_pool import free_port

    # The default picks nccl on a CUDA machine; this CPU-tensor test asks for gloo there.
    backend = "gloo" if torch.cuda.is_available() else None
    out = spawn(_reinit_through_init_distributed, 2, free_port(), backend)
    assert out == [(True, 3.0, "0", "gloo"), (True, 3.0, "1", "gloo")]
