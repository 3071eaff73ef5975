"""Shared fixtures: the multi-rank spawn helper and GPU skipping.

tests/ is a package mirroring megalite/ (tests.checkpoint.test_io, ...): pytest puts the repository root on
sys.path, and spawned workers inherit it, so they unpickle test functions by their module names; no
directory of tests/ shadows an installed package.
"""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.spawn_pool import Spawner  # noqa: E402


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
    from tests.training_helpers import write_counting_corpus

    return write_counting_corpus(str(tmp_path_factory.mktemp("counting") / "count_text_document"))
