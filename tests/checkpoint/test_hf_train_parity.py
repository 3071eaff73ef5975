"""A transformers Qwen3 or Qwen2 model imported at tp=2 x pp=2 trains its first steps as the same import at one process.

Qwen3 carries the features the Llama path lacks: per-head q/k RMSNorm (gains shared by a rank's
heads, their gradients summed over tp), head_dim != hidden / heads and GQA. Both runs resume
the import (step 0, fresh optimizer) with the same data, plan and seed; only the layout differs.

Tolerance: fp32, loss and grad norm per step to rel 1e-5, as tests/checkpoint/test_reshard's tp x pp
resume over a few steps: tp and the pipeline only reorder float sums (observed <= 1.3e-6 over these
5 steps; Adam amplifies the ulps a little per step, hence the 2e-4 of tests/pipeline's 20-step curves).
With the q/k-norm gains left unmarked for the tp gradient sum the grad norm is off by 1.4e-5 at
step 1 and 2e-4 .. 5e-4 from step 3 (checked once by hand).
"""
import pytest
import torch.distributed as dist

from megalite.checkpoint.hf import import_hf
from megalite.config import load_config
from megalite.topology import ProcessGroups
from megalite.train import Trainer, build_groups
from tests.checkpoint.test_hf_families import LLAMA3, random_hf
from tests.training_helpers import step_metrics, tiny_overrides

transformers = pytest.importorskip("transformers")
RTOL, STEPS = 1e-5, 5


def _train(ckpt: str, prefix: str, run_dir: str, steps: int = STEPS):
    """Resume the import at `ckpt` for `steps` steps on the counting corpus; rank 0 returns (loss, grad_norm)s."""
    run = [o for o in tiny_overrides(prefix, run_dir, steps) if not o.startswith("model.")]  # the import's model
    small = ["train.global_batch_size=4", "data.seq_len=16", "checkpoint.interval=0"]  # 2 micro-batches: seconds
    cfg = load_config(f"{ckpt}/config.yaml", run + small + [f"train.resume={ckpt}"])
    trainer = Trainer(cfg, build_groups(cfg, dist.get_world_size()) if dist.is_initialized()
                      else ProcessGroups.single())
    trainer.fit()
    return step_metrics(run_dir, "loss", "grad_norm") if trainer.rank == 0 else None


# Qwen3: q/k norms, head_dim 4 x 32 != 64, GQA; Qwen2: q/k/v biases cut with their weight rows, plus
# Llama 3's rope scaling (Llama and Mistral are Qwen2's tensor map without the biases)
FAMILIES = {"qwen3": ("Qwen3", {"head_dim": 32}),
            "qwen2-llama3-rope": ("Qwen2", {"rope_parameters": dict(LLAMA3)})}


def assert_split_import_trains_as_one(tmp_path, spawn, counting_data, steps: int = STEPS) -> None:
    """The HF model saved in tmp_path/hf, imported at tp=2 x pp=2, trains its first `steps` steps as its
    one-process import does (loss and grad norm, rel RTOL)."""
    one = import_hf(tmp_path / "hf", tmp_path / "one")
    split = import_hf(tmp_path / "hf", tmp_path / "split", ["parallel.tp=2", "parallel.pp=2"])
    want = _train(str(one), counting_data, str(tmp_path / "run1"), steps)
    got = spawn(_train, 4, str(split), counting_data, str(tmp_path / "run4"), steps)[0]
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step, (loss, norm) in want.items():
        assert got[step][0] == pytest.approx(loss, rel=RTOL), f"step {step} loss"
        assert got[step][1] == pytest.approx(norm, rel=RTOL), f"step {step} grad norm"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_at_tp2_pp2_trains_as_one_process(family, tmp_path, spawn, counting_data):
    name, extra = FAMILIES[family]
    hf = random_hf(getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM"), **extra)
    hf.save_pretrained(str(tmp_path / "hf"))
    assert_split_import_trains_as_one(tmp_path, spawn, counting_data)
