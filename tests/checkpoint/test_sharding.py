"""Per-rank tensor-parallel shards, saved as the Trainer saves them, read back by the one checkpoint
reader into exactly the tp=1 model's state; forged shards are refused by name."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megalite.checkpoint import CheckpointError, Layout, Progress, RankState, save_checkpoint
from megalite.checkpoint.io import publish, step_dir_name, write_rank
from megalite.checkpoint.reader import CheckpointReader
from megalite.checkpoint.state import flatten, unflatten
from megalite.config import ModelConfig, OptimConfig, TrainConfig
from megalite.engine import NativeEngine
from megalite.model import Transformer
from megalite.tensor_parallel import shard_metadata

# vocab 64 pads to 64 at tp = 1, 2 and 4, so even the padded tables compare whole
LLAMA = ModelConfig(vocab_size=64, pad_vocab_to=16, hidden_size=32, num_layers=2, num_heads=8, num_kv_heads=4,
                    max_seq_len=16)  # fused GQA qkv slabs, interleaved gate/up rows
GPT2 = replace(LLAMA, num_heads=4, num_kv_heads=None, norm="layernorm", position="learned", activation="gelu",
               tie_embeddings=True, bias=True)
PADDED = replace(LLAMA, vocab_size=40)  # pads to 48 at tp=1, 64 at tp=2 and 4
CONFIGS = {"llama": LLAMA, "gpt2": GPT2, "padded": PADDED}
LR = 1e-2


def _train_one_step(model, tp_group):
    engine = NativeEngine(model, OptimConfig(lr=LR, warmup_steps=0), TrainConfig(), 5, tp_group=tp_group,
                          model_parallel_group=tp_group)
    tokens = torch.randint(0, 40, (2, 17), generator=torch.Generator().manual_seed(1))
    engine.backward(model.loss(tokens[:, :-1], tokens[:, 1:]).mean())
    engine.step()


def _state(model, tp: int, step: int) -> dict:
    return RankState(model.state_dict(), shard_metadata(model, tp), {}, {}, Progress(step), Layout(tp, 1, tp)).to_dict()


def _save_shards(root: str, name: str) -> None:
    """Every tp rank saves its shard of the initial model (step 0) and after one sequence-parallel step (step 1)."""
    model = Transformer(CONFIGS[name], tp_group=dist.group.WORLD, sequence_parallel=True, seed=5)
    tp, rank = dist.get_world_size(), dist.get_rank()
    save_checkpoint(root, 0, rank, _state(model, tp, 0), world_size=tp, barrier=dist.barrier, keep_last=0)
    _train_one_step(model, dist.group.WORLD)
    save_checkpoint(root, 1, rank, _state(model, tp, 1), world_size=tp, barrier=dist.barrier, keep_last=0)


def _read_all(step_dir: Path, strip_padding: bool = False) -> dict:
    reader = CheckpointReader(step_dir)
    return {name: reader.read(name, strip_padding=strip_padding) for name in reader.names()}


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_read_back_into_the_tp1_state(spawn, tp, tmp_path):
    for name in ("llama", "gpt2"):
        root = tmp_path / f"{name}_tp{tp}"
        spawn(_save_shards, tp, str(root), name)
        ref = Transformer(CONFIGS[name], seed=5)
        full = _read_all(root / step_dir_name(0))
        assert full.keys() == ref.state_dict().keys()
        for key, want in ref.state_dict().items():
            assert torch.equal(full[key], want), (name, key)  # init is exact: same full tensor, chunked
        ref.load_state_dict(full)  # loads strictly into the tp=1 model
        _train_one_step(ref, None)
        trained = _read_all(root / step_dir_name(1))  # raises unless the replicas agree
        for key, want in ref.state_dict().items():
            # Adam's first update is lr * g / (|g| + eps): a gradient of order eps that differs by a few
            # ulps between layouts moves its weight by up to a few percent of lr, hence atol = 0.05 * lr
            torch.testing.assert_close(trained[key], want, rtol=1e-5, atol=0.05 * LR, msg=f"{name} {key}")


def test_padding_that_depends_on_tp_is_stripped_on_request(spawn, tmp_path):
    spawn(_save_shards, 2, str(tmp_path), "padded")
    reader = CheckpointReader(tmp_path / step_dir_name(0))
    meta = reader.meta[0]
    assert meta["blocks.0.word.weight"]["full_shape"] == [64, 32] and meta["blocks.0.word.weight"]["valid_rows"] == 40
    assert reader.shape("blocks.0.word.weight") == [40, 32]
    ref = Transformer(PADDED, seed=5).state_dict()
    for key in ("blocks.0.word.weight", "blocks.3.output.weight", "blocks.1.attn.qkv.weight"):
        got = reader.read(key)
        assert torch.equal(got, ref[key][:40] if "word" in key or "output" in key else ref[key]), key


def test_metadata_is_plain_data_with_dims_and_full_shapes():
    model = Transformer(GPT2, seed=5)
    meta = shard_metadata(model, tp_size=4)  # as a tp=4 rank would record it for these shard shapes
    tensors, skeleton = flatten(meta)
    assert not tensors and unflatten(tensors, skeleton) == meta
    assert set(meta) == set(model.state_dict())  # tied head weight listed under both names
    qkv = meta["blocks.1.attn.qkv.weight"]
    assert qkv["partition_dim"] == 0 and qkv["full_shape"] == [4 * 96, 32] and qkv["tp_size"] == 4
    assert meta["blocks.1.attn.proj.weight"]["partition_dim"] == 1
    assert meta["blocks.1.norm1.weight"]["partition_dim"] is None
    assert meta["blocks.3.weight"]["valid_rows"] == 64


def _forge(root: Path, states: list[dict]) -> Path:
    """A step directory of len(states) tp ranks holding exactly `states` (no Trainer involved)."""
    tmp = root / (step_dir_name(0) + ".tmp")
    tmp.mkdir(parents=True)
    for rank, state in enumerate(states):
        write_rank(tmp, rank, state)
    publish(root, tmp, root / step_dir_name(0), 0, len(states))
    return root / step_dir_name(0)


def test_forged_shards_are_refused_with_the_reason(tmp_path):
    model = Transformer(GPT2, seed=5)
    state = _state(model, 2, 0)
    other = {**state, "model": {k: v.clone() for k, v in state["model"].items()}}
    other["model"]["blocks.1.norm1.weight"] += 1
    reader = CheckpointReader(_forge(tmp_path / "diverged", [state, other]))
    with pytest.raises(CheckpointError, match="'blocks.1.norm1.weight' is replicated across tp ranks but tp rank 1"):
        reader.read("blocks.1.norm1.weight")
    bad_meta = {**state["shards"], "blocks.1.attn.qkv.weight": {**state["shards"]["blocks.1.attn.qkv.weight"],
                                                                "full_shape": [1, 1]}}
    reader = CheckpointReader(_forge(tmp_path / "shape", [{**state, "shards": bad_meta}] * 2))
    with pytest.raises(CheckpointError, match="assembles to shape"):
        reader.read("blocks.1.attn.qkv.weight")
    with pytest.raises(CheckpointError, match="'blocks.9.mlp.fc1.weight' is missing from the checkpoint"):
        reader.read("blocks.9.mlp.fc1.weight")
    one_rank = {**state, "layout": Layout(2, 1, 2).to_dict()}
    with pytest.raises(CheckpointError, match="layout says world_size=2 but the manifest lists 1 ranks"):
        CheckpointReader(_forge(tmp_path / "world", [one_rank]))
