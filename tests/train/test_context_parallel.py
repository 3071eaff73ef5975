"""Context parallelism end to end: every layout with cp reproduces the one-process loss curve.

The model is the tiny preset's shape shrunk (tests.training_helpers.tiny_overrides), trained 20 fp32
steps on packed documents of 3 to 20 tokens (so documents cross the 2 * cp chunk boundaries of a
32-token sequence, and one-token pieces of a document sit at chunk ends), once with plain causal
attention and once with data.reset_attention_mask (documents masked across chunks and ranks).

Tolerance: rel 5e-6 on loss and grad norm at every step. Ring attention combines blocks by
rescaling and dp x cp reduces gradients in another order, so an fp32 step differs by a few ulps:
observed at most 2.3e-7 relative over the 20 steps of every layout here (another CPU's BLAS may
order sums differently again: the golden curves allow for ~1e-6), so 5e-6 leaves 20x. What it
catches, each tried: gradients averaged over dp only (not dp x cp) moves the grad norm by 20% at
step 1; documents unmasked under cp the loss by 2e-4 at step 1; rotary at local instead of global
positions the grad norm by 3.4e-5 at step 2 (on this small random model attention is nearly
uniform at first, so positions weigh little).
"""
import pytest
import torch.distributed as dist

from megalite.checkpoint import latest_checkpoint
from megalite.checkpoint.reader import CheckpointReader
from megalite.config import load_config
from megalite.kernels.ring_attention import training_bytes_per_rank
from megalite.train import Trainer, build_groups
from tests.model.test_document_mask import eod_corpus  # noqa: F401 - the packed-documents fixture
from tests.training_helpers import step_metrics, tiny_overrides

STEPS, RTOL = 20, 5e-6
BOTH, MASKED = (False, True), (True,)  # data.reset_attention_mask values a layout is trained with
LAYOUTS = {  # name -> (world size, overrides, masks); the five layouts with and without masks
    "cp2": (2, {"parallel.cp": 2}, BOTH),
    "cp4": (4, {"parallel.cp": 4}, BOTH),
    "cp2_tp2_sp": (4, {"parallel.cp": 2, "parallel.tp": 2, "parallel.sequence_parallel": True}, BOTH),
    "cp2_pp2": (4, {"parallel.cp": 2, "parallel.pp": 2}, BOTH),
    "cp2_dp2_zero1": (4, {"parallel.cp": 2, "engine.backend": "deepspeed", "engine.zero_stage": 1}, BOTH),
    # and, masked only (it adds the most): the native engine's overlapped reduction over dp x cp,
    "cp2_dp2": (4, {"parallel.cp": 2}, MASKED),
    # layer 1 with a 12-token sliding window, layer 2 global: windows cross chunk and rank boundaries,
    "cp2_window": (2, {"parallel.cp": 2, "model.attention_window": 12, "model.global_attention_every": 2}, MASKED),
    # four layers, so that two pipeline ranks hold two chunks each (compared with its own one-process run)
    "cp2_pp2_interleaved": (4, {"parallel.cp": 2, "parallel.pp": 2, "parallel.virtual_stages": 2,
                                "parallel.schedule": "interleaved", "model.num_layers": 4}, MASKED),
}
MODEL_KEYS = ("model.num_layers", "model.attention_window", "model.global_attention_every")  # the reference's too


def _curves(prefix, tokenizer, run_dir, extra: dict, resets=BOTH) -> dict:
    """Plain causal and then document-masked training (reset False, True), each seen from rank 0 (other ranks:
    {}): {reset: {step: (loss, grad_norm)}, ("weights", reset): the final checkpoint's full tensors,
    ("cp bytes", reset): the set of comm_cp_send_bytes figures over the steps}."""
    out = {}
    for reset in resets:
        where = f"{run_dir}/reset_{reset}"
        cfg = load_config("tiny", tiny_overrides(prefix, where, steps=STEPS, **{
            "data.tokenizer_type": "HuggingFaceTokenizer", "data.tokenizer_model": tokenizer,
            "data.reset_attention_mask": str(reset).lower(), "checkpoint.interval": 0, **extra}))
        world = dist.get_world_size() if dist.is_initialized() else 1
        trainer = Trainer(cfg, build_groups(cfg, world))
        trainer.fit()
        if trainer.rank == 0:
            out[reset] = step_metrics(where, "loss", "grad_norm")
            out["weights", reset] = _final_weights(trainer.ckpt_dir)
            out["cp bytes", reset] = set(step_metrics(where, "comm_cp_send_bytes").values()) if world > 1 else None
    return out


