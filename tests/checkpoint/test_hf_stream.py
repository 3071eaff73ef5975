"""Streaming Hugging Face export and import: tensor by tensor, rank file by rank file, memory bounded.

The memory proofs instrument the readers: every tensor CheckpointReader.read
(export) or HFTensors (import) hands out is counted (its storage bytes) until it
is garbage collected, and so is every rank shard an import cuts. An export that
consolidated the model first, or an import that converted it first, would hold
every tensor at once (peak = the whole model); the streamed ones hold at most
one output file plus one tensor. tools/bench_import_memory.py measures the
import's peak RSS at Llama-3.2-1B shapes.
"""
import json
import weakref

import pytest
import torch

from megalite.checkpoint import CheckpointError
from megalite.checkpoint.consolidate import consolidate_fp32
from megalite.checkpoint.hf import export_hf, import_hf, megalite_to_hf
from megalite.checkpoint.reader import CheckpointReader
from megalite.config import load_config
from tests.checkpoint.test_hf import hf_logits, ours, write_ckpt
from tests.tolerance import assert_close

transformers = pytest.importorskip("transformers")
RTOL, ATOL_FRAC = 1e-5, 1e-5  # fp32 logits of two implementations, as in test_hf
# 8 layers so the model (~1.3 MB fp32) is many times one output file plus one tensor
DEEP = ["model.vocab_size=100", "model.hidden_size=64", "model.num_layers=8", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=128", "model.max_seq_len=32"]


class LiveBytes:
    """Bytes of the tensors `owner.name` (default CheckpointReader.read) returned that are still alive: now,
    at peak, in total."""

    def __init__(self, monkeypatch, owner=CheckpointReader, name: str = "read"):
        self.live = self.peak = self.total = 0
        self.largest = 0
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            t = original(*args, **kwargs)
            n = t.untyped_storage().nbytes()  # a padding-stripped view keeps its whole table alive
            self.live, self.total, self.largest = self.live + n, self.total + n, max(self.largest, n)
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)
            return t

        monkeypatch.setattr(owner, name, counted)

    def _free(self, n: int) -> None:
        self.live -= n


@pytest.fixture
def tp2_pp2_ckpt(tmp_path):
    """A tp=2 x pp=2 checkpoint (4 rank files) of a random 8-layer Llama-style model, and that model."""
    cfg, model = write_ckpt(tmp_path / "tp1", DEEP)
    export_hf(tmp_path / "tp1", tmp_path / "hf1")
    import_hf(tmp_path / "hf1", tmp_path / "tp2pp2", ["parallel.tp=2", "parallel.pp=2"])
    assert len(list((tmp_path / "tp2pp2").glob("step_*/rank_*.safetensors"))) == 4
    return tmp_path / "tp2pp2", model


def test_tp2_pp2_export_streams_with_bounded_memory(tmp_path, tp2_pp2_ckpt, monkeypatch):
    ckpt, model = tp2_pp2_ckpt
    model_bytes = sum(t.numel() * 4 for t in consolidate_fp32(ckpt, strip_padding=True).values())
    meter = LiveBytes(monkeypatch)  # installed after consolidate_fp32, which reads (and holds) the whole model
    max_shard = 100_000
    export_hf(ckpt, tmp_path / "hf", max_shard_bytes=max_shard)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(files) >= 10 and sorted(set(index["weight_map"].values())) == files
    assert all((tmp_path / "hf" / f).stat().st_size <= max_shard + 64_000 for f in files)  # + one tensor, header
    assert meter.total >= model_bytes  # every tensor went through the instrumented reader
    assert meter.peak <= max_shard + meter.largest, (meter.peak, max_shard, meter.largest)
    assert meter.peak * 5 < model_bytes, (meter.peak, model_bytes)  # far from holding the whole model
    tokens = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    assert_close(hf_logits(tmp_path / "hf", tokens), ours(model, tokens), RTOL, ATOL_FRAC, "HF logits")


def test_streamed_bf16_export_equals_cast_of_the_full_state(tmp_path, tp2_pp2_ckpt):
    from safetensors.torch import load_file

    ckpt, _ = tp2_pp2_ckpt
    export_hf(ckpt, tmp_path / "hf", max_shard_bytes=50_000, dtype="bf16")
    got = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    cfg = load_config(str(ckpt / "config.yaml"))
    want = dict(megalite_to_hf(consolidate_fp32(ckpt, strip_padding=True), cfg.model))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor.to(torch.bfloat16)), name


