"""Tensor (and sequence) parallelism equals one device: logits, loss, gradients, grad norm, loss curves.

Tolerances (fp32 everywhere). One forward/backward: rtol 1e-5 with a floor
of 1e-5 * max|want| (tests/tolerance.py; not an absolute atol, which another
CPU's summation order can exceed on large values and which is most of a small
gradient) on logits, per-token loss, every gathered gradient and the grad norm. The
sharded run does the same arithmetic as tp=1 except that matmuls over a
split inner dim are summed in a different order (partial products + an
all-reduce), which moves results by a few fp32 ulps (measured worst case
5e-7 absolute, on the per-token loss of about 5: one ulp). Training curves: rtol
1e-5 over 20 AdamW steps, because Adam divides by sqrt(v) and so turns
those ulps into relative changes of the update that compound step by step
(measured worst case about 3e-7 relative on loss and grad norm).
"""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from megalite.config import ModelConfig, OptimConfig, TrainConfig, load_config
from megalite.engine import NativeEngine
from megalite.model import Transformer
from megalite.tensor_parallel import sharding_of
from megalite.train import Trainer, build_groups
from tests.tolerance import worst
from tests.training_helpers import VOCAB, step_metrics, tiny_overrides

RTOL, ATOL_FRAC = 1e-5, 1e-5  # a few fp32 ulps of reduction order (see above): >= 20x margin, 1e-2 errors fail
CURVE_RTOL = 1e-5
LLAMA = ModelConfig(vocab_size=VOCAB, pad_vocab_to=16, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                    max_seq_len=32)  # GQA (2 q heads per kv head), rope, swiglu, rmsnorm, untied
GPT2 = replace(LLAMA, num_heads=4, num_kv_heads=None, norm="layernorm", position="learned", activation="gelu",
               tie_embeddings=True, bias=True)  # biases (row-parallel ones are sequence_parallel) and a tied head


# ------------------------------------------------------------ one step, exact parity
def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def _loss_grads_norm(model, tokens, tp_group):
    engine = NativeEngine(model, OptimConfig(clip_grad=0.0), TrainConfig(), 1, tp_group=tp_group,
                          model_parallel_group=tp_group)
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])  # [b, s]
    engine.backward(loss.mean())
    engine.reduce_gradients()  # the sequence-parallel all-reduce under test happens here
    return loss.detach(), engine.clip_gradients()


def _one_step_errors(cfg: ModelConfig, sp: bool) -> list[tuple]:
    """(what, worst() message, within tolerance) for logits, loss, grad norm and every parameter's gradient."""
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(11))  # [b, s + 1]
    ref = Transformer(cfg, seed=3)
    with torch.no_grad():
        ref_logits = ref(tokens[:, :-1])[..., :VOCAB]
    ref_loss, ref_norm = _loss_grads_norm(ref, tokens, None)
    world = dist.group.WORLD
    model = Transformer(cfg, tp_group=world, sequence_parallel=sp, seed=3)
    with torch.no_grad():
        logits = _gather(model(tokens[:, :-1]), -1)[..., :VOCAB]  # [s, b, Vp] -> real vocabulary
    loss, norm = _loss_grads_norm(model, tokens, world)

    def row(what, got, want):  # elementwise |got - want| <= ATOL_FRAC * max|want| + RTOL * |want|
        ratio, message = worst(got, want, RTOL, ATOL_FRAC, what)
        return what, message, ratio <= 1

    rows = [row("logits", logits, ref_logits), row("loss", loss, ref_loss),
            row("grad_norm", torch.tensor(norm), torch.tensor(ref_norm))]
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        dim = sharding_of(p).partition_dim
        grad = p.grad if dim is None else _gather(p.grad, dim)
        rows.append(row(name, grad[:VOCAB], ref_params[name].grad[:VOCAB]))  # padding rows depend on tp
    return rows


def _parity(names, sps):
    return {(name, sp): _one_step_errors({"llama": LLAMA, "gpt2": GPT2}[name], sp)
            for name in names for sp in sps}


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_one_device_logits_loss_grads_and_norm(spawn, tp):
    per_rank = spawn(_parity, tp, ["llama", "gpt2"], [False, True])
    for rank, results in enumerate(per_rank):
        for (name, sp), rows in results.items():
            assert len(rows) > 10
            bad = [(what, err) for what, err, ok in rows if not ok]
            assert not bad, f"tp={tp} rank {rank} {name} sp={sp}: {bad[:5]}"


