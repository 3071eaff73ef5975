"""Shared fixtures: the multi-rank spawn helper and GPU skipping."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # workers unpickle test functions by module name
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from distributed import Spawner  # noqa: E402


@pytest.fixture(scope="session")
def spawn():
    """spawn(fn, world_size, *args, **kwargs) -> per-rank results; runs fn on gloo ranks.

    fn must be a module-level function (it is pickled to the workers); the
    process group is already initialised when it runs.
    """
    spawner = Spawner()
    yield spawner
    spawner.close()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def counting_data(tmp_path_factory):
    """Prefix of a synthetic counting corpus (see training_helpers) shared by the training tests."""
    from training_helpers import write_counting_corpus

    return write_counting_corpus(str(tmp_path_factory.mktemp("counting") / "count_text_document"))
