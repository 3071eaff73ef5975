"""Checkpoints: exact state round trips, atomic publication, refusal of damaged files, kill safety."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from megalite.checkpoint import CheckpointError, flatten, latest_checkpoint, load_checkpoint, save_checkpoint, unflatten
from megalite.checkpoint import io as ckpt_io


def _same(a, b):
    """Deep equality that also demands identical container types (tuple stays tuple)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


def _round_trip(obj):
    tensors, skeleton = flatten(obj)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))  # must be strict JSON
    return unflatten({k: t.clone() for k, t in tensors.items()}, skeleton)


def test_adamw_state_dict_round_trips_exactly():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    back = _round_trip(sd)
    _same(sd, back)
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(back)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9)


def test_rng_states_round_trip_and_reproduce_draws():
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    back = _round_trip(states)
    _same(states, back)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    torch.set_rng_state(back["torch"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_awkward_values_round_trip():
    base = torch.arange(12.0).reshape(3, 4)
    obj = {"nested": [(1, "a", None), {"x": True}], 3: (), (1, 2): [], "__tensor__": "a plain key",
           "nonfinite": [float("nan"), float("inf"), -float("inf"), 1.5, 2], "big": 2**70,
           "np": [np.float32(1.25), np.arange(6, dtype=np.int16).reshape(2, 3)],
           "bf16": torch.ones(2, dtype=torch.bfloat16), "tied": [base, base], "view": base.t(),
           "scalar": torch.tensor(7), "empty": torch.empty(0), "": {}}
    _same(obj, _round_trip(obj))


def test_unsupported_values_are_named():
    with pytest.raises(TypeError, match="set at '/opt/0'"):
        flatten({"opt": [{1, 2}]})


def _state(step, n=64):
    return {"model": {"w": torch.full((n,), float(step))}, "progress": {"step": step}, "rng": random.getstate()}


def test_save_load_round_trip_and_layout(tmp_path):
    path = save_checkpoint(tmp_path, 7, 0, _state(7))
    assert path == tmp_path / "step_00000007" and latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank_00000.json", "rank_00000.safetensors"]
    for where in (tmp_path, path):
        _same(load_checkpoint(where, 0), _state(7))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and set(manifest["files"]["rank_00000.safetensors"]) == {"size", "sha256"}


def test_loading_never_unpickles(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, 0, _state(1))

    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    assert load_checkpoint(tmp_path, 0)["progress"]["step"] == 1


def _raise_on_call(n):
    calls = []

    def barrier():
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash")
    return barrier


def test_crash_after_rank_files_keeps_previous_latest(tmp_path):
    save_checkpoint(tmp_path, 1, 0, _state(1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, 0, _state(2), barrier=_raise_on_call(2))  # files written, not published
    assert (tmp_path / "step_00000002.tmp" / "rank_00000.safetensors").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    _same(load_checkpoint(tmp_path, 0), _state(1))
    save_checkpoint(tmp_path, 3, 0, _state(3))
    assert not list(tmp_path.glob("*.tmp")) and load_checkpoint(tmp_path)["progress"]["step"] == 3


def test_crash_before_latest_moves_keeps_previous_latest(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, 0, _state(1))

    def crash(root, name):
        raise OSError("simulated crash")

    monkeypatch.setattr(ckpt_io, "_point_latest", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, 0, _state(2))
    assert (tmp_path / "step_00000002" / "manifest.json").exists()  # complete, but never pointed at
    assert load_checkpoint(tmp_path, 0)["progress"]["step"] == 1


@pytest.mark.parametrize("damage, match", [
    ("flip", "rank_00000.safetensors does not match its sha256"),
    ("truncate", "rank_00000.safetensors has .* bytes but manifest.json says"),
    ("missing", "rank_00000.safetensors is missing"),
    ("flip_json", "rank_00000.json does not match its sha256"),
    ("garbage_same_size", "rank_00000.safetensors is not a readable safetensors file"),
])
def test_damaged_files_are_refused_by_name(tmp_path, damage, match):
    path = save_checkpoint(tmp_path, 1, 0, _state(1))
    st, js = path / "rank_00000.safetensors", path / "rank_00000.json"
    data = bytearray(st.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        st.write_bytes(bytes(data))
    elif damage == "truncate":
        st.write_bytes(bytes(data[:-5]))
    elif damage == "missing":
        st.unlink()
    elif damage == "flip_json":
        js.write_bytes(js.read_bytes().replace(b"skeleton", b"skeletoN"))
    else:  # well-formed manifest entry for a file safetensors cannot parse
        st.write_bytes(b"\xff" * len(data))
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"][st.name]["sha256"] = ckpt_io._sha256(st)
        (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path, 0)


def test_bad_paths_and_ranks_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", 0)
    (tmp_path / "step_00000005.tmp").mkdir()
    with pytest.raises(CheckpointError, match="unfinished save"):
        load_checkpoint(tmp_path / "step_00000005.tmp", 0)
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 1, 0, _state(1))
    with pytest.raises(CheckpointError, match="rank 3 has no shard"):
        load_checkpoint(tmp_path, 3)
    with pytest.raises(ValueError, match="needs a barrier"):
        save_checkpoint(tmp_path, 2, 0, _state(2), world_size=2)


def test_keep_last_prunes_old_but_never_latest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, 0, _state(step), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "latest", "step_00000003", "step_00000004"]
    save_checkpoint(tmp_path, 2, 0, _state(2), keep_last=1)  # an older step saved last (resumed from 2)
    assert latest_checkpoint(tmp_path).name == "step_00000002" and (tmp_path / "step_00000004").exists()
    assert not (tmp_path / "step_00000003").exists()
    save_checkpoint(tmp_path, 5, 0, _state(5), keep_last=0)  # 0 keeps everything
    assert len(list(tmp_path.glob("step_*"))) == 3


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 4, 0, _state(4))
    save_checkpoint(tmp_path, 4, 0, _state(40))
    assert load_checkpoint(tmp_path, 0)["model"]["w"][0].item() == 40.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "latest", "step_00000004"]  # .lock: the save held it


