"""MoE training at every layout that exists for it equals the one-process run: 20 fp32 steps of a tiny
MoE model (4 experts, top-2, load-balancing and z-losses on, every layer MoE) at tp=2 with sequence
parallelism (experts replicated, each rank routing its share of the tokens), pp=2, cp=2, and dp=2
with ZeRO-1 through DeepSpeed; the routing statistics (moe_aux_loss, the load entropy) agree too.

Tolerance: rel 5e-6 on loss, grad norm and the aux loss at every step, as the context-parallel
curves (tests/train/test_context_parallel.py): the same routing decisions and the same sums in
another order, a few fp32 ulps (observed below 3e-7); a missing aux-loss gradient, a statistic over
the wrong tokens or expert gradients summed twice move step 2 by far more.

Expert parallelism (parallel.ep) does not exist yet; these are the layouts with replicated experts.
"""
import pytest
import torch.distributed as dist

from megalite.config import load_config
from megalite.train import Trainer, build_groups
from tests.training_helpers import step_metrics, tiny_overrides

STEPS, RTOL = 20, 5e-6
MOE = {"model.moe.num_experts": 4, "model.moe.top_k": 2, "model.moe.z_loss_coeff": 1e-3,
       "model.moe.ffn_hidden_size": 48, "checkpoint.interval": 0}
KEYS = ("loss", "grad_norm", "moe_aux_loss", "moe_load_entropy")
LAYOUTS = {
    "tp2_sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}),
    "pp2": (2, {"parallel.pp": 2}),
    "cp2": (2, {"parallel.cp": 2}),
    "dp2_zero1": (2, {"engine.backend": "deepspeed", "engine.zero_stage": 1}),
}


def _curve(prefix, run_dir, extra: dict) -> dict | None:
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=STEPS, **{**MOE, **extra}))
    trainer = Trainer(cfg, build_groups(cfg, dist.get_world_size() if dist.is_initialized() else 1))
    trainer.fit()
    return step_metrics(run_dir, *KEYS) if trainer.rank == 0 else None


@pytest.fixture(scope="module")
def one_process(counting_data, tmp_path_factory) -> tuple[dict, str]:
    """(curve, run directory) of the one-process run."""
    run_dir = str(tmp_path_factory.mktemp("moe_reference"))
    return _curve(counting_data, run_dir, {}), run_dir


def test_the_reference_routes_and_learns(one_process):
    first, last = one_process[0][1], one_process[0][STEPS]
    assert last[0] < first[0] - 0.5  # the loss falls, so matching the curve means something
    assert 1.0 < first[2] < 1.5 and 0 < last[3] <= 1.3863  # aux ~1 near balance; entropy at most ln 4


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_reproduces_the_one_process_curve(name, counting_data, one_process, tmp_path, spawn):
    world, extra = LAYOUTS[name]
    assert_curve_matches(name, spawn(_curve, world, counting_data, str(tmp_path / name), extra)[0], one_process)


def assert_curve_matches(name: str, got: dict, one_process: tuple[dict, str]) -> None:
    """Every step's KEYS of `got` equal the one-process run's within RTOL."""
    reference = one_process[0]
    assert got.keys() == reference.keys() == set(range(1, STEPS + 1))
    for step, want in reference.items():
        for key, g, w in zip(KEYS, got[step], want):
            assert g == pytest.approx(w, rel=RTOL), f"{name} step {step} {key}"
