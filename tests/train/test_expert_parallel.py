"""Expert parallelism: MoE experts sharded over parallel.ep ranks carved from dp, tokens dispatched by
all-to-all, reproduce the one-process curve of the same MoE model (tests/train/test_moe_parity.py's)
over 20 fp32 steps: ep=2 and ep=4 on dp=4, ep=2 x tp=2 (experts replicated over tp), ep=2 x pp=2.

Tolerance rel 5e-6 at every step, as the other MoE layouts: the same routing and the same products,
summed in another order. Native engine only (DeepSpeed's expert groups are not wired: refused by
name), and no checkpoint of ep > 1 is read whole (export and reshard refuse it by name).
"""
import pytest

from megalite.checkpoint import CheckpointError
from megalite.checkpoint.reader import CheckpointReader
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
    with pytest.raises(CheckpointError, match="written with parallel.ep=.*not built yet"):
        CheckpointReader(tmp_path / name / "checkpoints")  # each rank's file holds its experts only
