"""Fixtures of the launcher tests."""
import pytest

from tests.distributed.launches import single_node_losses


@pytest.fixture(scope="session")
def torchrun_tp2_dp2_losses(counting_data, tmp_path_factory):
    """Losses of one 4-rank torchrun run of the tiny tp=2 x dp=2 job: the reference every other launch
    (two torchrun nodes, mpirun) must reproduce; run once per session."""
    return single_node_losses(counting_data, tmp_path_factory.mktemp("torchrun-reference") / "run")
