"""The generated DeepSpeed config, raw-JSON merging with conflict reports, and config-time refusals."""
import json

import pytest

from megalite.config import Config, ConfigError, load_config, validate
from megalite.engine.ds_config import DeepSpeedConfigConflict, build_ds_config, generate_ds_config, merge_raw
from megalite.preflight import preflight


def ds_cfg(*overrides):
    return load_config("tiny", ["engine.backend=deepspeed", *overrides])


def test_generated_config_carries_batch_precision_clip_optimizer_and_zero():
    cfg = ds_cfg("engine.zero_stage=2", "train.micro_batch_size=2", "train.global_batch_size=16",
                 "optim.clip_grad=0.5", "optim.beta2=0.99", "engine.zero_bucket_size=1000", "engine.overlap_comm=true")
    ds = generate_ds_config(cfg, dp_size=4)
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (16, 2, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["managed_gradient_accumulation"] is False
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-8,
                                                          "weight_decay": 0.1, "torch_adam": True}}
    zero = ds["zero_optimization"]
    assert (zero["stage"], zero["reduce_bucket_size"], zero["allgather_bucket_size"], zero["overlap_comm"]) == \
        (2, 1000, 1000, True)
    assert "offload_optimizer" not in zero and not ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    assert "scheduler" not in ds  # the LR comes from megalite's LRSchedule, written into the param groups


def test_fp16_loss_scaling_and_bf16():
    cfg = ds_cfg("train.precision=fp16", "train.initial_loss_scale=1024", "train.loss_scale_window=200",
                 "train.min_loss_scale=2")
    fp16 = generate_ds_config(cfg, 1)["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "loss_scale_window": 200,
                    "min_loss_scale": 2.0, "hysteresis": 2}
    with pytest.raises(ValueError, match="initial_loss_scale=1000.0 must be a power of two.*1024"):
        generate_ds_config(ds_cfg("train.precision=fp16", "train.initial_loss_scale=1000"), 1)
    assert generate_ds_config(ds_cfg("train.precision=bf16"), 1)["bf16"] == {"enabled": True}


def test_offload_sections():
    cfg = ds_cfg("engine.zero_stage=3")
    cfg.engine.offload_optimizer = cfg.engine.offload_params = True  # not validated: the dict only
    zero = generate_ds_config(cfg, 2)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in generate_ds_config(cfg, 2)["optimizer"]["params"]  # offload steps with CPU Adam


def test_raw_json_adds_new_keys_and_reports_every_conflict_with_both_values(tmp_path):
    ours = generate_ds_config(ds_cfg("engine.zero_stage=1"), 2)
    merged = merge_raw(ours, {"zero_optimization": {"round_robin_gradients": True, "stage": 1},
                              "gradient_clipping": 1}, "raw.json")
    assert merged["zero_optimization"]["round_robin_gradients"] is True and merged["zero_optimization"]["stage"] == 1
    with pytest.raises(DeepSpeedConfigConflict) as info:
        merge_raw(ours, {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 7,
                         "optimizer": {"params": {"lr": 0.1}}}, "raw.json")
    msg = str(info.value)
    assert "zero_optimization.stage: megalite generates 1 (from engine.zero_stage) but the raw DeepSpeed JSON sets 3" \
        in msg
    assert "train_micro_batch_size_per_gpu: megalite generates 8 (from train.micro_batch_size)" in msg and " 7" in msg
    assert "optimizer.params.lr: megalite generates 0.001" in msg and "0.1" in msg


def test_build_reads_the_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(DeepSpeedConfigConflict, match="stage: megalite generates 1"):
        build_ds_config(ds_cfg("engine.zero_stage=1", f"engine.ds_config={path}"), 2)
    path.write_text(json.dumps({"zero_allow_untested_optimizer": True}))
    assert build_ds_config(ds_cfg("engine.zero_stage=1", f"engine.ds_config={path}"), 2)[
        "zero_allow_untested_optimizer"] is True


def errors(cfg: Config, world_size=4) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size)
    return str(info.value)


def preflight_errors(cfg: Config, world_size=2) -> str:
    """What megalite.preflight adds to the config's own rules: the engine's checks (files aside)."""
    with pytest.raises(ConfigError) as info:
        preflight(cfg, world_size=world_size, data=False)
    return str(info.value)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero2_and_3_with_pipeline_are_refused_with_reason_and_nearest_setting(stage):
    msg = errors(ds_cfg(f"engine.zero_stage={stage}", "parallel.pp=2"))
    assert f"engine.zero_stage={stage} with parallel.pp=2 is refused" in msg
    assert "nearest valid: engine.zero_stage=1, or parallel.pp=1" in msg


def test_zero1_with_pipeline_is_accepted():
    validate(ds_cfg("engine.zero_stage=1", "parallel.pp=2"), world_size=4)


