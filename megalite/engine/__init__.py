"""Engines: who owns backward, gradient reduction, precision and the optimizer step.

`build_engine` picks the backend named by `cfg.engine.backend`: 'native'
(plain PyTorch, `NativeEngine`) or 'deepspeed' (ZeRO, in
megalite/engine/deepspeed.py, the one module that imports DeepSpeed).
"""
from __future__ import annotations

from torch import nn

from megalite.engine.base import Engine, StepResult
from megalite.engine.loss_scaler import ConstantScaler, DynamicLossScaler, build_scaler
from megalite.engine.native import NativeEngine, accumulation_steps


def build_engine(cfg, model: nn.Module, groups, device_type: str) -> Engine:
    """The engine for a whole-run Config `cfg`.

    `groups` is the ProcessGroups object (only `grad_group` (else `dp_group`), `mp_group` and
    `tp_group` are read here, so any object with those attributes works).
    """
    backend = cfg.engine.backend
    if backend == "native":
        if cfg.engine.zero_stage:
            raise ValueError(f"engine.zero_stage={cfg.engine.zero_stage} needs engine.backend=deepspeed; "
                             "the native engine does not shard optimizer state")
        # cp ranks are gradient replicas like dp ones: the native engine averages over dp x cp, while
        # the micro-batches per step follow dp alone (cp ranks share each micro-batch's samples)
        dp = getattr(groups, "dp_size", None)
        return NativeEngine(model, cfg.optim, cfg.train, cfg.train.steps,
                            dp_group=getattr(groups, "grad_group", groups.dp_group),
                            model_parallel_group=groups.mp_group, device_type=device_type,
                            micro_batches=accumulation_steps(cfg.train, dp) if dp else None,
                            expert_groups=(getattr(groups, "ep_group", None), getattr(groups, "edp_group", None)),
                            tp_group=getattr(groups, "tp_group", None))
    if backend == "deepspeed":
        try:
            from megalite.engine.deepspeed import DeepSpeedEngine
        except ImportError as e:
            raise ImportError(f"engine.backend=deepspeed could not be loaded ({e}); install it with "
                              "`pip install megalite[deepspeed]` or use engine.backend=native") from e
        return DeepSpeedEngine(model, cfg, groups, device_type)
    raise ValueError(f"engine.backend={backend!r} is not one of 'native', 'deepspeed'")


__all__ = ["ConstantScaler", "DynamicLossScaler", "Engine", "NativeEngine", "StepResult",
           "build_engine", "build_scaler"]
