"""bf16 parity: 20 bf16 steps of tp=2 with sequence parallelism, pp=2 (1F1B and interleaved) and ZeRO-1
through DeepSpeed (dp=2) track the one-process bf16 run, which the test computes itself (nothing stored).

Shapes: tests/training_helpers' tiny overrides (h=32, 4 heads, 2 kv heads, seq 32, global batch 8) with
4 layers so pp=2 has 2 chunks per stage; a run takes seconds on two cores.

Tolerances, from measurements (2-core x86 CPU without bf16 instructions, torch 2.13, deepspeed 0.19.8):
max relative deviation of the loss over the 20 steps from the one-process bf16 curve

    pp2_1f1b 0 and pp2_interleaved 0 (bitwise: the stage boundary sends the bf16 activations the
        one-process run has at that point, and each micro-batch's arithmetic is unchanged);
    tp2_sp 6.6e-5 (a matmul over a split inner dim rounds two partial products to bf16 before the
        all-reduce sums them, where one process rounds once; AdamW's division by sqrt(v) turns those
        changed gradients into changed updates that compound over the steps);
    native dp=2 6e-8 (measured once, not a case here: the dp sum is of fp32 gradients);
    zero1_deepspeed 4.3e-4.

bf16 keeps 8 mantissa bits (2**-8 ~ 3.9e-3 relative rounding per value); every layout rounds the same
values in the same dtype except at the points above. NATIVE_RTOL = 5e-4 is ~7x the worst native figure;
errors the parity exists to catch (a micro-batch dropped, a gradient reduced twice or not at all, a
wrong shard) move the curve by 1e-2 or more.

ZeRO-1 through DeepSpeed differs systematically, and gets its own bound, ZERO_RTOL = 2e-3 (~5x its
4.3e-4, still half a bf16 rounding). DeepSpeed's bf16 mode keeps the module's weights in bf16 (fp32
master copies in its optimizer) while the native engine keeps fp32 weights under autocast. The matmuls
see the same bf16 weights either way (step 1 is bitwise equal), but under DeepSpeed each micro-batch's
gradients are bf16, accumulated and all-reduced in bf16, where the native engine accumulates fp32
gradients. That is the 4.3e-4, not the dp=2 reduction order (6e-8 natively). Asking DeepSpeed for fp32
gradient accumulation (data_types.grad_accum_dtype=fp32 in a raw ds_config) does not make it match: it
switches to DeepSpeed's BF16_Optimizer, which tracked worse (3.2e-3) and which megalite's checkpoints do
not read; so the default mode is tested, with its bound stated.

Precision must not be silently ignored: the bf16 curve differs from the fp32 one by 1.1e-4 at worst
(a step's loss is a mean over its 256 tokens, so per-token bf16 rounding largely averages out),
while fp32 runs agree across layouts and machines within ~1e-6 (tests/train/test_golden_curves.py), so
`test_bf16_differs_from_fp32` demands more than FP32_SEPARATION = 1e-5 (checked: it fails with
train.precision=fp32 forced on the reference).
"""
import pytest
import torch.distributed as dist

from megalite.config import load_config
from megalite.train import Trainer, build_groups
from tests.training_helpers import step_metrics, tiny_overrides

STEPS = 20
NATIVE_RTOL, ZERO_RTOL = 5e-4, 2e-3  # measured worst 6.6e-5 (tp2_sp) and 4.3e-4 (ZeRO-1): see above
FP32_SEPARATION = 1e-5  # bf16 vs fp32 measured 1.1e-4; fp32 vs fp32 ~1e-6
BASE = {"model.num_layers": 4, "train.precision": "bf16", "checkpoint.interval": 0}  # 4 layers: pp=2 x 2 chunks
LAYOUTS = {  # name -> (world size, overrides, relative tolerance on the loss curve)
    "tp2_sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}, NATIVE_RTOL),
    "pp2_1f1b": (2, {"parallel.pp": 2}, NATIVE_RTOL),
    "pp2_interleaved": (2, {"parallel.pp": 2, "parallel.virtual_stages": 2, "parallel.schedule": "interleaved"},
                        NATIVE_RTOL),
    "zero1_deepspeed": (2, {"engine.backend": "deepspeed", "engine.zero_stage": 1}, ZERO_RTOL),
}


def _curve(prefix, run_dir, extra) -> list[float] | None:
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, STEPS, **{**BASE, **extra}))
    Trainer(cfg, build_groups(cfg, dist.get_world_size())).fit()
    if dist.get_rank() != 0:
        return None
    losses = step_metrics(run_dir, "loss")
    return [losses[s] for s in range(1, STEPS + 1)]


def _max_rel(got, want) -> float:
    return max(abs(g - w) / abs(w) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def reference(counting_data, tmp_path_factory, spawn):
    """The one-process bf16 curve."""
    return spawn(_curve, 1, counting_data, str(tmp_path_factory.mktemp("bf16_one")), {})[0]


def test_bf16_differs_from_fp32(reference, counting_data, tmp_path, spawn):
    fp32 = spawn(_curve, 1, counting_data, str(tmp_path), {"train.precision": "fp32"})[0]
    assert reference[-1] < reference[0] - 1.0  # the bf16 curve moves, so tracking it means something
    sep = _max_rel(reference, fp32)
    assert sep > FP32_SEPARATION, f"bf16 curve within {sep:.1e} of fp32: is train.precision ignored?"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_layout_tracks_one_process(name, reference, counting_data, tmp_path, spawn):
    world, extra, rtol = LAYOUTS[name]
    got = spawn(_curve, world, counting_data, str(tmp_path), extra)[0]
    dev = _max_rel(got, reference)
    steps = ", ".join(f"{abs(g - w) / w:.1e}" for g, w in zip(got, reference))
    assert dev <= rtol, f"{name}: bf16 loss deviates by {dev:.3e} > {rtol} from one process; per step: {steps}"
