"""Partitioning, stage models and the executor, without processes.

The executor test runs every pipeline rank as a thread over an in-memory
link, so the real executor and real stage models are checked against the
unsplit model (gradients) and the schedule's stash bound (measured peak).
"""
import itertools
import queue
import threading

import pytest
import torch

from megalite.config import ModelConfig
from megalite.model import Transformer, block_parameter_counts
from megalite.pipeline import (
    Executor,
    StageHooks,
    build_stage_model,
    max_in_flight,
    partition_balanced,
    partition_uniform,
    schedule_steps,
)
from tests.tolerance import assert_close


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, pad_vocab_to=8, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                max_seq_len=16, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def test_uniform_partition_puts_embedding_first_and_head_last():
    assert partition_uniform(4, 2) == [range(0, 3), range(3, 6)]
    assert partition_uniform(5, 2) == [range(0, 4), range(4, 7)]
    assert partition_uniform(8, 8)[0] == range(0, 2) and partition_uniform(8, 8)[-1] == range(8, 10)
    with pytest.raises(ValueError, match="cannot fill"):
        partition_uniform(3, 4)


def test_balanced_partition_is_optimal():
    for weights in ([5, 1, 1, 1, 1, 7], [1, 2, 3, 4, 5, 6, 7], [9, 1, 1, 1, 1, 1, 1, 9]):
        for stages in range(1, len(weights) + 1):
            got = partition_balanced(weights, stages)
            assert [i for r in got for i in r] == list(range(len(weights))) and all(len(r) for r in got)
            cost = max(sum(weights[i] for i in r) for r in got)
            best = min(max(sum(weights[a:b]) for a, b in zip((0, *cuts), (*cuts, len(weights))))
                       for cuts in itertools.combinations(range(1, len(weights)), stages - 1))
            assert cost == best


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("pp,v", [(2, 1), (4, 1), (2, 2)])
def test_stage_models_hold_the_unsplit_weights_under_global_names(pp, v, tie):
    cfg = tiny(tie_embeddings=tie)
    full = Transformer(cfg, seed=7).state_dict()
    seen = set()
    for rank in range(pp):
        stage = build_stage_model(cfg, pp, rank, v, seed=7)
        for name, value in stage.state_dict().items():
            assert torch.equal(value, full[name]), name
            seen.add(name)
        assert (stage.tied_weight is not None) == (tie and rank in (0, pp - 1))
    assert seen == set(full)
    counts = block_parameter_counts(cfg)
    assert len(counts) == cfg.num_layers + 2 and counts[1] == counts[2]


