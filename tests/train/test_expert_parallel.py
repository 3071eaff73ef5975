"""Expert parallelism: MoE experts sharded over parallel.ep ranks carved from dp, tokens dispatched by
all-to-all, reproduce the one-process curve of the same MoE model (tests/train/test_moe_parity.py's)
over 20 fp32 steps: ep=2 and ep=4 on dp=4, ep=2 x tp=2 (experts replicated over tp), ep=2 x pp=2.

Tolerance rel 5e-6 at every step, as the other MoE layouts: the same routing and the same products,
summed in another order. Native engine only (DeepSpeed's expert groups are not wired: refused by
name). Checkpoints of ep > 1 are read whole (export, consolidation) and resharded to ep = 1; an
offline writer at ep > 1 (import, reshard to ep > 1) is refused by name.
"""
import pytest
import torch

from megalite.checkpoint import CheckpointError, load_checkpoint
from megalite.checkpoint import layout as lay
from megalite.checkpoint.reader import CheckpointReader
from megalite.checkpoint.reshard import reshard
from megalite.checkpoint.resume import check_before_resume, data_order
from megalite.checkpoint.schema import Layout
from megalite.config import load_config
from tests.train.test_moe_parity import (
    _curve,
    assert_curve_matches,
    one_process,  # noqa: F401 - the module's reference fixture
)

LAYOUTS = {
    "ep2_dp4": (4, {"parallel.ep": 2}),
    "ep4_dp4": (4, {"parallel.ep": 4}),
    "ep2_tp2": (4, {"parallel.ep": 2, "parallel.tp": 2}),
    "ep2_pp2": (4, {"parallel.ep": 2, "parallel.pp": 2}),
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


def test_an_expert_parallel_checkpoint_reshards_to_ep1_exactly_and_another_ep_is_refused(counting_data, tmp_path,
                                                                                          spawn):
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
    with pytest.raises(CheckpointError, match="parallel.ep=2: writing an expert-parallel checkpoint offline"):
        lay.layout_of(load_config(str(saved / "config.yaml")), 2)  # what import and reshard lay out with
