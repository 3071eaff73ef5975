"""pp x tp x dp on gloo against the single-process run: loss curves, gradients, resume, the CLI.

Tolerance: fp32 throughout. After one step every gradient matches the
unsplit model's to rtol 1e-4 (floor 1e-5 * max|grad|, see GRAD_RTOL);
tensor parallelism and the tied table's two-part sum only reorder float additions. Loss and grad-norm curves
match to rel 2e-4 over 20 steps (fewer for the 8-rank layouts, which are slow
on two shared cores, but always from a run planned for 20 steps, because the
plan fixes the data order and LR schedule): Adam amplifies those last-bit
differences a little per step.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megalite.config import load_config
from megalite.pipeline.partition import partition_blocks
from megalite.tensor_parallel import sharding_of
from megalite.topology import ProcessGroups
from megalite.train import Trainer, build_groups
from tests.tolerance import assert_close
from tests.training_helpers import step_metrics, tiny_overrides

RTOL = 2e-4
# one step's gradients: the same fp32 products summed in another order (micro-batches, tp partial sums,
# the tied table's two parts), a few ulps; rtol 1e-4 is generous, the floor 1e-5 * max|grad| covers
# elements that cancel to ~0 (not an absolute 1e-6, which is most of a small norm weight's gradient);
# a misplaced shard or a missing stage gradient (>= 1e-2 relative) fails
GRAD_RTOL, GRAD_ATOL_FRAC = 1e-4, 1e-5
STEPS = 20
TIED_COPY = {"blocks.5.weight": "blocks.0.word.weight"}  # 4 layers: the head is block 5


def overrides(prefix, run_dir, steps, **extra):
    """4 layers (so pp=4 has one block a stage) with a tied head (the embedding group's job)."""
    return tiny_overrides(prefix, run_dir, steps, **{
        "model.num_layers": 4, "model.tie_embeddings": True, "train.eval_steps": 1,
        "checkpoint.interval": 0, **extra})


def metrics(run_dir) -> dict[int, tuple]:
    return step_metrics(run_dir, "loss", "grad_norm")


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _train(prefix, run_dir, steps, extra, planned=STEPS):
    """Train `steps` of a run planned for `planned` steps (the plan sets the data order and LR schedule)."""
    cfg = load_config("tiny", overrides(prefix, run_dir, planned, **extra))
    trainer = Trainer(cfg, build_groups(cfg, _world()) if dist.is_initialized() else ProcessGroups.single())
    final = trainer.fit(stop_after=steps if steps < planned else None)
    return metrics(run_dir) if trainer.rank == 0 else final.get("valid_loss")


def _grads(prefix, run_dir, extra, with_chunks=False):
    """Every parameter's gradient after one global batch, as (tp_rank, tp_size, partition_dim, grad)
    (with_chunks: and the block-id ranges of this rank's stage)."""
    cfg = load_config("tiny", overrides(prefix, run_dir, 1, **extra))
    groups = build_groups(cfg, _world()) if dist.is_initialized() else ProcessGroups.single()
    trainer = Trainer(cfg, groups)
    it = iter(trainer._loader("train", 0))
    batches = [next(it) for _ in range(trainer.accum)]
    trainer.runner.train_batch(batches)  # one path for every layout: pp=1 is a one-stage pipeline
    trainer.engine.reduce_gradients()
    grads = {n: (groups.tp_rank, groups.tp_size, sharding_of(p).partition_dim, p.grad)
             for n, p in trainer.model.named_parameters()}
    return (grads, trainer.model.chunks) if with_chunks else grads


def shard_of(full: torch.Tensor, tp_rank: int, tp_size: int, dim) -> torch.Tensor:
    """The tp shard of a reference gradient; padded-vocabulary rows (grad 0) added as the layout pads."""
    if dim is None:
        return full
    return full.chunk(tp_size, dim)[tp_rank]


@pytest.fixture(scope="module")
def reference(counting_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    return {"curve": _train(counting_data, run / "train", STEPS, {}),
            "grads": {n: g[3] for n, g in _grads(counting_data, run / "grads", {}).items()}}


LAYOUTS = [  # (ranks, overrides, steps)
    (2, {"parallel.pp": 2}, 20),
    (4, {"parallel.pp": 4}, 20),
    (2, {"parallel.pp": 2, "parallel.virtual_stages": 2, "parallel.schedule": "interleaved"}, 20),
    (4, {"parallel.pp": 2, "parallel.tp": 2}, 20),
    (4, {"parallel.pp": 2, "parallel.dp": 2}, 20),
    (4, {"parallel.pp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True}, 20),
    (8, {"parallel.pp": 4, "parallel.tp": 2}, 20),
    (8, {"parallel.pp": 2, "parallel.tp": 2, "parallel.dp": 2, "parallel.virtual_stages": 2}, 20),
    (8, {"parallel.pp": 4, "parallel.dp": 2}, 20),
    (2, {"parallel.pp": 2, "parallel.partition": "balanced"}, 20),
]


def _id(layout):
    return "-".join(f"{k.split('.')[1]}{v}" for k, v in layout[1].items())


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_gradients_after_one_step_match_single_process(layout, counting_data, reference, tmp_path, spawn):
    ranks, extra, _ = layout
    ref = reference["grads"]
    per_rank = spawn(_grads, ranks, counting_data, str(tmp_path), extra)
    seen = set()
    for rank_grads in per_rank:
        for name, (tp_rank, tp_size, dim, grad) in rank_grads.items():
            name = TIED_COPY.get(name, name)  # the last stage's copy of the tied table: the same gradient
            full = ref[name]
            if dim == 0 and grad.shape[0] * tp_size > full.shape[0]:  # tp pads the vocabulary further
                full = torch.cat([full, full.new_zeros(grad.shape[0] * tp_size - full.shape[0], *full.shape[1:])])
            assert_close(grad, shard_of(full, tp_rank, tp_size, dim), GRAD_RTOL, GRAD_ATOL_FRAC,
                         f"{name} tp rank {tp_rank}")
            seen.add(name)
    assert seen == set(ref)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_loss_curve_matches_single_process(layout, counting_data, reference, tmp_path, spawn):
    ranks, extra, steps = layout
    got = spawn(_train, ranks, counting_data, str(tmp_path), steps, extra)[0]
    ref = reference["curve"]
    assert sorted(got) == list(range(1, steps + 1))
    for step, (loss, norm) in got.items():
        assert loss == pytest.approx(ref[step][0], rel=RTOL), f"step {step}"
        assert norm == pytest.approx(ref[step][1], rel=RTOL), f"step {step}"
    if steps >= 10:
        assert got[steps][0] < got[1][0] - 0.5  # it learns, not just agrees


def _balanced_grads(prefix, run_dir, extra):
    """_grads, plus the block ids each chunk of this rank's stage model holds."""
    return _grads(prefix, run_dir, extra, with_chunks=True)


def test_balanced_partition_with_uneven_layers_matches_single_process(counting_data, tmp_path, spawn):
    """5 layers over pp=4: the Trainer cuts by parameter count (parallel.partition) and still agrees."""
    extra = {"model.num_layers": 5, "parallel.partition": "balanced"}
    ref = {n: g[3] for n, g in _grads(counting_data, tmp_path / "ref", extra).items()}
    per_rank = spawn(_balanced_grads, 4, counting_data, str(tmp_path / "pp"), {**extra, "parallel.pp": 4})
    cfg = load_config("tiny", overrides(counting_data, tmp_path, 1, **extra))
    want = partition_blocks(cfg.model, 4, "balanced")
    assert want != partition_blocks(cfg.model, 4, "uniform")
    assert [chunks for _, chunks in per_rank] == [[r] for r in want]
    seen = set()
    for grads, _ in per_rank:
        for name, (_, _, _, grad) in grads.items():
            name = {"blocks.6.weight": "blocks.0.word.weight"}.get(name, name)  # the tied copy (head: block 6)
            assert_close(grad, ref[name], GRAD_RTOL, GRAD_ATOL_FRAC, name)
            seen.add(name)
    assert seen == set(ref)


def _stop_and_resume(prefix, run_dir, extra):
    cfg = load_config("tiny", overrides(prefix, run_dir, 6, **{"checkpoint.interval": 3, **extra}))
    Trainer(cfg, build_groups(cfg, _world())).fit(stop_after=3)
    Trainer(cfg, build_groups(cfg, _world())).fit()
    return metrics(run_dir) if dist.get_rank() == 0 else None


def test_resume_per_stage_is_exact_and_eval_runs(counting_data, tmp_path, spawn):
    extra = {"parallel.pp": 2, "parallel.virtual_stages": 2, "train.eval_interval": 3}
    straight = spawn(_train, 2, counting_data, str(tmp_path / "straight"), 6, extra, 6)
    resumed = spawn(_stop_and_resume, 2, counting_data, str(tmp_path / "resumed"), extra)[0]
    assert resumed == straight[0]
    assert straight[1] is not None and straight[1] > 0  # valid loss, broadcast to every stage
    with pytest.raises(RuntimeError, match="virtual_stages=2 but this run uses tp=1 pp=2 virtual_stages=1"):
        spawn(_train, 2, counting_data, str(tmp_path / "resumed"), 8, {"parallel.pp": 2}, 8)


def test_torchrun_cli_pp2_tp2(counting_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "megalite", "train", "tiny", "parallel.pp=2", "parallel.tp=2",
           *overrides(counting_data, tmp_path, 4, **{"checkpoint.interval": 2})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(metrics(tmp_path)) == [1, 2, 3, 4]
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in latest.glob("rank_*.safetensors")) == [f"rank_{r:05d}.safetensors" for r in range(4)]


def _bench_measure(kind, p, m, v):
    """tools/bench_pipeline.py's measurement on this gloo world (zero-time stages)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "bench_pipeline.py")
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.measure(kind, p, m, v, 0.0, 0.0, 1)


@pytest.mark.parametrize("kind,p,m,v", [("1f1b", 4, 6, 1), ("interleaved", 2, 4, 2), ("afab", 2, 3, 2)])
def test_measured_stash_peak_equals_the_schedule_bound(kind, p, m, v, spawn):
    row = spawn(_bench_measure, p, kind, p, m, v)[0]
    assert row["peaks"] == row["bounds"]
