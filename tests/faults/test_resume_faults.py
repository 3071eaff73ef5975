"""Resume under hostile conditions: a lost pointer, damaged or forged checkpoints, planted pickles.

Every refusal is one line with exit code 2 and happens before the run writes anything (the run
directory is byte for byte what it was); the last good checkpoint then still resumes exactly.
"""
import hashlib
import json
import pickle
import shutil

import pytest

from tests.faults.harness import (
    assert_resumes_exactly,
    first_line,
    losses,
    megalite,
    snapshot,
    train_args,
)


def stopped_at_4(capsys, monkeypatch, prefix, run_dir) -> None:
    """A run stopped cleanly after step 4 (a SIGTERM, as a preemption sends): checkpoints at steps 2 and 4."""
    monkeypatch.setenv("MEGALITE_FAULT_INJECT", "rank=0,step=4,mode=term")
    code, err = megalite(capsys, *train_args(prefix, run_dir))
    monkeypatch.delenv("MEGALITE_FAULT_INJECT")
    assert code == 0, err
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]


def test_sigterm_stops_cleanly_and_resumes_exactly(capsys, monkeypatch, counting_data, tmp_path, straight):
    stopped_at_4(capsys, monkeypatch, counting_data, tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert_resumes_exactly(capsys, counting_data, tmp_path, straight)


def test_a_deleted_latest_resumes_from_the_newest_checkpoint(capsys, monkeypatch, counting_data, tmp_path, straight):
    stopped_at_4(capsys, monkeypatch, counting_data, tmp_path)
    (tmp_path / "checkpoints" / "latest").unlink()
    code, err = megalite(capsys, *train_args(counting_data, tmp_path))
    assert code == 0, err
    assert "has no 'latest' pointer; resuming from the newest complete checkpoint step_00000004" in err
    assert losses(tmp_path) == straight
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()  # nothing was pruned in the confusion


def test_step_directories_without_a_manifest_are_refused(capsys, monkeypatch, counting_data, tmp_path):
    stopped_at_4(capsys, monkeypatch, counting_data, tmp_path)
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()
    for step in ("step_00000002", "step_00000004"):
        (root / step / "manifest.json").unlink()
    before = snapshot(tmp_path)
    code, err = megalite(capsys, *train_args(counting_data, tmp_path))
    assert code == 2, err
    assert first_line(err).startswith(f"megalite: {root} holds step directories but none is complete"), err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("pointer", ["../../elsewhere", "step_x", ""])
def test_a_bad_latest_is_refused_without_advice_to_delete_it(capsys, monkeypatch, counting_data, tmp_path,
                                                              straight, pointer):
    stopped_at_4(capsys, monkeypatch, counting_data, tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text(pointer + "\n")
    before = snapshot(tmp_path)
    code, err = megalite(capsys, *train_args(counting_data, tmp_path))
    assert code == 2, err
    line = first_line(err)
    assert "not a step directory name" in line and "complete ones here: step_00000002, step_00000004" in line, err
    assert "delete" not in err
    assert snapshot(tmp_path) == before
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")  # the fix the message names
    assert_resumes_exactly(capsys, counting_data, tmp_path, straight)


# ---- damaged step directories: each refused before anything is written --------------------------------

def _rewrite_manifest(step_dir, **changes) -> None:
    """Make the manifest agree with the files as they are now (a forger's care), plus `changes` to its files."""
    path = step_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for name in list(manifest["files"]):
        data = (step_dir / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["files"].update(changes)
    path.write_text(json.dumps(manifest))


def _flip_a_byte(step_dir):
    f = step_dir / "rank_00000.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _truncate(step_dir):
    f = step_dir / "rank_00000.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


def _forge_the_layout(step_dir):
    f = step_dir / "rank_00000.json"
    doc = json.loads(f.read_text())
    doc["skeleton"]["layout"]["tp"] = 2  # a tp=2 layout on one rank cannot be a real grid
    f.write_text(json.dumps(doc))
    _rewrite_manifest(step_dir)


class _Planted:
    """Unpickling this leaves a file behind: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_a_pickle(step_dir):
    marker = step_dir.parent.parent.parent / "code_ran"
    (step_dir / "rank_00000.safetensors").write_bytes(pickle.dumps(_Planted(str(marker))))
    _rewrite_manifest(step_dir)


def _reach_outside(step_dir):
    outside = step_dir.parent.parent.parent / "outside.txt"
    outside.write_text("not yours")
    _rewrite_manifest(step_dir, **{"../../../outside.txt": {"size": 9, "sha256": "0" * 64}})


DAMAGE = {
    "corrupted": (_flip_a_byte, "rank_00000.safetensors does not match its sha256"),
    "truncated": (_truncate, "rank_00000.safetensors has 1000 bytes but manifest.json says"),
    "forged-layout": (_forge_the_layout, "is not a valid grid"),
    "planted-pickle": (_plant_a_pickle, "rank_00000.safetensors is not a readable safetensors file"),
    "dot-dot-name": (_reach_outside, "lists '../../../outside.txt', which is not a plain file name"),
}


@pytest.fixture(scope="module")
def finished_run(counting_data, tmp_path_factory):
    """A run trained to the end (checkpoints at 2, 4 and 6), copied afresh for every damage."""
    from megalite.config import load_config
    from megalite.topology import ProcessGroups
    from megalite.train import Trainer
    from tests.training_helpers import tiny_overrides

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    Trainer(load_config("tiny", tiny_overrides(counting_data, run_dir, steps=6)), ProcessGroups.single()).fit()
    return run_dir


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_by_name_before_anything_is_written(capsys, counting_data, tmp_path,
                                                                            finished_run, straight, damage):
    work = tmp_path / "work"
    shutil.copytree(finished_run, work / "run")
    run_dir, (spoil, message) = work / "run", DAMAGE[damage]
    spoil(run_dir / "checkpoints" / "step_00000006")
    before = snapshot(work)
    code, err = megalite(capsys, *train_args(counting_data, run_dir))
    assert code == 2, err
    line = first_line(err)
    assert line.startswith("megalite: ") and message in line, err
    assert "Traceback" not in err
    assert snapshot(work) == before  # nothing written, no code ran from a pickle, nothing read outside
    earlier = run_dir / "checkpoints" / "step_00000004"
    if damage != "forged-layout":  # a forgery is caught after the files check, so it names no way out
        assert f"train.resume={earlier}" in line
    assert_resumes_exactly(capsys, counting_data, run_dir, straight, resume=earlier)
