"""Pre-flight checks of the engine a config asks for, and the one explicit build step it may need.

`check_engine` runs from megalite.preflight before any process group exists: DeepSpeed must be
installed for engine.backend=deepspeed, a raw engine.ds_config must exist and must not contradict
the config megalite generates (known once the data-parallel size is), and optimizer offload needs
DeepSpeed's cpu_adam op, either pre-built or buildable here. None of it builds anything:
`build_cpu_adam` is the explicit step `megalite train` takes (once, about 30 s, then cached by
torch) before it starts training with offload.
"""
from __future__ import annotations

import importlib.util
import os

from megalite.config import Config, ConfigError
from megalite.engine.ds_config import generate_ds_config, load_raw, merge_raw

OFFLOAD_FIX = ("nearest valid: engine.offload_optimizer=false (optimizer states sharded on the device), or "
               "rebuild DeepSpeed with DS_BUILD_CPU_ADAM=1")


def check_engine(cfg: Config, dp: int | None, err) -> None:
    """Report (through `err`) what keeps the configured engine from running here."""
    e = cfg.engine
    if e.backend != "deepspeed":
        return
    if importlib.util.find_spec("deepspeed") is None:
        err("engine.backend='deepspeed' needs DeepSpeed, which is not installed; `pip install "
            "'megalite[deepspeed]'` (DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed on a CPU machine) "
            "or set engine.backend=native")
        return
    if e.ds_config is not None and not os.path.isfile(e.ds_config):
        err(f"engine.ds_config={e.ds_config!r} does not exist; give the path of a DeepSpeed JSON or null")
    elif e.ds_config is not None and dp:
        _check_raw_ds_config(cfg, dp, err)
    if e.offload_optimizer:
        problem = cpu_adam_problem()
        if problem:
            err(f"engine.offload_optimizer=True needs DeepSpeed's cpu_adam op, but {problem}; {OFFLOAD_FIX}")


def _check_raw_ds_config(cfg: Config, dp: int, err) -> None:
    """engine.ds_config merged on the generated config: conflicts are reported before launch."""
    try:
        generated = generate_ds_config(cfg, dp)
    except ValueError:
        return  # a batch-size or loss-scale error, reported by its own rule
    try:
        merge_raw(generated, load_raw(cfg.engine.ds_config), f"engine.ds_config={cfg.engine.ds_config!r}")
    except ValueError as e:  # DeepSpeedConfigConflict, or a file that is not a JSON object
        err(str(e))


def _cpu_adam_builder():
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import CPUAdamBuilder

    return installed_ops, CPUAdamBuilder()


def cpu_adam_problem() -> str | None:
    """Why DeepSpeed's CPU Adam (needed by optimizer offload) cannot be used here, or None when it can.

    A DeepSpeed installed without pre-built ops (DS_BUILD_OPS=0, the pip default) builds cpu_adam
    just in time with the machine's C++ compiler, so "not pre-built" is not a reason to refuse:
    only an incompatible machine is. Nothing is built here (see build_cpu_adam).
    """
    try:
        installed_ops, builder = _cpu_adam_builder()
    except ImportError as e:
        return f"DeepSpeed's op builders cannot be imported ({e})"
    if installed_ops.get("cpu_adam"):
        return None
    if not builder.is_compatible(verbose=False):
        return "DeepSpeed's CPUAdamBuilder reports this machine as incompatible (is_compatible() is False)"
    return None


def build_cpu_adam(log=print) -> None:
    """Build (or load the cached build of) DeepSpeed's cpu_adam op; ConfigError naming the fix when it fails."""
    installed_ops, builder = _cpu_adam_builder()
    if installed_ops.get("cpu_adam"):
        return
    log("building DeepSpeed's cpu_adam op for engine.offload_optimizer=true (once, about 30 s; cached after)")
    try:
        builder.load(verbose=False)  # the JIT build: needs a C++ compiler, ninja and the torch headers
    except Exception as e:  # noqa: BLE001 - any build failure means offload cannot run
        raise ConfigError(f"engine.offload_optimizer=True needs DeepSpeed's cpu_adam op, but it was not pre-built "
                          f"(DS_BUILD_CPU_ADAM) and the JIT build failed ({type(e).__name__}: {str(e)[:300]}); "
                          f"{OFFLOAD_FIX}") from None
