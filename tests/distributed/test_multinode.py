"""Two "nodes" on one machine: torchrun --nnodes 2 --node_rank 0/1 against a localhost
rendezvous trains tp=2 x dp=2 with the same losses as one 4-rank torchrun run."""
import subprocess
import sys

from tests.distributed.launches import assert_same_losses, train_cmd, worker_env
from tests.spawn_pool import free_port
from tests.training_helpers import step_metrics


def test_two_nodes_of_two_ranks_match_one_node_of_four(counting_data, torchrun_tp2_dp2_losses, tmp_path):
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
         *train_cmd(counting_data, tmp_path / "two_nodes")],
        env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, out in zip(nodes, outs):
        assert node.returncode == 0, out[-4000:]
    assert_same_losses(step_metrics(tmp_path / "two_nodes"), torchrun_tp2_dp2_losses, "torchrun --nnodes 2")
