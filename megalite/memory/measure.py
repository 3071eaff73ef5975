"""Exact byte counts of what autograd keeps for backward, measured on any device (the CPU included).

`SavedTensorBytes` wraps a forward pass in `torch.autograd.graph.saved_tensors_hooks` and records
every tensor autograd saves, deduplicated by storage: a view saved twice, or a slice of a larger
buffer, counts the whole buffer once, because that buffer is what stays alive until backward.
Parameters and buffers of the model (weights saved by the linears) are not activations and are left
out when their storages are passed as `exclude`.

`LiveSavedBytes` follows the same tensors over time: a storage counts while any graph still holds it,
so its peak is the activation memory of a whole schedule (several micro-batches in flight).
"""
from __future__ import annotations

import weakref
from collections import defaultdict

import torch


def _storage_key(t: torch.Tensor) -> tuple[int, str]:
    return t.untyped_storage().data_ptr(), str(t.device)


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def model_storages(*modules: torch.nn.Module) -> set[tuple[int, str]]:
    """Storage keys of every parameter and buffer of `modules` (weights are state, not activations)."""
    keys = set()
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            keys.add(_storage_key(t))
    return keys


class SavedTensorBytes:
    """Context manager: bytes of the distinct storages autograd saves inside it, by dtype.

    >>> with SavedTensorBytes(exclude=model_storages(model)) as saved:
    ...     loss = model(x).sum()
    >>> saved.total, saved.by_dtype   # bytes; {torch.bfloat16: ..., torch.float32: ...}
    """

    def __init__(self, exclude: set | None = None):
        self.exclude = exclude or set()
        self.storages: dict[tuple[int, str], tuple[int, torch.dtype]] = {}
        self._hooks = None
        self._keep: list[torch.Tensor] = []  # hold saved tensors so a freed storage's address is not reused

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self.exclude and key not in self.storages and t.device.type != "meta":
            self.storages[key] = (_storage_bytes(t), t.dtype)
            self._keep.append(t)
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._keep.clear()

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())

    @property
    def by_dtype(self) -> dict[torch.dtype, int]:
        out: dict[torch.dtype, int] = defaultdict(int)
        for n, dtype in self.storages.values():
            out[dtype] += n
        return dict(out)


class _Packed:
    """What the graph holds instead of a saved tensor; its death releases the storage's count."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class LiveSavedBytes:
    """Context manager: the peak, over its lifetime, of bytes held by autograd graphs for backward.

    A storage counts from the first time a graph saves it until the last graph holding it is
    freed (by backward, or by dropping the graph); model weights in `exclude` never count.
    """

    def __init__(self, exclude: set | None = None):
        self.exclude = exclude or set()
        self.refs: dict[tuple[int, str], int] = defaultdict(int)
        self.sizes: dict[tuple[int, str], int] = {}
        self.live = self.peak = 0
        self._hooks = None

    def _release(self, key) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key in self.exclude or t.device.type == "meta":
            return t
        if key not in self.refs:
            self.sizes[key] = _storage_bytes(t)
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        packed = _Packed(t)
        weakref.finalize(packed, self._release, key)
        return packed

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    def __enter__(self) -> LiveSavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


_COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _input(shape: tuple, precision: str) -> torch.Tensor:
    return torch.randn(shape).to(_COMPUTE_DTYPES[precision]).requires_grad_()


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=_COMPUTE_DTYPES[precision], enabled=precision != "fp32")


def block_saved_bytes(block: torch.nn.Module, shape: tuple, precision: str) -> int:
    """Bytes `block` saves for backward on one input of `shape` ([s, b, h] or SP's [s/tp, b, h]) in the
    compute dtype of `precision` (16-bit under autocast, as the trainer runs it; CPU)."""
    x = _input(shape, precision)
    with _autocast(precision), SavedTensorBytes(exclude=model_storages(block)) as saved:
        block(x)
    return saved.total


def per_token_and_fixed(block: torch.nn.Module, seq: int, hidden: int, precision: str,
                        tokens: int | None = None) -> tuple[float, int]:
    """(bytes per token, bytes per micro-batch whatever its size) `block` keeps for inputs [seq, b, hidden]:
    measured at micro-batch 1 and 2, the growth is what `tokens` tokens (default seq; under sequence
    parallelism the micro-batch's whole sequence, of which this rank holds seq) cost, the rest is fixed
    (16-bit weight copies, masks)."""
    one, two = (block_saved_bytes(block, (seq, b, hidden), precision) for b in (1, 2))
    tokens = tokens or seq
    per_token = (two - one) / tokens
    return per_token, round(one - per_token * tokens)


def replay_peak_bytes(chunks: list[torch.nn.Module], actions, shape: tuple, precision: str) -> int:
    """Peak bytes held for backward while running a pipeline rank's F/B `actions` (Action(op, mb,
    chunk), pipeline.schedules.compute_order) on its chunk modules in one process: inputs stand in for
    received activations and random gradients for received ones, so the peak is exactly what that
    order of forwards and backwards keeps alive at once."""
    exclude = model_storages(*chunks)
    stash = {}
    with LiveSavedBytes(exclude=exclude) as live:
        for a in actions:
            if a.op == "F":
                with _autocast(precision):
                    stash[a.mb, a.chunk] = chunks[a.chunk](_input(shape, precision))
            else:
                out = stash.pop((a.mb, a.chunk))
                out.backward(torch.randn_like(out))
                del out
    return live.peak


def _distinct_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if torch.is_tensor(t):
            seen.setdefault(_storage_key(t), _storage_bytes(t))
    return sum(seen.values())


def native_state_bytes(cfg) -> tuple[dict[str, int], int]:
    """({weights, gradients, optimizer}: bytes, parameters) the native engine holds for a one-process model
    of `cfg` (a full Config): weights any time, gradients after a backward, AdamW's state after the
    step, each storage once."""
    from megalite.engine.native import NativeEngine
    from megalite.model import Transformer

    model = Transformer(cfg.model)
    engine = NativeEngine(model, cfg.optim, cfg.train, total_steps=2, micro_batches=1)
    tokens = torch.randint(cfg.model.vocab_size, (2, 17))
    with _autocast(cfg.train.precision):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:]).mean()
    engine.backward(loss)
    params = list(model.parameters())
    out = {"weights": _distinct_bytes(params), "gradients": _distinct_bytes(p.grad for p in params)}
    engine.step()
    out["optimizer"] = _distinct_bytes(v for st in engine.optimizer.state.values() for v in st.values())
    return out, sum(p.numel() for p in params)
