"""Expert parallelism: MoE experts sharded over parallel.ep ranks carved from dp, tokens dispatched by
all-to-all, reproduce the one-process curve of the same MoE model (tests/train/test_moe_parity.py's)
over 20 fp32 steps: ep=2 and ep=4 on dp=4, ep=2 x tp=2 (experts replicated over tp), ep=2 x pp=2.

Tolerance rel 5e-6 at every step, as the other MoE layouts: the same routing and the same products,
summed in another order. Also ep=2 under DeepSpeed ZeRO-0/1/2 (megalite's ep and edp groups registered
as DeepSpeed's expert groups; ZeRO-3 refused by name). Checkpoints of ep > 1 are read whole (export,
consolidation, ZeRO slices included) and native ones resharded to any ep with their optimizer state.
"""
import pytest
import torch
import torch.distributed as dist

from megalite.checkpoint import CheckpointError, load_checkpoint
from megalite.checkpoint.reader import CheckpointReader
from megalite.checkpoint.reshard import reshard
from megalite.checkpoint.resume import check_before_resume, data_order
from megalite.checkpoint.schema import Layout
from megalite.config import load_config
from megalite.train import Trainer, build_groups
from tests.train.test_moe_parity import (
    KEYS,
    RTOL,
    STEPS,
    _curve,
    assert_curve_matches,
    one_process,  # noqa: F401 - the module's reference fixture
)
from tests.training_helpers import step_metrics

LAYOUTS = {
    "ep2_dp4": (4, {"parallel.ep": 2}),
    "ep4_dp4": (4, {"parallel.ep": 4}),
    "ep2_tp2": (4, {"parallel.ep": 2, "parallel.tp": 2}),
    "ep2_pp2": (4, {"parallel.ep": 2, "parallel.pp": 2}),
    # DeepSpeed partitions the experts' optimizer state over their edp group (2 ranks here), the rest over dp=4
    "ep2_zero1": (4, {"parallel.ep": 2, "engine.backend": "deepspeed", "engine.zero_stage": 1}),
    "ep2_zero2": (4, {"parallel.ep": 2, "engine.backend": "deepspeed", "engine.zero_stage": 2}),
    "ep2_zero0": (4, {"parallel.ep": 2, "engine.backend": "deepspeed", "engine.zero_stage": 0}),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_parallel_layout_reproduces_the_one_process_curve(name, counting_data, one_process, tmp_path,  # noqa: F811
                                                                 spawn):
    world, extra = LAYOUTS[name]
    assert_curve_matches(name, spawn(_curve, world, counting_data, str(tmp_path / name), extra)[0], one_process)
    # each rank's file holds its share of the experts; read whole, they are the one-process weights (up to
    # the curves' ulps, which AdamW spreads on ~0 gradients: relative distance of each tensor, < 1e-4)
    mine = CheckpointReader(tmp_path / name / "checkpoints")
    theirs = CheckpointReader(f"{one_process[1]}/checkpoints")
    assert mine.layout.ep == extra["parallel.ep"] and sorted(mine.names()) == sorted(theirs.names())
    for key in theirs.names():
        want = theirs.read(key)
        assert (mine.read(key) - want).norm() / want.norm() < 1e-4, (name, key)


def _resume(ckpt: str, run_dir: str) -> dict | None:
    """Resume the checkpoint root `ckpt` (a reshard's output) to the planned end; rank 0 returns its curve."""
    cfg = load_config(f"{ckpt}/config.yaml", [f"train.resume={ckpt}", f"train.run_dir={run_dir}",
                                              "checkpoint.interval=0"])
    trainer = Trainer(cfg, build_groups(cfg, dist.get_world_size()))
    trainer.fit()
    return step_metrics(run_dir, *KEYS) if trainer.rank == 0 else None


def test_an_expert_parallel_checkpoint_reshards_to_any_ep_with_its_optimizer_state(counting_data, tmp_path, spawn,
                                                                                   one_process):  # noqa: F811
    spawn(_curve, 4, counting_data, str(tmp_path / "ep2"), {"parallel.ep": 2, "checkpoint.interval": 10})
    saved = tmp_path / "ep2" / "checkpoints" / "step_00000010"
    now = Layout(1, 1, 4)  # the same 4 ranks, dp=4, without expert parallelism
    with pytest.raises(CheckpointError, match=rf"parallel.ep=2 but this run uses parallel.ep=1; .*megalite convert "
                                              rf"reshard {saved} OUT --tp 1 --pp 1 --dp 4"):
        check_before_resume(saved, 0, now, data_order(load_config(str(saved / "config.yaml"))))
    out = reshard(saved, tmp_path / "ep1", tp=1, pp=1, dp=4)
    source, resharded = CheckpointReader(saved), CheckpointReader(out)
    assert (source.layout.ep, resharded.layout.ep) == (2, 1)
    for key in source.names():  # whole experts on every rank now, bit for bit
        assert torch.equal(source.read(key), resharded.read(key)), key
    # AdamW's moments came along: an expert tensor's are its two ep ranks' (ranks 0 and 1) joined
    whole = load_checkpoint(out, 3)["engine"]["optimizer"]["state"]
    halves = [load_checkpoint(saved, rank)["engine"]["optimizer"]["state"] for rank in (0, 1)]
    joined = 0
    for index, state in whole.items():
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = halves[0][index][key], halves[1][index][key]
            want = a if a.shape == state[key].shape else torch.cat((a, b))
            joined += a.shape != state[key].shape
            assert torch.equal(state[key], want), (index, key)
    assert joined == 2 * 2 * 2  # fc1 and fc2 of both layers, two moments each
    # ep=2 -> ep=4 (each rank one expert, its moments along), resumed: the rest of the one-process curve
    four = reshard(saved, tmp_path / "ep4", tp=1, pp=1, dp=4, ep=4)
    assert load_checkpoint(four, 3)["model"]["blocks.1.mlp.fc1"].shape[0] == 1
    for key in source.names():
        assert torch.equal(source.read(key), CheckpointReader(four).read(key)), key
    resumed = spawn(_resume, 4, str(four), str(tmp_path / "resumed"))[0]
    assert sorted(resumed) == list(range(11, STEPS + 1))
    for step in resumed:
        for key, g, w in zip(KEYS, resumed[step], one_process[0][step]):
            assert g == pytest.approx(w, rel=RTOL), f"resumed at ep=4: step {step} {key}"
