"""The overlapped data-parallel reduction (gradients.OverlappedAllReduce) against the blocking one.

Two engines on the same weights and micro-batches, one overlapped and one blocking, must hand the
optimizer bitwise equal gradients: with 2 dp ranks every element is the same sum a + b divided by 2,
whatever bucket it travels in. What only the overlap does is checked through the dp byte counter
(comm.record): nothing during an accumulation micro-batch, every byte during the last backward.
"""

import torch
import torch.distributed as dist
from torch import nn

from megalite.config import ModelConfig, OptimConfig, TrainConfig
from megalite.distributed.comm import take_comm_bytes
from megalite.engine import NativeEngine
from megalite.engine.native import accumulation_steps

OPTIM = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, weight_decay=0.1, clip_grad=1.0)
ACCUM2 = TrainConfig(micro_batch_size=2, global_batch_size=8)  # 2 micro-batches on each of 2 dp ranks
# elements a bucket. Reversed, the model's tensors are 4.bias 4, 4.weight 32, 2.bias 8 | 2.weight 128 |
# 0.bias 16 | 0.weight 128: four buckets (with the spare Linear's 4 + 16 in front, in the first one)
BUCKET = 100
TIMEOUT_S = 60  # a reduction that waits for a bucket nobody launches fails the test instead of hanging it


class _WithSpare(nn.Sequential):
    """The layers plus a Linear `spare` that forward never uses (registered last: first in reversed order)."""

    def __init__(self, *layers):
        super().__init__(*layers)
        self.spare = nn.Linear(4, 4)

    def forward(self, x):
        for layer in list(self)[:-1]:
            x = layer(x)
        return x


def _model(unused: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4)]
    return _WithSpare(*layers) if unused else nn.Sequential(*layers)


def _micro_batch(step: int, mb: int):
    """This rank's micro-batch mb of global step `step`: x [2, 8], y [2, 4]."""
    g = torch.Generator().manual_seed(1000 * step + 10 * mb + dist.get_rank())
    return torch.randn(2, 8, generator=g), torch.randn(2, 4, generator=g)


def _capture(engine) -> list:
    """Record the gradients the optimizer sees (after reduction and clipping)."""
    seen, step = [], engine.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([None if p.grad is None else p.grad.clone() for p in engine.params])
        return step(*args, **kwargs)

    engine.optimizer.step = recording_step
    return seen


def _dp_bytes() -> int:
    return take_comm_bytes().get("dp_all_reduce", 0)


def _train(overlap: bool, steps: int = 2, micro_batches: int = 2, unused: bool = False, **kw) -> dict:
    """`steps` steps of `micro_batches` backward calls; the grads seen and the dp bytes of each phase."""
    model = _model(unused)
    engine = NativeEngine(model, OPTIM, ACCUM2, 10, dp_group=dist.group.WORLD, bucket_elems=BUCKET,
                          overlap=overlap, **kw)
    seen, phases = _capture(engine), []
    _dp_bytes()
    for step in range(steps):
        for mb in range(micro_batches):
            x, y = _micro_batch(step, mb)
            engine.backward(nn.functional.mse_loss(model(x), y) / micro_batches)
            phases.append(("backward", mb, _dp_bytes()))
        engine.step()
        phases.append(("step", None, _dp_bytes()))
    return {"grads": seen, "params": [p.detach().clone() for p in model.parameters()], "phases": phases}


def _both(**kw) -> tuple[dict, dict]:
    return _train(overlap=True, **kw), _train(overlap=False, **kw)


def _assert_bitwise(got: dict, want: dict) -> None:
    for step, (g_step, w_step) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        for i, (g, w) in enumerate(zip(g_step, w_step, strict=True)):
            assert (g is None) == (w is None), f"step {step} param {i}: a gradient on one side only"
            assert g is None or torch.equal(g, w), f"step {step} param {i}: max|diff| {(g - w).abs().max()}"
    for i, (g, w) in enumerate(zip(got["params"], want["params"], strict=True)):
        assert torch.equal(g, w), f"param {i} after the steps: max|diff| {(g - w).abs().max()}"


def test_overlapped_equals_blocking_with_accumulation_and_communicates_only_in_the_last_backward(spawn):
    for overlapped, blocking in spawn(_both, 2, timeout_s=TIMEOUT_S):
        _assert_bitwise(overlapped, blocking)
        grads = sum(p.numel() for p in _model().parameters()) * 4  # fp32 bytes, once a step
        assert [n for *_, n in blocking["phases"]] == [0, 0, grads] * 2
        # the overlap: nothing while accumulating, every bucket launched inside the last backward
        assert [n for *_, n in overlapped["phases"]] == [0, grads, 0] * 2


