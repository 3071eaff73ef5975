"""The DeepSpeed config JSON, generated from megalite's own Config.

DeepSpeed is configured by a JSON dict; megalite never asks users to keep a
second copy of batch sizes, precision or the optimizer in sync by hand. The
dict is derived from `train`, `optim` and `engine`; an advanced user may name
a raw DeepSpeed JSON in `engine.ds_config`, which is merged on top. A key the
raw JSON sets to a value different from the generated one is a conflict and
is reported (both values, and the megalite field that produced ours) instead
of one side silently winning: fix it on the megalite side, or drop it from
the JSON. Keys megalite does not generate are simply added, except those it
owns while generating nothing (OWNED: offload sections, whose megalite switch
also checks the CPU Adam build, and `scheduler`, which megalite's own schedule
would overwrite every step): setting them is a conflict too.

This module does not import DeepSpeed (it is pure data and testable anywhere).

Choices that keep the DeepSpeed engine numerically equal to the native one:
- `managed_gradient_accumulation: false`: backward only accumulates, `step()`
  is the accumulation boundary, exactly megalite's Engine contract (the
  trainer calls backward once per micro-batch and step once per batch).
- The optimizer is AdamW with torch's implementation (`torch_adam`), over
  megalite's decay/no_decay parameter groups; the learning rate is set on the
  optimizer's param groups every step from megalite's LRSchedule, so no
  DeepSpeed scheduler section is generated.
- Loss scaling parameters come from train.* (initial scale as a power of two).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from megalite.config import Config

# DeepSpeed logs every steps_per_print steps; megalite does its own logging
STEPS_PER_PRINT_NEVER = 2**31 - 1


class DeepSpeedConfigConflict(ValueError):
    """The raw DeepSpeed JSON sets keys that megalite generates, to different values."""


def accumulation_steps(cfg: Config, dp_size: int) -> int:
    """Micro-batches per optimizer step on one dp rank: global / (micro * dp)."""
    t = cfg.train
    per_step = t.micro_batch_size * dp_size
    if per_step <= 0 or t.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size={t.global_batch_size} must be divisible by "
                         f"train.micro_batch_size * dp = {t.micro_batch_size}*{dp_size}")
    return t.global_batch_size // per_step


def _precision(cfg: Config) -> dict:
    t = cfg.train
    if t.precision == "fp16":
        power = math.log2(t.initial_loss_scale)
        if not power.is_integer():
            raise ValueError(f"train.initial_loss_scale={t.initial_loss_scale} must be a power of two for the "
                             f"deepspeed engine (it takes initial_scale_power); use {2 ** round(power):g}")
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": int(power),
                         "loss_scale_window": t.loss_scale_window, "min_loss_scale": t.min_loss_scale,
                         "hysteresis": 2},
                "bf16": {"enabled": False}}
    return {"fp16": {"enabled": False}, "bf16": {"enabled": t.precision == "bf16"}}


def _zero(cfg: Config) -> dict:
    e = cfg.engine
    zero = {"stage": e.zero_stage, "reduce_bucket_size": e.zero_bucket_size,
            "allgather_bucket_size": e.zero_bucket_size, "overlap_comm": e.overlap_comm,
            "contiguous_gradients": True, "reduce_scatter": True}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if e.zero_stage == 3:
        # every parameter is partitioned, however small: the sharding rule stays the one documented (16P/dp)
        zero["stage3_param_persistence_threshold"] = 0
        zero["stage3_prefetch_bucket_size"] = e.zero_bucket_size
    return zero


def _optimizer(cfg: Config) -> dict:
    o = cfg.optim
    params = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay}
    if not cfg.engine.offload_optimizer:
        params["torch_adam"] = True  # torch.optim.AdamW: the native engine's optimizer, no compiled op needed
    return {"type": "AdamW", "params": params}


def generate_ds_config(cfg: Config, dp_size: int) -> dict:
    """The DeepSpeed config dict for Config `cfg` on a grid with `dp_size` data-parallel ranks."""
    t = cfg.train
    # DeepSpeed's "data-parallel" ranks are dp x cp (ProcessGroups hands it that group) and it checks
    # train_batch_size = micro * accumulation * its dp; a cp rank's micro-batch is a share of the same
    # samples, so to DeepSpeed a step holds global_batch_size * cp of them.
    out = {"train_batch_size": t.global_batch_size * cfg.parallel.cp,
           "train_micro_batch_size_per_gpu": t.micro_batch_size,
           "gradient_accumulation_steps": accumulation_steps(cfg, dp_size),
           "managed_gradient_accumulation": False,
           # ZeRO-0 clips in DeepSpeedEngine (DeepSpeed reports no grad norm there); 0 keeps it from clipping twice
           "gradient_clipping": cfg.optim.clip_grad if cfg.engine.zero_stage > 0 else 0.0,
           "optimizer": _optimizer(cfg),
           "zero_optimization": _zero(cfg),
           "steps_per_print": STEPS_PER_PRINT_NEVER, "wall_clock_breakdown": False}
    out.update(_precision(cfg))
    return out


# where a conflicting key comes from, for the error message (longest matching prefix wins)
SOURCES = {
    "train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (train.micro_batch_size * dp)",
    "gradient_clipping": "optim.clip_grad", "optimizer": "optim.*", "fp16": "train.precision / train.*loss_scale*",
    "bf16": "train.precision", "zero_optimization.stage": "engine.zero_stage",
    "zero_optimization.reduce_bucket_size": "engine.zero_bucket_size",
    "zero_optimization.allgather_bucket_size": "engine.zero_bucket_size",
    "zero_optimization.overlap_comm": "engine.overlap_comm",
    "zero_optimization.offload_optimizer": "engine.offload_optimizer",
    "zero_optimization.offload_param": "engine.offload_params",
    "managed_gradient_accumulation": "megalite's Engine contract (step() is the accumulation boundary)",
}


# keys megalite owns even where it generates nothing (the feature is off, or megalite does it itself): a raw
# JSON setting them would bypass a megalite check or be silently overridden, so it is a conflict too
OWNED = {
    "zero_optimization.offload_optimizer": (
        "engine.offload_optimizer=true (megalite then checks that DeepSpeed's CPU Adam op can be built)"),
    "zero_optimization.offload_param": "engine.offload_params=true (with engine.zero_stage=3)",
    "scheduler": ("optim.lr, optim.warmup_steps, optim.decay, optim.decay_steps and optim.min_lr (megalite writes "
                  "its own schedule's rate into the optimizer before every step, which would overwrite DeepSpeed's)"),
}


def _owned_conflicts(ours: dict, raw: dict) -> list[str]:
    """The OWNED keys that `raw` sets while megalite's generated config leaves them out."""
    out = []
    for dotted, fix in OWNED.items():
        *parents, leaf = dotted.split(".")
        here, there = ours, raw
        for key in parents:
            here, there = here.get(key, {}), there.get(key, {})
            if not isinstance(there, dict):
                break
        else:
            if isinstance(here, dict) and leaf in there and leaf not in here:
                out.append(f"{dotted}: the raw DeepSpeed JSON sets {json.dumps(there[leaf])}, but megalite owns "
                           f"this key and generates none with the current config; set {fix} instead")
    return out


