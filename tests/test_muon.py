"""Muon (megalite.muon, optim.optimizer=muon): Newton-Schulz orthogonalizes, the AdamW part is torch's AdamW,
a tp-sharded matrix gets exactly the unsharded update, and tp=2 / dp=2 reproduce the one-process curve."""
import math

import pytest
import torch
import torch.distributed as dist

from megalite.config import load_config
from megalite.muon import Muon, newton_schulz, orthogonalized_update
from megalite.train import Trainer, build_groups
from tests.training_helpers import step_metrics, tiny_overrides

MUON = {"optim.optimizer": "muon", "optim.lr": 3e-3}


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_newton_schulz_keeps_the_singular_vectors_and_pulls_the_values_towards_one(shape):
    torch.manual_seed(0)
    u = torch.randn(shape, dtype=torch.float64).float()
    left, _, right = torch.linalg.svd(u.double(), full_matrices=False)
    o = newton_schulz(u).double()
    core = left.t() @ o @ right.t()  # U^T NS(u) V: diagonal when NS keeps the singular vectors
    diagonal = torch.diagonal(core)
    # fp32 iterations: off-diagonal leakage of a few 1e-6 against entries near 1
    assert (core - torch.diag(diagonal)).abs().max() < 1e-4
    assert diagonal.min() > 0.6 and diagonal.max() < 1.25  # the quintic's band (Jordan et al.), not exactly 1


def test_the_adamw_part_is_torch_adamw_and_the_muon_part_the_written_out_update():
    torch.manual_seed(0)
    vector, matrix = torch.randn(9), torch.randn(12, 20)
    mine = [vector.clone().requires_grad_(True), matrix.clone().requires_grad_(True)]
    theirs = vector.clone().requires_grad_(True)
    opt = Muon([{"params": [mine[0]], "weight_decay": 0.1, "muon": False},
                {"params": [mine[1]], "weight_decay": 0.1, "muon": True}], lr=0.01, momentum=0.9)
    adamw = torch.optim.AdamW([theirs], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    want, buf = matrix.clone(), torch.zeros_like(matrix)
    for _ in range(5):
        gv, gm = torch.randn(9), torch.randn(12, 20)
        mine[0].grad, theirs.grad, mine[1].grad = gv.clone(), gv.clone(), gm.clone()
        opt.step()
        adamw.step()
        buf = 0.9 * buf + gm
        want = want * (1 - 0.01 * 0.1) - 0.01 * 0.2 * math.sqrt(20) * newton_schulz(gm + 0.9 * buf)
    # the same fp32 operations in a different grouping: a few ulps
    torch.testing.assert_close(mine[0].detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mine[1].detach(), want, rtol=1e-5, atol=1e-6)


def _sharded_equals_whole(dim: int) -> bool:
    torch.manual_seed(0)
    whole = torch.randn(24, 40)  # the same on both ranks
    mine = whole.chunk(2, dim)[dist.get_rank()]
    return torch.equal(orthogonalized_update(mine, dim, dist.group.WORLD),
                       orthogonalized_update(whole, None).chunk(2, dim)[dist.get_rank()])


@pytest.mark.parametrize("dim", [0, 1])  # column- and row-parallel blocks
def test_a_tp_sharded_matrix_gets_exactly_the_unsharded_update(spawn, dim):
    assert spawn(_sharded_equals_whole, 2, dim) == [True, True]


def _run(prefix, run_dir, extra: dict, stop_after=None):
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=8, **{**MUON, **extra}))
    trainer = Trainer(cfg, build_groups(cfg, dist.get_world_size() if dist.is_initialized() else 1))
    trainer.fit(stop_after=stop_after)
    return step_metrics(run_dir) if trainer.rank == 0 else None


def test_muon_trains_steps_the_blocks_matrices_and_resumes(counting_data, tmp_path):
    cfg = load_config("tiny", tiny_overrides(counting_data, tmp_path / "one_step", steps=1, **MUON))
    trainer = Trainer(cfg, build_groups(cfg, 1))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    muon = [names[id(p)] for g in trainer.engine.optimizer.param_groups if g["muon"] for p in g["params"]]
    assert sorted(muon) == ["blocks.1.attn.proj.weight", "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc1.weight",
                            "blocks.1.mlp.fc2.weight", "blocks.2.attn.proj.weight", "blocks.2.attn.qkv.weight",
                            "blocks.2.mlp.fc1.weight", "blocks.2.mlp.fc2.weight"]  # not the embedding / head
    whole = _run(counting_data, tmp_path / "whole", {})
    assert whole[8] < whole[1] - 0.2
    _run(counting_data, tmp_path / "resumed", {}, stop_after=3)
    resumed = _run(counting_data, tmp_path / "resumed", {})
    for step in whole:  # one process, the state reloaded from exact fp32 files
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6), step


@pytest.mark.parametrize("layout", [{"parallel.tp": 2}, {"parallel.tp": 2, "parallel.sequence_parallel": True}, {}])
def test_muon_layouts_reproduce_the_one_process_curve(counting_data, tmp_path, spawn, layout):
    one = _run(counting_data, tmp_path / "one", {})
    two = spawn(_run, 2, counting_data, str(tmp_path / "two"), layout)[0]
    for step in one:  # gradients summed in another order, NS in fp32 on the same whole matrices
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
