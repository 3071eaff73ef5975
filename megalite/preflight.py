"""The one pre-flight entry: every check a config must pass before any process group exists.

`megalite train`, `megalite config`, `megalite demo` and the checkpoint converters call
`preflight`; it runs the config's own rules (megalite.config.validate, pure), then the checks
that need the data (megalite.data.checks: index headers, split sizes, the tokenizer) and the
engine (megalite.engine.checks: DeepSpeed, a raw ds_config, the cpu_adam op) and, with
train.compile, the compiler toolchain (megalite.model.compiled: torch.compile on this Python,
Triton on CUDA, a C++ compiler on CPU), and raises one
ConfigError listing every broken rule, each naming the key, the value and the fix.
"""
from __future__ import annotations

from megalite.config import Config, ConfigError, data_parallel_size, validate
from megalite.data.checks import check_data
from megalite.engine.checks import check_engine
from megalite.model.compiled import compile_problem


def preflight(cfg: Config, world_size: int | None = None, data: bool = True, engine: bool = True) -> Config:
    """Raise ConfigError unless `cfg` can run on `world_size` ranks here; returns cfg.

    `data` False skips the files (a checkpoint conversion needs no corpus); `engine` False skips
    the engine and the compiler toolchain (converters write the native engine's state whatever the
    run used, and compile nothing).
    """
    validate(cfg, world_size)
    errors: list[str] = []
    if data:
        check_data(cfg, errors.append)
    if engine:
        check_engine(cfg, data_parallel_size(cfg, world_size), errors.append)
        check_compile(cfg, errors.append)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def check_compile(cfg: Config, err) -> None:
    """With train.compile, report (through `err`) what keeps torch.compile from running on the run's device."""
    if not cfg.train.compile:
        return
    import torch
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    why = compile_problem(device)
    if why:
        err(f"train.compile=True needs {why}; or set train.compile=false")