def _final_weights(root) -> dict:
    """Every full tensor of the run's last checkpoint, read at whatever layout (and ZeRO slices) wrote it."""
    reader = CheckpointReader(latest_checkpoint(root))
    return {name: reader.read(name) for name in reader.names()}


@pytest.fixture(scope="module")
def one_process(eod_corpus, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """The one-process curves of a model (by its overrides), each trained once for the module."""
    made = {}

    def curves(model: dict, resets) -> dict:
        key = (tuple(sorted(model.items())), resets)
        if key not in made:
            made[key] = _curves(*eod_corpus, str(tmp_path_factory.mktemp("cp_reference")), model, resets)
        return made[key]
    return curves


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_with_cp_reproduces_the_one_process_curve(name, eod_corpus, one_process, tmp_path, spawn):  # noqa: F811
    world, extra, resets = LAYOUTS[name]
    got = spawn(_curves, world, *eod_corpus, str(tmp_path / name), extra, resets)[0]
    reference = one_process({k: v for k, v in extra.items() if k in MODEL_KEYS}, resets)
    if resets == BOTH:  # the mask matters on this corpus: the curves part by 50x the tolerance (1.5e-3 by step 20)
        plain, masked = reference[False], reference[True]
        assert max(abs(masked[s][0] - plain[s][0]) / plain[s][0] for s in plain) > 1e-3
    # what ring attention sent on rank 0 each step: per layer of its stage and micro-batch, k/v (and the
    # int32 doc ids of data.documents) twice and the fp32 dk/dv once around the ring (its docstring)
    cfg = load_config("tiny", tiny_overrides("x", "y", **extra))
    p, t, m = cfg.parallel, cfg.train, cfg.model
    dp, kv_heads = world // (p.tp * p.cp * p.pp), m.num_kv_heads // p.tp
    per_layer = {reset: training_bytes_per_rank(cfg.data.seq_len, p.cp, t.micro_batch_size, kv_heads,
                                                m.hidden_size // m.num_heads, 4, 4 if reset else 0)
                 for reset in resets}
    layers, micro_batches = m.num_layers // p.pp, t.global_batch_size // (t.micro_batch_size * dp)
    for reset, one in per_layer.items():
        assert got["cp bytes", reset] == {layers * micro_batches * one}, (name, reset)
    for reset in resets:
        # the checkpoint after 20 steps, read back from this layout's rank files (dp x cp ZeRO slices
        # included), holds the one-process weights up to the curves' few-ulp differences, which AdamW
        # turns into larger ones on the elements whose gradient is ~0 (m / sqrt(v) of noise): so the
        # whole tensor's relative distance, bounded by 1e-4 (a slice put in the wrong place is O(1))
        want = reference["weights", reset]
        assert got["weights", reset].keys() == want.keys()
        for key, tensor in want.items():
            gap = (got["weights", reset][key] - tensor).norm() / tensor.norm()
            assert gap < 1e-4, (name, reset, key, float(gap))
    for reset in resets:
        want = reference[reset]
        assert got[reset].keys() == want.keys() == set(range(1, STEPS + 1))
        for step, (loss, norm) in want.items():
            assert got[reset][step][0] == pytest.approx(loss, rel=RTOL), f"{name} reset={reset} step {step} loss"
            assert got[reset][step][1] == pytest.approx(norm, rel=RTOL), f"{name} reset={reset} step {step} norm"