def test_reader_names_a_missing_rank_file_and_a_wrong_config(tmp_path, tp2_pp2_ckpt):
    ckpt, _ = tp2_pp2_ckpt
    wrong = load_config(str(ckpt / "config.yaml"), ["model.num_layers=9"])
    from megalite.config import save_config

    save_config(wrong, tmp_path / "wrong.yaml")
    with pytest.raises(CheckpointError, match=r"'blocks\.9\..*' is missing"):
        export_hf(ckpt, tmp_path / "out", config=str(tmp_path / "wrong.yaml"))
    next(ckpt.glob("step_*/rank_00003.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="rank_00003.safetensors is missing"):
        export_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_zero3_tp2_dp2_export_streams_the_consolidated_model(counting_data, tmp_path, spawn, monkeypatch):
    """ZeRO-3 keeps each parameter only as dp slices of fp32 masters; the reader joins one at a time."""
    pytest.importorskip("deepspeed")
    from tests.engine.test_deepspeed import _train, zero

    spawn(_train, 4, counting_data, str(tmp_path / "z3"), zero(3, **{"parallel.tp": 2, "checkpoint.interval": 0}),
          steps=1)
    ckpt = tmp_path / "z3" / "checkpoints"
    full = consolidate_fp32(ckpt, strip_padding=True)
    reader = CheckpointReader(ckpt)
    assert sorted(reader.names()) == sorted(full)
    for name, tensor in full.items():
        assert torch.equal(reader.read(name), tensor), name
    meter = LiveBytes(monkeypatch)
    export_hf(ckpt, tmp_path / "hf", max_shard_bytes=20_000)
    # one output file (at most 20 KB, or one tensor when a tensor is larger) plus the tensor being read
    assert meter.peak <= max(20_000, meter.largest) + meter.largest, (meter.peak, meter.largest)
    from safetensors.torch import load_file

    got = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    want = dict(megalite_to_hf(full, load_config(str(tmp_path / "z3" / "config.yaml")).model))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_tp2_pp2_import_streams_rank_file_by_rank_file(tmp_path, monkeypatch):
    """Each HF tensor is read only while the one megalite tensor made from it is cut, and each rank's
    shards are written before the next rank's are made: never the whole model, never a whole stage."""
    from megalite.checkpoint import layout
    from megalite.checkpoint.hf_files import HFTensors

    write_ckpt(tmp_path / "tp1", DEEP)
    export_hf(tmp_path / "tp1", tmp_path / "hf")
    model_bytes = (tmp_path / "hf" / "model.safetensors").stat().st_size
    hf_reads = LiveBytes(monkeypatch, HFTensors, "__getitem__")
    shards = LiveBytes(monkeypatch, layout, "take_shard")
    import_hf(tmp_path / "hf", tmp_path / "tp2pp2", ["parallel.tp=2", "parallel.pp=2"])
    files = [f.stat().st_size for f in (tmp_path / "tp2pp2").glob("step_*/rank_*.safetensors")]
    assert len(files) == 4 and hf_reads.total >= model_bytes * 0.99  # every tensor read (tp times, the shards)
    assert hf_reads.peak <= 3 * hf_reads.largest, (hf_reads.peak, hf_reads.largest)  # at most q, k and v at once
    assert hf_reads.peak * 5 < model_bytes, (hf_reads.peak, model_bytes)
    # the shards alive at once are at most one rank file's (which also holds RNG state and a header)
    assert shards.peak <= max(files) < 2 * min(files), (shards.peak, files)


def test_bf16_import_holds_the_exact_fp32_upcast(tmp_path, tp2_pp2_ckpt):
    """Cut in the files' dtype, cast per shard: the imported fp32 weights are the bf16 values exactly."""
    ckpt, _ = tp2_pp2_ckpt
    export_hf(ckpt, tmp_path / "hf16", dtype="bf16")
    import_hf(tmp_path / "hf16", tmp_path / "back", ["parallel.tp=2", "parallel.pp=2"])
    got, want = consolidate_fp32(tmp_path / "back"), consolidate_fp32(ckpt)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor.to(torch.bfloat16).float()), name


def test_asking_whether_a_tensor_is_there_reads_nothing(tmp_path):
    from safetensors.torch import save_file

    from megalite.checkpoint.hf_files import HFTensors

    save_file({"a": torch.ones(3), "b": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    tensors = HFTensors(tmp_path)  # the index comes from the header
    (tmp_path / "model.safetensors").unlink()  # so a read now fails
    assert "a" in tensors and "b" in tensors and "c" not in tensors
    with pytest.raises(OSError):
        tensors["a"]