def test_a_parameter_without_gradient_neither_hangs_nor_is_sent(spawn):
    for overlapped, blocking in spawn(_both, 2, unused=True, timeout_s=TIMEOUT_S):
        _assert_bitwise(overlapped, blocking)
        assert [sum(g is None for g in step) for step in overlapped["grads"]] == [2, 2]  # spare.weight, .bias
        used = sum(p.numel() for p in _model().parameters()) * 4
        assert sum(n for *_, n in overlapped["phases"]) == sum(n for *_, n in blocking["phases"]) == 2 * used
        first_bucket = (4 + 32 + 8) * 4  # the bytes of the used tensors that share the spare's bucket
        assert [n for *_, n in overlapped["phases"]] == [0, used - first_bucket, first_bucket] * 2  # at the step


def test_fewer_backward_calls_than_expected_reduce_at_the_step(spawn):
    """One backward where the config says two: nothing launches early, the step reduces it all."""
    for overlapped, blocking in spawn(_both, 2, micro_batches=1, timeout_s=TIMEOUT_S):
        _assert_bitwise(overlapped, blocking)
        assert [n for *_, n in overlapped["phases"]] == [n for *_, n in blocking["phases"]]


def _one_backward_too_many() -> str:
    model = _model()
    engine = NativeEngine(model, OPTIM, ACCUM2, 10, dp_group=dist.group.WORLD, micro_batches=1)
    x, y = _micro_batch(0, 0)
    engine.backward(nn.functional.mse_loss(model(x), y))
    try:
        engine.backward(nn.functional.mse_loss(model(x), y))
    except RuntimeError as e:
        return str(e)
    finally:
        engine.zero_grad()
    return "no error"


def test_more_backward_calls_than_expected_fail_naming_the_fix(spawn):
    for message in spawn(_one_backward_too_many, 2, timeout_s=TIMEOUT_S):
        assert "micro_batches=2" in message and "overlap=False" in message, message


# ------------------------------------------------------------------------ tp=2 x dp=2, sequence parallel
LLAMA = ModelConfig(vocab_size=64, pad_vocab_to=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_seq_len=16, norm="layernorm", bias=True)  # row-parallel biases: sequence_parallel grads


def _tp_dp_step(overlap: bool) -> list:
    from megalite.model import Transformer
    from megalite.topology import ProcessGroups, Topology

    groups = ProcessGroups.build(Topology(tp=2, dp=2))
    model = Transformer(LLAMA, groups.tp_group, sequence_parallel=True, seed=3)
    engine = NativeEngine(model, OPTIM, ACCUM2, 10, dp_group=groups.dp_group, model_parallel_group=groups.mp_group,
                          tp_group=groups.tp_group, bucket_elems=2000, overlap=overlap)
    seen, dp_bytes = _capture(engine), []
    _dp_bytes()
    for mb in range(2):
        g = torch.Generator().manual_seed(10 * mb + groups.dp_rank)  # tp ranks of one replica: the same data
        tokens = torch.randint(0, 64, (2, 17), generator=g)  # [b, s + 1]
        engine.backward(model.loss(tokens[:, :-1], tokens[:, 1:]).mean() / 2)
        dp_bytes.append(_dp_bytes())
    engine.step()
    dp_bytes.append(_dp_bytes())
    sequence_parallel = len(engine.gradients.sequence_parallel)
    return seen[0] + [p.detach().clone() for p in model.parameters()], dp_bytes, sequence_parallel


def _tp_dp_both() -> tuple[tuple, tuple]:
    return _tp_dp_step(True), _tp_dp_step(False)


def test_tensor_and_data_parallel_overlapped_equals_blocking(spawn):
    for (overlapped, dp_over, sp), (blocking, dp_block, _) in spawn(_tp_dp_both, 4, timeout_s=120):
        assert sp > 0  # norm gains and row-parallel biases: summed over tp after the dp mean
        assert len(overlapped) == len(blocking)
        for i, (g, w) in enumerate(zip(overlapped, blocking)):
            assert torch.equal(g, w), f"tensor {i}: max|diff| {(g - w).abs().max()}"
        assert dp_over[0] == dp_block[0] == dp_block[1] == 0 and sum(dp_over) == sum(dp_block) > 0
        assert dp_over[1] > 0  # launched in the last backward (the untied model defers nothing)


def test_overlap_is_off_without_data_parallelism():
    assert NativeEngine(_model(), OPTIM, ACCUM2, 10).reducer is None
    assert accumulation_steps(ACCUM2, 2) == 2 and accumulation_steps(ACCUM2, 8) == 1