@pytest.mark.parametrize("pp,v", [(4, 1), (2, 2)])
def test_balanced_partition_reaches_the_stage_models(pp, v):
    cfg = tiny(num_layers=5, tie_embeddings=True)  # 5 layers over 4 chunks: uniform would load chunk 0
    want = partition_balanced(block_parameter_counts(cfg), pp * v)
    assert want != partition_uniform(5, pp * v)
    held = [build_stage_model(cfg, pp, r, v, partition="balanced").chunks for r in range(pp)]
    assert [held[s % pp][s // pp] for s in range(pp * v)] == want
    assert 0 in want[0] and cfg.num_layers + 1 in want[-1]  # embedding first, head (and loss) last
    with pytest.raises(ValueError, match="parallel.partition='even' is unknown"):
        build_stage_model(cfg, pp, 0, v, partition="even")


class Link:
    """In-memory P2P between threads: one FIFO queue per (src, dst) pair; a group's receives are taken
    when it is waited (sends are buffered, so this checks data flow, not NCCL ordering)."""

    def __init__(self, queues, rank, pp):
        self.queues, self.rank, self.pp = queues, rank, pp
        self.groups = []  # what the executor launched, in order
        self.pending = []

    def launch(self, sends, receives, stage):
        self.groups.append(tuple(a for a, _ in sends) + tuple(receives))
        self.pending.append(Pending(self, receives))
        for a, tensor in sends:
            dst = (self.rank + 1) % self.pp if a.op == "SEND_F" else (self.rank - 1) % self.pp
            self.queues[(self.rank, dst)].put(tensor.detach().clone())
        return self.pending[-1]

    def recv(self, a):
        src = (self.rank - 1) % self.pp if a.op == "RECV_F" else (self.rank + 1) % self.pp
        return self.queues[(src, self.rank)].get(timeout=30)


class Pending:
    def __init__(self, link, receives):
        self.link, self.receives, self.got = link, list(receives), {}

    def take(self, a):
        # per-pair FIFO: receives come off the queues in posting order (this and every earlier group's),
        # whatever the executor asks for first
        for group in self.link.pending[: self.link.pending.index(self) + 1]:
            while group.receives:
                first = group.receives.pop(0)
                group.got[first] = self.link.recv(first)
        return self.got.pop(a)

    def finish(self):
        assert not self.receives and not self.got


def run_threads(cfg, kind, pp, v, tokens, seed=3, partition="uniform"):
    """Every rank a thread; returns (grads by global name, loss, peak stash per rank)."""
    m = len(tokens)
    queues = {(a, b): queue.Queue() for a in range(pp) for b in range(pp)}
    stages = [build_stage_model(cfg, pp, r, v, seed=seed, partition=partition) for r in range(pp)]
    results, errors = {}, []

    def work(rank):
        try:
            st = stages[rank]
            hooks = StageHooks(forward=lambda chunk, x, **kw: st(x, chunk=chunk, **kw),
                               first_input=lambda mb: tokens[mb][:, :-1],
                               loss=lambda mb, out: st.loss_from_logits(out, tokens[mb][:, 1:]).mean() / m)
            link, steps = Link(queues, rank, pp), schedule_steps(kind, pp, rank, m, v)
            results[rank] = Executor(hooks, link, rank, pp, v).run(steps)
            # exactly the groups the NCCL deadlock check proves, in that order
            assert link.groups == [s.comm for s in steps if s.comm], f"rank {rank}"
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(pp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    if cfg.tie_embeddings:  # what tie_embedding_grads does over the embedding group
        total = stages[0].tied_weight.grad + stages[-1].tied_weight.grad
        stages[0].tied_weight.grad = stages[-1].tied_weight.grad = total
    grads = {n: p.grad for st in stages for n, p in st.named_parameters()}
    loss = sum(results[pp - 1].losses.values())
    return grads, loss, [results[r].peak_stashed for r in range(pp)]


@pytest.mark.parametrize("kind,pp,v,m,tie,partition,layers", [
    ("1f1b", 2, 1, 4, False, "uniform", 4), ("1f1b", 4, 1, 6, True, "uniform", 4),
    ("interleaved", 2, 2, 4, True, "uniform", 4), ("afab", 2, 2, 3, False, "uniform", 4),
    ("1f1b", 2, 1, 4, True, "balanced", 4), ("1f1b", 4, 1, 6, True, "balanced", 5),
    ("interleaved", 2, 2, 4, False, "balanced", 5)])
def test_threaded_pipeline_matches_the_unsplit_model(kind, pp, v, m, tie, partition, layers):
    cfg = tiny(tie_embeddings=tie, num_layers=layers)
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, cfg.vocab_size, (2, 9), generator=gen) for _ in range(m)]
    full = Transformer(cfg, seed=3)
    ref_loss = sum(full.loss(t[:, :-1], t[:, 1:]).mean() / m for t in tokens)
    ref_loss.backward()
    grads, loss, peaks = run_threads(cfg, kind, pp, v, tokens, partition=partition)
    assert float(loss) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for name, p in full.named_parameters():
        # fp32: the same products, micro-batches and the tied table's two parts summed in another order: a few
        # ulps; rtol 1e-4 is generous, floor 1e-5 * max|grad| (not an absolute 1e-6) for elements near 0
        assert_close(grads[name], p.grad, rtol=1e-4, atol_frac=1e-5, what=name)
    assert peaks == [max_in_flight(kind, pp, r, m, v) for r in range(pp)]