def _sp_grads_are_partial_before_the_engine_reduces():
    model = Transformer(LLAMA, tp_group=dist.group.WORLD, sequence_parallel=True, seed=3)
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(11))
    model.loss(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    per_rank = _gather(model.blocks[1].norm1.weight.grad.unsqueeze(0), 0)  # [tp, h]
    return bool(torch.equal(per_rank[0], per_rank[1]))


def test_without_the_engine_reduction_sequence_parallel_norm_grads_differ(spawn):
    # guards the parity test above: it passes only because the engine sums these partial grads
    assert spawn(_sp_grads_are_partial_before_the_engine_reduces, 2) == [False, False]


# ------------------------------------------------------------ 20 training steps
def _overrides(prefix, run_dir, steps=20, **extra):
    """4 query and 4 kv heads so tp=4 splits both; micro 4 so tp x dp=2 keeps one micro-batch per rank."""
    return tiny_overrides(prefix, run_dir, steps, **{
        "model.hidden_size": 64, "model.num_kv_heads": 4, "train.micro_batch_size": 4,
        "checkpoint.interval": 0, "train.device": "cpu", **extra})


def _metrics(run_dir) -> dict[int, tuple[float, float]]:
    return step_metrics(run_dir, "loss", "grad_norm")


def _train(prefix, runs):
    """Run each (run_dir, overrides, stop_after) in turn; rank 0 returns each run's metrics."""
    out = []
    for run_dir, extra, stop_after in runs:
        cfg = load_config("tiny", _overrides(prefix, run_dir, **extra))
        Trainer(cfg, build_groups(cfg, dist.get_world_size())).fit(stop_after=stop_after)
        out.append(_metrics(run_dir) if dist.get_rank() == 0 else None)
    return out


def _assert_same_curve(got, want, label):
    assert sorted(got) == sorted(want) == list(range(1, 21)), label
    for step, (loss, norm) in want.items():
        assert got[step][0] == pytest.approx(loss, rel=CURVE_RTOL), (label, step, "loss")
        assert got[step][1] == pytest.approx(norm, rel=CURVE_RTOL), (label, step, "grad_norm")


def test_twenty_steps_match_one_device_for_every_layout(counting_data, tmp_path, spawn):
    one = spawn(_train, 1, counting_data, [(str(tmp_path / "tp1"), {}, None)])[0][0]
    assert one[20][0] < one[1][0] - 1.0  # the curve moves, so agreeing curves mean something
    sp = {"parallel.sequence_parallel": True}
    tp2 = spawn(_train, 2, counting_data, [(str(tmp_path / "tp2"), {"parallel.tp": 2}, None),
                                           (str(tmp_path / "tp2sp"), {"parallel.tp": 2, **sp}, None)])[0]
    tp4 = spawn(_train, 4, counting_data, [(str(tmp_path / "tp4"), {"parallel.tp": 4}, None),
                                           (str(tmp_path / "tp4sp"), {"parallel.tp": 4, **sp}, None),
                                           (str(tmp_path / "tp2dp2"), {"parallel.tp": 2, **sp}, None)])[0]
    for label, curve in zip(["tp2", "tp2+sp", "tp4", "tp4+sp", "tp2xdp2+sp"], tp2 + tp4):
        _assert_same_curve(curve, one, label)


def test_resume_with_the_same_tp_is_exact(counting_data, tmp_path, spawn):
    run = {"parallel.tp": 2, "parallel.sequence_parallel": True, "train.steps": 6, "checkpoint.interval": 3,
           "model.dropout": 0.1}
    straight, _, resumed = spawn(_train, 2, counting_data, [(str(tmp_path / "straight"), run, None),
                                                             (str(tmp_path / "stopped"), run, 4),
                                                             (str(tmp_path / "stopped"), run, None)])[0]
    assert sorted(resumed) == list(range(1, 7))
    assert resumed == straight  # bit-exact: same shards, same reduction order, same data position


# ------------------------------------------------------------ the real launcher
def test_torchrun_two_ranks_tp2_exits_zero(counting_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "megalite", "train", "tiny", "parallel.tp=2", "parallel.sequence_parallel=true",
           *_overrides(counting_data, tmp_path, steps=2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(_metrics(tmp_path)) == [1, 2]
