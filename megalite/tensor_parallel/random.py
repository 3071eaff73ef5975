"""A second random stream for dropout inside tensor-parallel regions.

Two kinds of dropout live in a tensor-parallel model:

- On replicated activations (the residual stream without sequence
  parallelism) every tp rank must draw the SAME mask, or the replicas drift
  apart. That dropout uses torch's default generator, which every rank
  seeds identically (`rng.seed_everything`).
- On sharded activations (attention probabilities of this rank's heads; the
  residual stream's sequence chunk under sequence parallelism) every tp rank
  must draw a DIFFERENT mask, or the shards share one pattern. That dropout
  runs inside `tracker.fork()`, which swaps in a generator seeded with
  seed + 2718 + tp_rank (Megatron's offset) and swaps it back out after.

The tracker is a value the model owns (`Transformer.rng_tracker`), not a
global. Its state is part of a resumable run: `get_state()` / `set_state()`
go in the checkpoint next to the default generators. Activation
checkpointing must replay the tracker too; `checkpoint_context()` gives the
pair of context managers torch.utils.checkpoint's `context_fn` expects.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

TP_SEED_OFFSET = 2718


class TPRngTracker:
    """Holds the tensor-parallel random stream (CPU, and CUDA once CUDA is in use) of one tp rank."""

    def __init__(self, seed: int, tp_rank: int = 0):
        if seed < 0 or tp_rank < 0:
            raise ValueError(f"seed={seed} and tp_rank={tp_rank} must both be >= 0")
        self.seed = seed + TP_SEED_OFFSET + tp_rank
        self._cpu = torch.Generator(device="cpu").manual_seed(self.seed).get_state()
        self._cuda: torch.Tensor | None = None  # drawn lazily: CUDA may not exist or be initialised yet

    @staticmethod
    def _cuda_active() -> bool:
        return torch.cuda.is_available() and torch.cuda.is_initialized()

    def _cuda_state(self) -> torch.Tensor:
        if self._cuda is None:
            outer = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(self.seed)
            self._cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(outer)
        return self._cuda

    @contextmanager
    def fork(self):
        """Run the body with the tracker's stream as the default generator (CPU and current CUDA device).

        The default generators are left exactly as they were, so code outside
        the fork draws the same numbers whether or not forks happened.
        """
        cuda = self._cuda_active()
        outer_cpu = torch.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state() if cuda else None
        torch.set_rng_state(self._cpu)
        if cuda:
            torch.cuda.set_rng_state(self._cuda_state())
        try:
            yield
        finally:
            self._cpu = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if cuda:
                self._cuda = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(outer_cuda)

    def get_state(self) -> dict:
        """{'seed', 'cpu'[, 'cuda']} as tensors and ints (checkpoint.state can flatten it)."""
        state = {"seed": self.seed, "cpu": self._cpu.clone()}
        if self._cuda is not None:
            state["cuda"] = self._cuda.clone()
        return state

    def set_state(self, state: dict) -> None:
        """Restore what `get_state` returned."""
        missing = {"seed", "cpu"} - set(state)
        if missing:
            raise KeyError(f"tp rng tracker state lacks {sorted(missing)}; expected what get_state() returns")
        self.seed = int(state["seed"])
        self._cpu = state["cpu"].clone()
        self._cuda = state["cuda"].clone() if "cuda" in state else None

    def checkpoint_context(self):
        """(forward_ctx, recompute_ctx) for torch.utils.checkpoint(context_fn=...).

        The forward context snapshots the tracker; the recompute context
        rewinds it to that snapshot, so recomputed dropout draws the same
        masks, then puts back the state the forward pass left, so later
        draws are the same as without checkpointing.
        """
        snapshot = {}

        @contextmanager
        def forward_ctx():
            snapshot["state"] = self.get_state()
            yield

        @contextmanager
        def recompute_ctx():
            after = self.get_state()
            self.set_state(snapshot["state"])
            try:
                yield
            finally:
                self.set_state(after)

        return forward_ctx(), recompute_ctx()
