"""Shared fixtures: the multi-rank spawn helper, GPU skipping and the background build of DeepSpeed's cpu_adam.

tests/ is a package mirroring megalite/ (tests.checkpoint.test_io, ...): pytest puts the repository root on
sys.path, and spawned workers inherit it, so they unpickle test functions by their module names; no
directory of tests/ shadows an installed package.
"""
import os
import signal
import subprocess
import sys

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


# ------------------------------------------------------------ DeepSpeed's cpu_adam, built while other tests run
# DeepSpeed installed with DS_BUILD_OPS=0 (as CI installs it) builds its CPU Adam op just in time the first
# time optimizer offload runs: a g++ build of a minute or two on two cores, into torch's extension cache
# (~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR), which a fresh machine does not have. When a selected
# test is marked `cpu_adam`, the same build (CPUAdamBuilder().load(), what megalite's build_cpu_adam calls)
# starts in a background process at niceness 19 as soon as the tests are collected, so it uses the cycles
# the other tests leave idle. A marked test first waits for it; its own load then finds the cache (or, if
# the background build failed, builds again itself and reports the failure).
_BUILD_CPU_ADAM = ("import os; os.nice(19)\n"
                   "from deepspeed.ops.op_builder import CPUAdamBuilder\n"
                   "CPUAdamBuilder().load(verbose=False)\n")
_cpu_adam_build: subprocess.Popen | None = None


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_adam: runs DeepSpeed's JIT-built cpu_adam op (built in the background "
                                       "from the start of the session; see tests/conftest.py)")


def pytest_collection_finish(session):
    global _cpu_adam_build
    if session.config.option.collectonly or _cpu_adam_build is not None:
        return
    if any(item.get_closest_marker("cpu_adam") for item in session.items):
        # a process group of its own (to be stopped as one), but not a session of its own: Linux's autogroup
        # scheduler would give a new session an equal share of the CPU whatever its niceness
        _cpu_adam_build = subprocess.Popen([sys.executable, "-c", _BUILD_CPU_ADAM], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, preexec_fn=os.setpgrp)


@pytest.fixture(autouse=True)
def _cpu_adam_built(request):
    if _cpu_adam_build is not None and request.node.get_closest_marker("cpu_adam"):
        _cpu_adam_build.wait(timeout=900)


def pytest_sessionfinish(session):
    if _cpu_adam_build is not None and _cpu_adam_build.poll() is None:  # the run ended before a marked test
        os.killpg(_cpu_adam_build.pid, signal.SIGINT)  # KeyboardInterrupt: torch releases its build lock
        try:
            _cpu_adam_build.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(_cpu_adam_build.pid, signal.SIGKILL)
            _cpu_adam_build.wait()
