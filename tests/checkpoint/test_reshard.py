"""Resharding a training checkpoint: the resumed run continues the loss curve of the run that never moved.

Chain: A trains tp=1,pp=1 for 6 steps (checkpoint at step 3) - the reference.
A's step 3 is resharded to tp=2,pp=2 and B resumes it on 4 ranks to step 6;
B's step 4 is resharded back to tp=1,pp=1 with 2 data-parallel replicas and C
resumes it on 2 ranks (dp=2) to step 6. The vocabulary (130) is padded to 192
rows at tp=1 and 256 at tp=2, and embeddings are tied, so the padding rewrite
and the last stage's copy of the table are both exercised.

Tolerance (fp32): losses match the reference to rel 1e-5. Resharding itself
is exact (a round trip returns identical tensors); the only differences are
the reordered float sums of tp and the pipeline's tied-table gradient, as in
tests/pipeline.
"""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megalite.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megalite.checkpoint.reshard import reshard
from megalite.checkpoint.resume import check_before_resume, data_order
from megalite.checkpoint.schema import Layout
from megalite.config import load_config
from megalite.train import Trainer, build_groups
from tests.training_helpers import step_metrics, tiny_overrides

RTOL = 1e-5
K, N = 3, 6  # checkpoint step, planned steps (the plan fixes data order and LR schedule)
_TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


def _train(config: str, overrides: list[str]):
    """Run (or resume) a training to its planned end; rank 0 returns its losses by step."""
    cfg = load_config(config, overrides)
    world = dist.get_world_size() if dist.is_initialized() else 1
    trainer = Trainer(cfg, build_groups(cfg, world))
    trainer.fit()
    return step_metrics(cfg.train.run_dir) if trainer.rank == 0 else None


def _resume(ckpt: Path, run_dir: Path, interval: int = 0) -> tuple[str, list[str]]:
    """The config and overrides that resume a resharded checkpoint root in a new run directory."""
    return str(ckpt / "config.yaml"), [f"train.resume={ckpt}", f"train.run_dir={run_dir}",
                                       f"checkpoint.interval={interval}"]


@pytest.fixture(scope="module")
def reference(counting_data, tmp_path_factory):
    """(run directory, losses) of the tp=1,pp=1 run, which checkpoints at step K."""
    run = tmp_path_factory.mktemp("reshard") / "ref"
    overrides = tiny_overrides(counting_data, run, steps=N, **{
        "model.vocab_size": 130, "model.tie_embeddings": True, "checkpoint.interval": K})
    return run, _train("tiny", overrides)


def _step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _assert_continues(got: dict, ref: dict, steps) -> None:
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=RTOL), f"step {step}: {got[step]} vs {ref[step]}"


def test_resume_at_tp2_pp2_and_back_continues_the_loss_curve(reference, tmp_path, spawn):
    run, ref = reference
    there = reshard(_step_dir(run, K), tmp_path / "tp2pp2", tp=2, pp=2)
    b = spawn(_train, 4, *_resume(there, tmp_path / "b", interval=1))[0]
    assert sorted(b) == list(range(K + 1, N + 1))  # resumed at step K: the data position came along
    _assert_continues(b, ref, b)
    back = reshard(_step_dir(tmp_path / "b", K + 1), tmp_path / "tp1dp2", tp=1, pp=1, dp=2)
    c = spawn(_train, 2, *_resume(back, tmp_path / "c"))[0]  # dp=2: the data position is dp-independent
    assert sorted(c) == list(range(K + 2, N + 1))
    _assert_continues(c, b, c)
    _assert_continues(c, ref, c)


def test_resume_at_cp2_continues_the_loss_curve_and_another_cp_is_refused_naming_the_reshard(reference, tmp_path,
                                                                                              spawn):
    run, ref = reference
    there = reshard(_step_dir(run, K), tmp_path / "cp2", tp=1, pp=1, cp=2)
    assert load_checkpoint(there, 1)["layout"]["cp"] == 2  # the checkpoint records cp
    b = spawn(_train, 2, *_resume(there, tmp_path / "b", interval=1))[0]
    assert sorted(b) == list(range(K + 1, N + 1))
    _assert_continues(b, ref, b)
    saved = _step_dir(tmp_path / "b", K + 1)
    now = Layout(1, 1, 2)  # the same 2 ranks as dp=2, cp=1
    with pytest.raises(CheckpointError, match=rf"written with tp=1 cp=2 .* this run uses tp=1 cp=1 .*megalite "
                                              rf"convert reshard {saved} OUT --tp 1 --pp 1 --dp 2"):
        check_before_resume(saved, 0, now, data_order(load_config(str(saved / "config.yaml"))))
    back = reshard(saved, tmp_path / "dp2", tp=1, pp=1, dp=2)  # what the refusal says to run
    c = spawn(_train, 2, *_resume(back, tmp_path / "c"))[0]
    _assert_continues(c, ref, c)


def _flat(state: dict) -> dict:
    opt = state["engine"]["optimizer"]
    tensors = {f"model/{k}": v for k, v in state["model"].items()}
    tensors.update({f"opt/{i}/{k}": v for i, s in opt["state"].items() for k, v in s.items()})
    return tensors


