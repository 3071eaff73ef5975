"""`mpirun -np 4 python -m megalite train` (Open MPI) finds its ranks in OMPI_* and trains
tp=2 x dp=2 with the same losses as a 4-rank torchrun run. Skipped without mpirun."""
import json
import shutil
import subprocess
import sys

import pytest

from tests.distributed.launches import assert_same_losses, train_cmd, worker_env
from tests.spawn_pool import free_port
from tests.training_helpers import step_metrics

MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not on PATH (apt-get install openmpi-bin)")


def _mpirun(np: int, *args: str, **env) -> subprocess.CompletedProcess:
    # Open MPI refuses root without the flag, and two cores cannot hold 4 slots without oversubscribing.
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(np),
           *[x for k, v in env.items() for x in ("-x", f"{k}={v}")], sys.executable, *args]
    return subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=240)


DISCOVER = """
import json, sys
from megalite.distributed import discover
from megalite.distributed.launcher import _mpi_rendezvous
env = discover()
with open(f"{sys.argv[1]}/rank{env.rank}.json", "w") as f:  # one file a rank: stdout lines interleave
    json.dump({**env.__dict__, "broadcast": _mpi_rendezvous()}, f)
"""


def test_discover_reads_open_mpi_variables_and_mpi4py_broadcasts_the_rendezvous(tmp_path):
    pytest.importorskip("mpi4py")
    proc = _mpirun(2, "-c", DISCOVER, str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    envs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(e["rank"], e["world_size"], e["local_rank"], e["local_world_size"], e["launcher"]) for e in envs] == \
        [(0, 2, 0, 2, "openmpi"), (1, 2, 1, 2, "openmpi")]
    assert all(e["master_addr"] == "127.0.0.1" for e in envs)  # one node: localhost
    assert envs[0]["broadcast"] == envs[1]["broadcast"]  # every rank gets rank 0's host and port


# An MPI whose variables discover() does not read (MVAPICH, PALS, ...): hide Open MPI's own
# rank variables, leaving only its PMIx ones, and the ranks must come from mpi4py.
DISCOVER_HIDDEN = """
import json, os, sys
for name in [n for n in os.environ if n.startswith("OMPI_COMM_WORLD_")]:
    del os.environ[name]
from megalite.distributed import discover
env = discover()
with open(f"{sys.argv[1]}/rank{env.rank}.json", "w") as f:
    json.dump(env.__dict__, f)
"""


def test_an_mpi_launch_without_known_variables_is_found_through_mpi4py(tmp_path):
    pytest.importorskip("mpi4py")
    proc = _mpirun(3, "-c", DISCOVER_HIDDEN, str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    envs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [(e["rank"], e["world_size"], e["local_rank"], e["local_world_size"], e["launcher"]) for e in envs] == \
        [(r, 3, r, 3, "mpi4py") for r in range(3)]
    assert all(e["master_addr"] == "127.0.0.1" for e in envs)  # one node: localhost


def test_mpirun_four_ranks_match_torchrun(counting_data, torchrun_tp2_dp2_losses, tmp_path):
    proc = _mpirun(4, *train_cmd(counting_data, tmp_path / "mpirun"), MASTER_PORT=free_port())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_losses(step_metrics(tmp_path / "mpirun"), torchrun_tp2_dp2_losses, "mpirun -np 4")
