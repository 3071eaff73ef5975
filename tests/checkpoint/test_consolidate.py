"""consolidate_fp32: the full fp32 model from ZeRO- and tp-sharded checkpoints, read without the cluster."""
import pytest
import torch

pytest.importorskip("deepspeed")

from engine.test_deepspeed import _train, zero  # noqa: E402
from megalite.checkpoint import load_checkpoint  # noqa: E402
from megalite.checkpoint.consolidate import consolidate_fp32  # noqa: E402
from megalite.config import load_config  # noqa: E402
from megalite.model import Transformer  # noqa: E402
from training_helpers import tiny_overrides  # noqa: E402

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
    # The engines reduce gradients in different orders (all-reduce vs reduce-scatter), and Adam's
    # g / (sqrt(v) + eps) turns a last-bit gradient difference into up to 4e-6 of weight where g is
    # near eps (seen on some CPUs). 1e-5 is still 150x below one step's update (lr 1.5e-3), so a
    # misplaced slice, which moves weights by ~1e-2, fails.
    for name in native:
        assert z3[name].dtype == torch.float32
        torch.testing.assert_close(z3[name], native[name], rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


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
    from megalite.checkpoint.stream import CheckpointReader

    layout = {"parallel.tp": 2, "parallel.pp": 2, "checkpoint.interval": 0}
    spawn(_train, 4, counting_data, str(tmp_path / "default"), layout, steps=2)
    spawn(_train, 4, counting_data, str(tmp_path / "pp_first"), {**layout, "parallel.order": "pp-tp-dp"}, steps=2)
    assert load_checkpoint(tmp_path / "pp_first" / "checkpoints", 1)["layout"]["order"] == "pp-tp-dp"
    want = consolidate_fp32(tmp_path / "default" / "checkpoints")
    got = consolidate_fp32(tmp_path / "pp_first" / "checkpoints")
    reader = CheckpointReader(tmp_path / "pp_first" / "checkpoints")  # its default order is tp-dp-pp
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    stripped = consolidate_fp32(tmp_path / "default" / "checkpoints", strip_padding=True)
    assert set(reader.names()) <= set(stripped)
    for name in reader.names():
        torch.testing.assert_close(reader.read(name), stripped[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
