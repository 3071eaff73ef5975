"""Per-rank tensor-parallel shards reassemble into exactly the tp=1 model's state."""
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from megalite.checkpoint.sharding import assemble_full_state, shard_metadata
from megalite.checkpoint.state import flatten, unflatten
from megalite.config import ModelConfig, OptimConfig, TrainConfig
from megalite.engine import NativeEngine
from megalite.model import Transformer

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


def _shards(name: str):
    """This tp rank's metadata, initial state and state after one sequence-parallel step."""
    model = Transformer(CONFIGS[name], tp_group=dist.group.WORLD, sequence_parallel=True, seed=5)
    meta = shard_metadata(model)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    _train_one_step(model, dist.group.WORLD)
    return meta, init, model.state_dict()


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_assemble_into_the_tp1_state(spawn, tp):
    for name in ("llama", "gpt2"):
        per_rank = spawn(_shards, tp, name)
        meta = per_rank[0][0]
        ref = Transformer(CONFIGS[name], seed=5)
        ref_init = {k: v.clone() for k, v in ref.state_dict().items()}
        full = assemble_full_state([r[1] for r in per_rank], meta)
        assert full.keys() == ref_init.keys()
        for key, want in ref_init.items():
            assert torch.equal(full[key], want), (name, key)  # init is exact: same full tensor, chunked
        ref.load_state_dict(full)  # loads strictly into the tp=1 model
        _train_one_step(ref, None)
        trained = assemble_full_state([r[2] for r in per_rank], meta)  # raises unless the replicas agree
        for key, want in ref.state_dict().items():
            # Adam's first update is lr * g / (|g| + eps): a gradient of order eps that differs by a few
            # ulps between layouts moves its weight by up to a few percent of lr, hence atol = 0.05 * lr
            torch.testing.assert_close(trained[key], want, rtol=1e-5, atol=0.05 * LR, msg=f"{name} {key}")


def test_padding_that_depends_on_tp_is_stripped_on_request(spawn):
    per_rank = spawn(_shards, 2, "padded")
    meta = per_rank[0][0]
    ref = Transformer(PADDED, seed=5).state_dict()
    full = assemble_full_state([r[1] for r in per_rank], meta, strip_padding=True)
    assert meta["blocks.0.word.weight"]["full_shape"] == [64, 32] and meta["blocks.0.word.weight"]["valid_rows"] == 40
    assert full["blocks.0.word.weight"].shape == (40, 32)
    for key in ("blocks.0.word.weight", "blocks.3.output.weight", "blocks.1.attn.qkv.weight"):
        assert torch.equal(full[key], ref[key][:40] if "word" in key or "output" in key else ref[key]), key


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


def test_bad_inputs_are_refused_with_the_reason():
    model = Transformer(GPT2, seed=5)
    meta = shard_metadata(model, tp_size=2)
    state = model.state_dict()
    with pytest.raises(ValueError, match="tp_size=\\[2\\] but 1 rank states"):
        assemble_full_state([state], meta)
    with pytest.raises(ValueError, match="empty"):
        assemble_full_state([], meta)
    other = {k: v.clone() for k, v in state.items()}
    other["blocks.1.norm1.weight"] += 1
    with pytest.raises(ValueError, match="'blocks.1.norm1.weight' is replicated.*rank 1 differs"):
        assemble_full_state([state, other], meta)
    del other["blocks.1.norm1.weight"]
    with pytest.raises(KeyError, match="rank 1"):
        assemble_full_state([state, other], meta)
    bad = {**meta, "blocks.1.attn.qkv.weight": {**meta["blocks.1.attn.qkv.weight"], "full_shape": [1, 1]}}
    with pytest.raises(ValueError, match="assembled shape"):
        assemble_full_state([state, state], bad)