def test_dangling_latest_falls_back_to_newest_complete(tmp_path):
    save_checkpoint(tmp_path, 1, 0, _state(1))
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.warns(UserWarning, match="step_00000009"):
        assert latest_checkpoint(tmp_path).name == "step_00000001"


def _save_and_load_two_ranks(root):
    rank = dist.get_rank()
    state = {"rank": rank, "w": torch.full((3,), float(rank))}
    save_checkpoint(root, 10, rank, state, world_size=2, barrier=dist.barrier)
    back = load_checkpoint(root, rank)
    return back["rank"], back["w"].tolist()


def test_two_ranks_each_save_and_load_their_own_shard(spawn, tmp_path):
    assert spawn(_save_and_load_two_ranks, 2, str(tmp_path)) == [(0, [0.0] * 3), (1, [1.0] * 3)]
    manifest = json.loads((tmp_path / "step_00000010" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and len(manifest["files"]) == 4


CHILD = """
import sys, torch
from megalite.checkpoint import save_checkpoint
root, base = sys.argv[1], int(sys.argv[2])
for step in range(base, base + 100000):
    save_checkpoint(root, step, 0, {"w": torch.full((1 << 18,), float(step)), "step": step}, keep_last=2)
"""


def test_sigkill_mid_save_leaves_a_loadable_latest(tmp_path):
    rng = random.Random(0)
    for round_ in range(2):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(round_ * 100000)])
        try:
            deadline = time.monotonic() + 60
            while latest_checkpoint(tmp_path) is None or round_ and latest_checkpoint(tmp_path).name < "step_00100000":
                assert child.poll() is None and time.monotonic() < deadline, "child never saved"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        state = load_checkpoint(tmp_path, 0)
        assert torch.all(state["w"] == float(state["step"]))
        assert latest_checkpoint(tmp_path).name == f"step_{state['step']:08d}"
    save_checkpoint(tmp_path, 999999, 0, {"step": 999999})  # the next save cleans what the kills left
    assert not list(tmp_path.glob("*.tmp"))


def test_extra_files_are_published_with_the_checkpoint_and_listed(tmp_path):
    state = {"w": torch.arange(4.0)}
    path = save_checkpoint(tmp_path, 3, 0, state, extra_files={"config.yaml": "model:\n  hidden_size: 8\n"})
    assert (path / "config.yaml").read_text() == "model:\n  hidden_size: 8\n"
    assert not list(path.glob("*.digest"))
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"rank_00000.safetensors", "rank_00000.json", "config.yaml"}
    (path / "config.yaml").write_text("model: {}\n")  # truncated: refused by name
    with pytest.raises(CheckpointError, match="config.yaml"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="plain file name"):
        save_checkpoint(tmp_path, 4, 0, state, extra_files={"../x.yaml": ""})
