"""train.compile: every transformer block compiled with torch.compile (Inductor on this CPU) gives the
eager model's loss and gradients, under every activation-checkpointing mode, and the Trainer's losses
at pp = 2; and what is refused, with the fix. (tp = 2, document masks without recompiling and the
pp = 1 Trainer were checked once too, but leave CI: 80 s of cold Inductor compiles between them.)

Tolerance: Inductor fuses the fp32 elementwise ops and reductions of a block into generated C++
loops (norms, rotary, SwiGLU, softmax, the backward's sums), which sum in another order and may
contract a*b+c into one FMA, so results differ from eager by a few fp32 ulps per op, compounded over
two blocks and the backward: ~1e-7..1e-6 relative here (measured worst: 3.9e-7 of max|grad|, 0.017
of the allowance). rtol 1e-4 leaves two orders of margin for another CPU's vector width, and is
still two orders below the errors a test exists to catch (a dropped term, a wrong sign, a
mis-traced branch: ~1e-2 relative or more); atol_frac 1e-5 of each tensor's max|value| covers
elements whose true value is ~0.
"""
from dataclasses import replace

import pytest
import torch
import torch._dynamo

from megalite.config import ConfigError, ModelConfig, load_config, validate
from megalite.model import Transformer, TransformerBlock
from megalite.model import compiled as compiled_mod
from megalite.model.compiled import compile_blocks, compile_problem, is_compiled
from megalite.preflight import check_compile
from megalite.train import Trainer
from tests.tolerance import assert_close
from tests.training_helpers import step_metrics, tiny_overrides

RTOL, ATOL_FRAC = 1e-4, 1e-5  # see the module docstring
VOCAB = 40
TINY = ModelConfig(vocab_size=VOCAB, pad_vocab_to=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_seq_len=16)

# the tests that compile need Inductor's CPU toolchain (a C++ compiler); the reason says what is missing
needs_compile = pytest.mark.skipif(compile_problem("cpu") is not None,
                                   reason=f"torch.compile cannot run here: {compile_problem('cpu')}")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts its own graphs and graph breaks."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _tokens(b=2, s=12, seed=0):
    return torch.randint(0, VOCAB, (b, s + 1), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(model, tokens):
    loss = model.loss(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _graphs_and_breaks() -> tuple[int, dict]:
    counters = torch._dynamo.utils.counters
    return counters["stats"]["unique_graphs"], dict(counters["graph_break"])


@pytest.mark.slow
@needs_compile
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_compiled_blocks_match_eager_loss_and_every_gradient(mode):
    eager = Transformer(TINY, seed=4, activation_checkpointing=mode)
    comp = Transformer(TINY, seed=4, activation_checkpointing=mode, compile_blocks=True)
    blocks = [m for m in comp.modules() if isinstance(m, TransformerBlock)]
    assert len(blocks) == 2 and all(is_compiled(b) for b in blocks)
    assert not is_compiled(comp.blocks[0]) and not is_compiled(comp.blocks[-1])  # embedding, head stay eager
    assert list(comp.state_dict()) == list(eager.state_dict())  # in place: checkpoints keep their names
    for k, v in eager.state_dict().items():
        assert torch.equal(comp.state_dict()[k], v), k

    tokens = _tokens()
    loss, grads = _loss_and_grads(eager, tokens)
    assert _graphs_and_breaks() == (0, {})
    loss_c, grads_c = _loss_and_grads(comp, tokens)
    # the blocks really ran compiled: Dynamo captured one graph (both blocks share it) with no graph
    # break, so nothing (e.g. a checkpointed region) silently fell back to eager
    graphs, breaks = _graphs_and_breaks()
    assert graphs == 1 and not breaks, (graphs, list(breaks)[:1])
    assert_close(loss_c, loss, rtol=RTOL, atol_frac=ATOL_FRAC, what=f"{mode} loss")
    assert grads_c.keys() == grads.keys()
    for name, g in grads.items():
        assert grads_c[name] is not None, name
        assert_close(grads_c[name], g, rtol=RTOL, atol_frac=ATOL_FRAC, what=f"{mode} grad {name}")


def test_config_field_defaults_off_and_dropout_is_refused():
    cfg = load_config("tiny", ["model.dropout=0.1"])
    assert cfg.train.compile is False
    validate(cfg)  # dropout alone is fine
    with pytest.raises(ConfigError, match=r"train.compile=True needs model.dropout=0 \(got 0.1\)"):
        validate(load_config("tiny", ["model.dropout=0.1", "train.compile=true"]))
    for mode in ("none", "selective", "full"):  # every checkpointing mode composes
        validate(load_config("tiny", ["train.compile=true", f"train.activation_checkpointing={mode}"]))
    with pytest.raises(ValueError, match="train.compile=true needs model.dropout=0"):
        Transformer(replace(TINY, dropout=0.1), compile_blocks=True)  # a model built in code
    with pytest.raises(ConfigError, match="train.compile=True does not work with parallel.sequence_parallel=True"):
        validate(load_config("tiny", ["train.compile=true", "parallel.tp=2", "parallel.sequence_parallel=true"]))


def test_unsupported_python_or_toolchain_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(compiled_mod, "compile_unsupported", lambda: "Python 3.99 not yet supported")
    with pytest.raises(RuntimeError, match="train.compile=true needs torch.compile.*3.99.*train.compile=false"):
        compile_blocks(Transformer(TINY))
    errors = []
    check_compile(load_config("tiny", ["train.compile=true", "train.device=cpu"]), errors.append)
    assert len(errors) == 1 and "3.99" in errors[0] and "train.compile=false" in errors[0], errors
    errors.clear()
    check_compile(load_config("tiny", ["train.device=cpu"]), errors.append)  # off: nothing is checked
    assert errors == []


def _pp_run(prefix, run_dir, compile_):
    import torch.distributed as dist

    from megalite.train import build_groups

    torch._dynamo.reset()
    cfg = load_config("tiny", tiny_overrides(prefix, run_dir, steps=2, **{
        "train.compile": compile_, "parallel.pp": 2, "checkpoint.interval": 0}))
    trainer = Trainer(cfg, build_groups(cfg, dist.get_world_size()))
    trainer.fit()
    compiled = [is_compiled(m) for m in trainer.model.modules() if isinstance(m, TransformerBlock)]
    return (step_metrics(run_dir) if dist.get_rank() == 0 else None), compiled


@pytest.mark.slow
@needs_compile
def test_pp2_trainer_with_train_compile_matches_eager(counting_data, tmp_path, spawn):
    eager = spawn(_pp_run, 2, counting_data, str(tmp_path / "eager"), False)
    comp = spawn(_pp_run, 2, counting_data, str(tmp_path / "compiled"), True)
    assert [c for _, c in comp] == [[True], [True]]  # one transformer block per stage, compiled
    losses, losses_c = eager[0][0], comp[0][0]
    assert sorted(losses_c) == sorted(losses) == [1, 2]
    assert_close(torch.tensor([losses_c[s] for s in (1, 2)]), torch.tensor([losses[s] for s in (1, 2)]),
                 rtol=RTOL, atol_frac=ATOL_FRAC, what="pp=2 per-step loss")