def _source(key: str) -> str:
    while key:
        if key in SOURCES:
            return SOURCES[key]
        key = key.rpartition(".")[0]
    return "megalite's generated DeepSpeed config"


def _same(a, b) -> bool:
    """Equal as JSON values (1 == 1.0, but True != 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _merge(ours: dict, raw: dict, prefix: str, conflicts: list[str]) -> dict:
    out = dict(ours)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in ours:
            out[key] = value
        elif isinstance(ours[key], dict) and isinstance(value, dict):
            out[key] = _merge(ours[key], value, f"{dotted}.", conflicts)
        elif not _same(ours[key], value):
            conflicts.append(f"{dotted}: megalite generates {json.dumps(ours[key])} (from {_source(dotted)}) "
                             f"but the raw DeepSpeed JSON sets {json.dumps(value)}")
    return out


def merge_raw(generated: dict, raw: dict, label: str = "engine.ds_config") -> dict:
    """`raw` deep-merged on top of `generated`; DeepSpeedConfigConflict lists every differing key."""
    if not isinstance(raw, dict):
        raise DeepSpeedConfigConflict(f"{label} must hold a JSON object, got {type(raw).__name__}")
    conflicts = _owned_conflicts(generated, raw)
    merged = _merge(generated, raw, "", conflicts)
    if conflicts:
        raise DeepSpeedConfigConflict(
            f"{label} conflicts with the config megalite generates; set the megalite field instead, or drop the "
            "key from the JSON:\n  " + "\n  ".join(conflicts))
    return merged


def load_raw(path) -> dict:
    """The JSON object in file `path` (a clear error when missing or not JSON)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"engine.ds_config={str(p)!r} does not exist; give the path of a DeepSpeed JSON")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"engine.ds_config={str(p)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"engine.ds_config={str(p)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def build_ds_config(cfg: Config, dp_size: int) -> dict:
    """generate_ds_config, with engine.ds_config (when set) merged on top."""
    generated = generate_ds_config(cfg, dp_size)
    if not cfg.engine.ds_config:
        return generated
    return merge_raw(generated, load_raw(cfg.engine.ds_config), f"engine.ds_config={cfg.engine.ds_config!r}")