def test_round_trip_returns_identical_state_and_pads_with_zeros(reference, tmp_path):
    run, _ = reference
    there = reshard(_step_dir(run, K), tmp_path / "there", tp=2, pp=2)
    last = load_checkpoint(there, 3)  # tp rank 1 of the last stage: the padded end of the tied table's copy
    meta, table = last["shards"]["blocks.3.weight"], last["model"]["blocks.3.weight"]
    assert meta["full_shape"] == [256, 32] and table.shape == (128, 32)
    assert not table[130 - 128:].any()  # rows 130..255: new padding is zero
    moments = last["engine"]["optimizer"]["state"]
    assert any(s["exp_avg"].shape == (128, 32) and not s["exp_avg"][2:].any() and s["exp_avg"][:2].any()
               for s in moments.values())  # the copy's moments: real rows carried, padding zero
    back = reshard(there, tmp_path / "back", tp=1, pp=1)
    before, after = load_checkpoint(_step_dir(run, K)), load_checkpoint(back)
    assert _flat(before).keys() == _flat(after).keys()
    for name, t in _flat(before).items():
        assert torch.equal(t, _flat(after)[name]), name
    for key in ("shards", "progress", "layout"):
        assert after[key] == before[key], key
    for key in ("schedule", "scaler", "precision"):
        assert after["engine"][key] == before["engine"][key], key
    assert after["engine"]["optimizer"]["param_groups"] == before["engine"]["optimizer"]["param_groups"]
    assert (after["progress"]["step"], after["progress"]["consumed_samples"]) == (K, K * 8)


def _rewritten(src: Path, root: Path, edit) -> Path:
    """A copy of single-rank checkpoint `src` whose state `edit` changed, saved properly (valid manifest)."""
    state = load_checkpoint(src)
    edit(state)
    save_checkpoint(root, K, 0, state)
    shutil.copy(src.parent.parent / "config.yaml", root / "config.yaml")
    return root


def _assert_refused(match: str, source, out: Path, **layout) -> None:
    with pytest.raises(CheckpointError, match=match):
        reshard(source, out, **{"tp": 2, "pp": 2, **layout})
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_refusals_name_the_problem_and_write_nothing(reference, tmp_path):
    run, _ = reference
    src = _step_dir(run, K)
    out = tmp_path / "out"
    _assert_refused("num_kv_heads=2 must be divisible by parallel.tp=4", src, out, tp=4)
    _assert_refused("num_layers=2 must be divisible by parallel.pp", src, out, pp=4)
    _assert_refused("dp=0 must be a positive integer", src, out, dp=0)

    def ds(state):
        state["engine"] = {"backend": "deepspeed", "zero_stage": 1}
    _assert_refused("DeepSpeed engine.*to-hf", _rewritten(src, tmp_path / "ds", ds), out)
    bad_layout = _rewritten(src, tmp_path / "layout", lambda s: s["layout"].update(stripes=2))
    _assert_refused("unknown layout metadata", bad_layout, out)
    bad_cp = _rewritten(src, tmp_path / "cp", lambda s: s["layout"].update(cp=2))  # 1 rank cannot hold cp=2
    _assert_refused(r"is not a valid grid: world_size=1 is not divisible by tp\*cp\*pp=1\*2\*1=2", bad_cp, out)
    missing = _rewritten(src, tmp_path / "missing", lambda s: s["model"].pop("blocks.1.attn.qkv.weight"))
    _assert_refused(r"blocks\.1\.attn\.qkv\.weight'\] are missing", missing, out)
    wide = tmp_path / "wide.yaml"
    wide.write_text((run / "config.yaml").read_text().replace("hidden_size: 32", "hidden_size: 64"))
    _assert_refused(r"'blocks.0.word.weight' has shape \[130, 32\].*expects \[130, 64\]", src, out,
                    config=str(wide))

    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    data = bytearray((corrupt / "rank_00000.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "rank_00000.safetensors").write_bytes(bytes(data))
    _assert_refused("does not match its sha256", corrupt, out, config=str(run / "config.yaml"))

    four = reshard(src, tmp_path / "four", tp=2, pp=2)
    (four / f"step_{K:08d}" / "rank_00003.safetensors").unlink()
    _assert_refused("rank_00003.safetensors is missing", four, out, tp=1, pp=1)

    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        reshard(src, out, tp=2, pp=2)
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_cli_reshard(reference, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_checkpoint", _TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    run, _ = reference
    out = tmp_path / "cli"
    assert tool.main(["reshard", str(run / "checkpoints"), str(out), "--tp", "2", "--pp", "1"]) == 0
    assert load_checkpoint(out, 1)["layout"] == {"tp": 2, "pp": 1, "world_size": 2, "virtual_stages": 1,
                                                  "order": "tp-dp-pp", "partition": "uniform"}
    assert load_checkpoint(out, 1)["progress"]["step"] == N  # the root's `latest`
    assert tool.main(["reshard", str(run / "checkpoints"), str(out), "--tp", "2", "--pp", "1"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
