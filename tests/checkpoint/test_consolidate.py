"""consolidate_fp32: the full fp32 model from ZeRO- and tp-sharded checkpoints, read without the cluster."""
import pytest
import torch

pytest.importorskip("deepspeed")

from megalite.checkpoint import load_checkpoint  # noqa: E402
from megalite.checkpoint.consolidate import consolidate_fp32  # noqa: E402
from megalite.config import load_config  # noqa: E402
from megalite.model import Transformer  # noqa: E402
from tests.engine.test_deepspeed import _train, zero  # noqa: E402
from tests.tolerance import assert_close  # noqa: E402
from tests.training_helpers import tiny_overrides  # noqa: E402

TP2 = {"parallel.tp": 2, "parallel.sequence_parallel": True, "checkpoint.interval": 0}


def full_shapes(prefix) -> dict:
    cfg = load_config("tiny", tiny_overrides(prefix, "unused"))
    return {k: tuple(v.shape) for k, v in Transformer(cfg.model).state_dict().items()}


def test_zero3_tp2_dp2_consolidates_to_the_native_model(counting_data, tmp_path, spawn):
    spawn(_train, 4, counting_data, str(tmp_path / "native"), TP2, steps=3)
    spawn(_train, 4, counting_data, str(tmp_path / "z3"), zero(3, **TP2), steps=3)
    native = consolidate_fp32(tmp_path / "native" / "checkpoints")
    z3 = consolidate_fp32(tmp_path / "z3" / "checkpoints")
    assert {k: tuple(v.shape) for k, v in z3.items()} == full_shapes(counting_data)
    # ZeRO-3 leaves the model's own parameters empty: everything came from the fp32 master slices
    step_dir = next((tmp_path / "z3" / "checkpoints").glob("step_*"))
    assert all(t.numel() == 0 for t in load_checkpoint(step_dir, 0)["model"].values())
    # The engines reduce gradients in different orders (all-reduce vs reduce-scatter): ulps, so rtol 1e-5.
    # But Adam's g / (sqrt(v) + eps) turns a last-bit difference of a gradient near eps into a fraction of
    # one update (seen: 4e-6 of weight on some CPUs), whatever the weight's size: the floor is therefore a
    # fraction of the update, lr / 100 (3e-5), not of the weight; a misplaced slice moves weights by ~1e-2.
    lr = load_config("tiny", tiny_overrides(counting_data, "unused")).optim.lr
    for name in native:
        assert z3[name].dtype == torch.float32
        assert_close(z3[name], native[name], rtol=1e-5, atol_frac=0.0, what=name, atol=lr / 100)


def test_zero2_dp2_consolidates_to_the_saved_weights_exactly(counting_data, tmp_path, spawn):
    spawn(_train, 2, counting_data, str(tmp_path), zero(2, **{"checkpoint.interval": 0}), steps=2)
    full = consolidate_fp32(tmp_path / "checkpoints")
    saved = load_checkpoint(tmp_path / "checkpoints", 1)["model"]  # any dp rank holds the whole model
    assert set(full) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(full[name], tensor), name


def test_missing_rank_slice_is_reported(counting_data, tmp_path, spawn):
    spawn(_train, 2, counting_data, str(tmp_path), zero(3, **{"checkpoint.interval": 0}), steps=1)
    step_dir = next((tmp_path / "checkpoints").glob("step_*"))
    (step_dir / "rank_00001.safetensors").unlink()
    with pytest.raises(Exception, match="rank_00001"):
        consolidate_fp32(step_dir)


def test_rank_order_is_recorded_and_followed(counting_data, tmp_path, spawn):
    """With parallel.order=pp-tp-dp rank 1 is (tp 0, pp 1), not (tp 1, pp 0): readers must not assume."""
    from megalite.checkpoint.reader import CheckpointReader

    layout = {"parallel.tp": 2, "parallel.pp": 2, "checkpoint.interval": 0}
    lr = load_config("tiny", tiny_overrides(counting_data, "unused")).optim.lr
    spawn(_train, 4, counting_data, str(tmp_path / "default"), layout, steps=2)
    spawn(_train, 4, counting_data, str(tmp_path / "pp_first"), {**layout, "parallel.order": "pp-tp-dp"}, steps=2)
    assert load_checkpoint(tmp_path / "pp_first" / "checkpoints", 1)["layout"]["order"] == "pp-tp-dp"
    want = consolidate_fp32(tmp_path / "default" / "checkpoints")
    got = consolidate_fp32(tmp_path / "pp_first" / "checkpoints")
    reader = CheckpointReader(tmp_path / "pp_first" / "checkpoints")  # its default order is tp-dp-pp
    assert set(got) == set(want)
    for name in want:
        # the same training with the ranks numbered differently: fp32 ulps of reduction order, amplified by
        # Adam near eps as above; rtol 1e-5, floor a fraction of one update (lr / 100), not an absolute 1e-6
        assert_close(got[name], want[name], rtol=1e-5, atol_frac=0.0, what=name, atol=lr / 100)
    stripped = consolidate_fp32(tmp_path / "default" / "checkpoints", strip_padding=True)
    assert set(reader.names()) <= set(stripped)
    for name in reader.names():
        assert_close(reader.read(name), stripped[name], rtol=1e-5, atol_frac=0.0, what=name, atol=lr / 100)  # as above
