"""DeepSpeed ZeRO 0-3 as megalite's data-parallel engine, against the native engine (CPU, gloo).

Every case trains the tiny counting-corpus model of tests/train/test_train_loop.py
for STEPS steps with the native engine and with DeepSpeed, same seed and data,
and compares the loss and grad-norm curves. Tolerance (fp32): relative loss
difference <= LOSS_RTOL and relative grad-norm difference <= NORM_RTOL. The two engines do
the same arithmetic except for the order of the data-parallel sum
(all-reduce vs ZeRO's reduce-scatter into flat buffers) and of the norm's sum
of squares, so differences stay at fp32 rounding (observed: <= 5e-7).
"""
import json
import os

import pytest
import torch.distributed as dist

pytest.importorskip("deepspeed")

from megalite.config import load_config, validate  # noqa: E402
from megalite.train import Trainer, build_groups  # noqa: E402
from tests.training_helpers import step_metrics as losses  # noqa: E402
from tests.training_helpers import tiny_overrides  # noqa: E402

STEPS = 20
# relative, so another CPU's summation order cannot fail them: observed <= 5e-7 (~1e-7 relative on
# losses of 2-5, 20 AdamW steps included); 1e-5 leaves ~50x, while a wrong reduction (>= 1e-2) fails
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-5


def curve(run_dir) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["loss"], r["grad_norm"]) for r in rows if r.get("loss") is not None]


def _train(prefix, run_dir, extra, stop_after=None, steps=STEPS):
    cfg = validate(load_config("tiny", tiny_overrides(prefix, run_dir, steps=steps, **extra)),
                   world_size=dist.get_world_size())  # as `megalite train` does, before any process group
    Trainer(cfg, build_groups(cfg, dist.get_world_size())).fit(stop_after=stop_after)
    return curve(run_dir) if dist.get_rank() == 0 else None


def assert_same_curve(native, ds, steps=STEPS):
    assert len(native) == len(ds) == steps
    for step, ((ln, gn), (ld, gd)) in enumerate(zip(native, ds), start=1):
        assert abs(ln - ld) <= LOSS_RTOL * abs(ln), f"step {step}: loss native {ln} vs deepspeed {ld}"
        assert abs(gn - gd) <= NORM_RTOL * gn, f"step {step}: grad norm native {gn} vs deepspeed {gd}"
    assert ds[-1][0] < ds[0][0] - 0.2  # it learns: the comparison is not between two flat lines


NO_CKPT = {"checkpoint.interval": 0}


@pytest.fixture(scope="module")
def native_dp2(counting_data, tmp_path_factory, spawn):
    return spawn(_train, 2, counting_data, str(tmp_path_factory.mktemp("native_dp2")), NO_CKPT)[0]


TP2 = {"parallel.tp": 2, "parallel.sequence_parallel": True, **NO_CKPT}


@pytest.fixture(scope="module")
def native_tp2_dp2(counting_data, tmp_path_factory, spawn):
    return spawn(_train, 4, counting_data, str(tmp_path_factory.mktemp("native_tp2")), TP2)[0]


def zero(stage, **extra):
    return {"engine.backend": "deepspeed", "engine.zero_stage": stage, **extra}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_dp2_matches_native(stage, counting_data, native_dp2, tmp_path, spawn):
    ds = spawn(_train, 2, counting_data, str(tmp_path), zero(stage, **NO_CKPT))[0]
    assert_same_curve(native_dp2, ds)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_tp2_dp2_sequence_parallel_matches_native(stage, counting_data, native_tp2_dp2, tmp_path, spawn):
    ds = spawn(_train, 4, counting_data, str(tmp_path), zero(stage, **TP2))[0]
    assert_same_curve(native_tp2_dp2, ds)


PP2 = {"parallel.pp": 2, "model.num_layers": 4, "model.tie_embeddings": True, **NO_CKPT}  # tied: the embedding group
# What ZeRO-1 can get wrong under the scheduler (a stage's gradients not reduced, the tied embedding's counted
# twice) shows from step 1 (the norm) and step 2 (the loss) on, far outside the tolerance (a pipeline-replicated
# embedding counted twice: grad norm 38% off at step 1), so 8 steps prove it as well as 20; on two cores the
# 8-rank case takes ~16 s less
PP_STEPS = 8


@pytest.mark.parametrize("ranks, layout", [(4, PP2), (8, {**PP2, **TP2})], ids=["pp2-dp2", "pp2-tp2-dp2-sp"])
def test_zero1_under_the_pipeline_scheduler_matches_native(ranks, layout, counting_data, tmp_path, spawn):
    """Non-last stages backpropagate outside DeepSpeed's backward; ZeRO-1 reduces only in step(), so it holds."""
    native = spawn(_train, ranks, counting_data, str(tmp_path / "native"), layout, steps=PP_STEPS)[0]
    ds = spawn(_train, ranks, counting_data, str(tmp_path / "zero1"), zero(1, **layout), steps=PP_STEPS)[0]
    assert_same_curve(native, ds, steps=PP_STEPS)


@pytest.mark.cpu_adam
def test_zero2_with_cpu_offload_of_the_optimizer_matches_native(counting_data, native_dp2, tmp_path, spawn):
    """engine.offload_optimizer=true steps with DeepSpeed's CPU Adam, built just in time when DeepSpeed was
    installed without pre-built ops (it used to be refused for a missing import). Its AVX AdamW differs from
    torch's only in rounding (observed: losses equal, grad norms within 1e-7 relative). The JIT build itself
    starts in the background at collection (tests/conftest.py), so it runs late in this file."""
    ds = spawn(_train, 2, counting_data, str(tmp_path), zero(2, **{"engine.offload_optimizer": True, **NO_CKPT}))[0]
    assert_same_curve(native_dp2, ds)


@pytest.mark.parametrize("stage, offload", [(1, False), (3, False), pytest.param(2, True, marks=pytest.mark.cpu_adam)],
                         ids=["zero1", "zero3", "zero2-offload"])
def test_resume_is_exact(stage, offload, counting_data, tmp_path, spawn):
    """Stop after step 4 (checkpoint), resume in fresh engines: steps 5-8 equal an uninterrupted run exactly
    (also with the optimizer state offloaded to DeepSpeed's CPU Adam)."""
    extra = zero(stage, **{"checkpoint.interval": 4, "engine.offload_optimizer": offload})
    straight = spawn(_train, 2, counting_data, str(tmp_path / "straight"), extra, steps=8)[0]
    spawn(_train, 2, counting_data, str(tmp_path / "stopped"), extra, stop_after=4, steps=8)
    spawn(_train, 2, counting_data, str(tmp_path / "stopped"), extra, steps=8)
    resumed = losses(tmp_path / "stopped")
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(1, 9)] == [loss for loss, _ in straight]


def test_deepspeed_launcher_runs_two_ranks_with_zero2(counting_data, tmp_path):
    """`deepspeed --num_gpus 2 --module megalite train ...` (via launch/deepspeed.sh) on the CPU exits 0."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.spawn_pool import free_port

    root = Path(__file__).resolve().parents[2]
    overrides = tiny_overrides(counting_data, tmp_path / "run", steps=2, **{
        "optim.warmup_steps": 1, "train.device": "cpu", "checkpoint.interval": 0,
        "engine.backend": "deepspeed", "engine.zero_stage": 2})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", str(root / "launch" / "deepspeed.sh"), "2", "tiny", *overrides], env=env,
                         cwd=root, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "+ deepspeed --master_port" in out.stdout and "--num_gpus 2 --module megalite train tiny" in out.stdout
    assert sorted(losses(tmp_path / "run")) == [1, 2]
