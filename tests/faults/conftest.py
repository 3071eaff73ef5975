"""The fault suite's shared reference: one uninterrupted tiny run whose losses every resumed run must repeat."""
import pytest

from megalite.config import load_config
from megalite.topology import ProcessGroups
from megalite.train import Trainer
from tests.faults.harness import STEPS, losses
from tests.training_helpers import tiny_overrides


@pytest.fixture(scope="session")
def straight(counting_data, tmp_path_factory) -> dict[int, float]:
    """step -> loss of the tiny run trained straight through, never stopped."""
    run_dir = tmp_path_factory.mktemp("straight")
    Trainer(load_config("tiny", tiny_overrides(counting_data, run_dir, steps=STEPS)), ProcessGroups.single()).fit()
    return losses(run_dir)
