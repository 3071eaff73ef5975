"""Communication accounting: measured tensor-parallel traffic equals the analytic amount.

Payload bytes (see megalite/distributed/comm.py): per layer, without
sequence parallelism, 4 all-reduces of s*b*h fp32 values (2 forward, 2
backward); with it, 6 all-gathers and 4 reduce-scatters of the same size (the
two column-parallel linears gather their input again in backward, having kept
only their [s/tp, b, h] part: tensor_parallel.mappings.sequence_parallel_linear).
Data-parallel gradients, pipeline sends and the tied embedding are counted
under their own group, each equal to its analytic amount in a real run.
"""
import pytest
import torch
import torch.distributed as dist

from megalite.config import ModelConfig
from megalite.distributed import comm
from megalite.distributed.comm import record, take_comm_bytes, wire_bytes
from megalite.model import Transformer

S, B, H, L = 16, 2, 32, 3
CFG = ModelConfig(vocab_size=50, pad_vocab_to=8, hidden_size=H, num_layers=L, num_heads=4, num_kv_heads=2,
                  max_seq_len=S)
ELEM = 4  # fp32


def _tokens():
    return torch.randint(0, 50, (B, S + 1), generator=torch.Generator().manual_seed(0))


def _measure(sp: bool) -> dict:
    """Payload bytes of one block's forward+backward, and of the whole model's."""
    model = Transformer(CFG, tp_group=dist.group.WORLD, sequence_parallel=sp, seed=1)
    tp = dist.get_world_size()
    x = torch.randn(S // tp if sp else S, B, H, requires_grad=True)  # [s(/tp), b, h]
    take_comm_bytes()
    model.blocks[1](x).sum().backward()
    block = take_comm_bytes()
    tokens = _tokens()
    model.loss(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    return {"block": block, "model": take_comm_bytes()}


@pytest.mark.parametrize("sp", [False, True])
def test_measured_tp_bytes_equal_the_analytic_amount(spawn, sp):
    sbh = S * B * H * ELEM
    per_layer = ({"tp_all_reduce": 0, "tp_all_gather": 6 * sbh, "tp_reduce_scatter": 4 * sbh} if sp
                 else {"tp_all_reduce": 4 * sbh, "tp_all_gather": 0, "tp_reduce_scatter": 0})
    # the model adds to L layers the embedding (forward reduce; with SP a reduce-scatter and its backward
    # gather) and the head (backward reduce; with SP a gather, its backward reduce-scatter and the gather
    # again), and the vocab-parallel loss three [s, b] fp32 all-reduces (max, target logit, sum of exp)
    whole = ({"tp_all_reduce": 0, "tp_all_gather": (6 * L + 3) * sbh, "tp_reduce_scatter": (4 * L + 2) * sbh} if sp
             else {"tp_all_reduce": (4 * L + 2) * sbh, "tp_all_gather": 0, "tp_reduce_scatter": 0})
    whole["tp_all_reduce"] += 3 * S * B * 4
    for rank_bytes in spawn(_measure, 2, sp):  # workers are reused: other groups' keys may be present (zero)
        assert {k: rank_bytes["block"][k] for k in per_layer} == per_layer
        assert {k: rank_bytes["model"][k] for k in per_layer} == whole
        assert all(n == 0 for k, n in rank_bytes["model"].items() if k not in per_layer)


def test_sequence_parallel_moves_a_quarter_more_on_the_wire_for_its_memory():
    sbh, tp = S * B * H * ELEM, 4
    plain = 4 * wire_bytes("all_reduce", sbh, tp)
    sp = 6 * wire_bytes("all_gather", sbh, tp) + 4 * wire_bytes("reduce_scatter", sbh, tp)
    assert plain == 6 * sbh  # 4 all-reduces = 8 collectives x (n-1)/n of the payload
    assert sp == 7.5 * sbh  # two more all-gathers (the backward re-gathers), as Megatron's SP pays
    assert wire_bytes("all_reduce", sbh, 1) == 0


def test_a_single_process_records_nothing_and_take_resets():
    take_comm_bytes()
    tokens = _tokens()
    Transformer(CFG, seed=1).loss(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    assert set(take_comm_bytes().values()) == {0}
    record("all_gather", torch.zeros(3, 5, dtype=torch.bfloat16))
    record("send", torch.zeros(4), "pp")
    taken = take_comm_bytes()
    assert (taken["tp_all_gather"], taken["pp_send"]) == (30, 16)
    assert set(take_comm_bytes().values()) == {0} and set(comm.ALWAYS) <= set(taken)


def test_unknown_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="'broadcast'"):
        record("broadcast", torch.zeros(1))
    with pytest.raises(ValueError, match="'mp'"):
        record("all_reduce", torch.zeros(1), "mp")
    with pytest.raises(ValueError, match="'broadcast'"):
        wire_bytes("broadcast", 1, 2)
    assert wire_bytes("send", 10, 2) == 10


def _train_metrics(prefix, run_dir, extra) -> dict:
    from megalite.config import load_config
    from megalite.train import Trainer, build_groups
    from tests.training_helpers import tiny_overrides

    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=2, **extra))
    trainer = Trainer(cfg, build_groups(cfg, dist.get_world_size()))
    last = trainer.fit()
    return {"metrics": last, "params": sum(p.numel() for p in trainer.model.parameters()), "cfg": cfg}


def test_data_parallel_step_all_reduces_every_gradient_once(counting_data, tmp_path, spawn):
    out = spawn(_train_metrics, 2, counting_data, str(tmp_path), {})[0]
    assert out["metrics"]["comm_dp_all_reduce_bytes"] == out["params"] * 4  # fp32 gradients, once a step
    assert out["metrics"]["comm_tp_all_reduce_bytes"] == 0


def test_pipeline_stage_sends_one_activation_per_micro_batch(counting_data, tmp_path, spawn):
    extra = {"parallel.pp": 2, "model.tie_embeddings": True}
    out = spawn(_train_metrics, 2, counting_data, str(tmp_path), extra)[0]  # rank 0: the first stage
    cfg, m = out["cfg"], out["metrics"]
    micro_batches = cfg.train.global_batch_size // cfg.train.micro_batch_size
    sbh = cfg.data.seq_len * cfg.train.micro_batch_size * cfg.model.hidden_size * 4
    assert m["comm_pp_send_bytes"] == micro_batches * sbh  # forward activations; stage 1 sends the grads
    assert m["comm_embedding_all_reduce_bytes"] == cfg.model.vocab_size * cfg.model.hidden_size * 4