def test_bad_engine_combinations_name_the_fix(tmp_path):
    assert "offload_params=True requires engine.zero_stage=3" in errors(
        ds_cfg("engine.zero_stage=2", "engine.offload_params=true"))
    assert "engine.overlap_comm=True requires engine.backend='deepspeed'" in errors(
        load_config("tiny", ["engine.overlap_comm=true"]))
    missing = ds_cfg("engine.zero_stage=1", f"engine.ds_config={tmp_path / 'nope.json'}")
    assert "does not exist" in preflight_errors(missing)
    assert "zero_bucket_size=0 must be > 0" in errors(ds_cfg("engine.zero_bucket_size=0"))


def test_valid_zero_configs_pass():
    for stage in range(4):
        validate(ds_cfg(f"engine.zero_stage={stage}", "parallel.tp=2"), world_size=4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_zero0_with_half_precision_is_refused_before_launch(precision):
    """DeepSpeed runs ZeRO-0 + bf16/fp16 through FP16_UnfusedOptimizer, which used to fail only after the
    process groups existed (checkpointing and clipping need a plain torch optimizer)."""
    msg = errors(ds_cfg("engine.zero_stage=0", f"train.precision={precision}", "train.device=cuda"), 2)
    assert f"engine.zero_stage=0 with train.precision='{precision}' is refused" in msg
    assert "FP16_UnfusedOptimizer" in msg and "nearest valid: engine.zero_stage=1" in msg
    validate(ds_cfg("engine.zero_stage=1", "train.precision=bf16"), world_size=2)


@pytest.mark.parametrize("stage", [0, 1])
def test_overlap_comm_without_partitioned_gradients_is_refused(stage):
    """DeepSpeed asserts on overlap_comm below ZeRO-2 when megalite bounds accumulation with step()."""
    msg = errors(ds_cfg(f"engine.zero_stage={stage}", "engine.overlap_comm=true"), 2)
    assert f"engine.overlap_comm=True with engine.zero_stage={stage} is refused" in msg
    assert "nearest valid: engine.overlap_comm=false, or engine.zero_stage=2" in msg
    for ok in (2, 3):
        validate(ds_cfg(f"engine.zero_stage={ok}", "engine.overlap_comm=true"), world_size=2)


def test_deepspeed_fp16_needs_a_power_of_two_initial_scale_at_config_time():
    msg = errors(ds_cfg("train.precision=fp16", "train.device=cuda", "train.initial_loss_scale=1000"))
    assert "train.initial_loss_scale=1000.0 must be a power of two for the deepspeed engine" in msg and "1024" in msg


@pytest.mark.parametrize("raw, key, fix", [
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer",
     "engine.offload_optimizer=true"),
    ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "zero_optimization.offload_param",
     "engine.offload_params=true"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.1}}}, "scheduler",
     "optim.lr, optim.warmup_steps"),
])
def test_raw_json_setting_keys_megalite_owns_is_a_conflict(raw, key, fix, tmp_path):
    """A raw offload section would skip the CPU Adam check; a raw scheduler would be overwritten every step."""
    ours = generate_ds_config(ds_cfg("engine.zero_stage=2"), 2)
    with pytest.raises(DeepSpeedConfigConflict) as info:
        merge_raw(ours, raw, "raw.json")
    assert f"{key}: the raw DeepSpeed JSON sets" in str(info.value) and f"set {fix}" in str(info.value)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    cfg = ds_cfg("engine.zero_stage=2", f"engine.ds_config={path}")
    assert f"{key}: the raw DeepSpeed JSON sets" in preflight_errors(cfg, 2)  # before launch, world size known
    preflight(cfg, data=False)  # world size unknown: the merge waits for the trainer's preflight(world_size=...)


def test_raw_offload_section_equal_to_the_generated_one_is_accepted():
    cfg = ds_cfg("engine.zero_stage=3")
    cfg.engine.offload_optimizer = cfg.engine.offload_params = True
    ours = generate_ds_config(cfg, 2)
    merged = merge_raw(ours, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "offload_param": {
        "device": "cpu"}}})
    assert merged["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_cpu_adam_is_checked_without_building_and_built_as_an_explicit_step(monkeypatch):
    """DeepSpeed 0.19 installed with DS_BUILD_OPS=0 has no `compatible_ops` table; the op is JIT-built, but only
    by build_cpu_adam (megalite train's explicit step): checking a config never builds anything."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder import CPUAdamBuilder

    from megalite.engine.checks import build_cpu_adam, cpu_adam_problem

    offload = ds_cfg("engine.zero_stage=2", "engine.offload_optimizer=true")
    built = []
    monkeypatch.setattr(CPUAdamBuilder, "load", lambda self, verbose=False: built.append(1))
    assert cpu_adam_problem() is None
    preflight(offload, world_size=2, data=False)
    assert built == []  # validation has no side effects
    build_cpu_adam(log=lambda *a: None)
    assert built == [1]
    monkeypatch.setattr(CPUAdamBuilder, "load", lambda self, verbose=False: 1 / 0)
    with pytest.raises(ConfigError, match="the JIT build failed \\(ZeroDivisionError"):
        build_cpu_adam(log=lambda *a: None)
    monkeypatch.setattr(CPUAdamBuilder, "is_compatible", lambda self, verbose=False: False)
    msg = preflight_errors(offload)
    assert "CPUAdamBuilder reports this machine as incompatible" in msg
    assert "nearest valid: engine.offload_optimizer=false" in msg
