"""One global batch through the pipeline: the trainer's pp > 1 path.

`PipelineRunner` turns a list of micro-batches into a schedule run on this
rank's StageModel, sums the tied-embedding gradients over the first and last
stage, and broadcasts the loss (known on the last stage only) to the whole
pipeline so every rank logs the same number.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from megalite.kernels.attention import document_ids
from megalite.pipeline.executor import Executor, StageHooks
from megalite.pipeline.p2p import P2P
from megalite.pipeline.partition import StageModel, tie_embedding_grads
from megalite.pipeline.schedules import schedule_steps


def schedule_kind(name: str, virtual_stages: int) -> str:
    """The schedule to run: '1f1b' with virtual stages means interleaved 1F1B."""
    return "interleaved" if name == "1f1b" and virtual_stages > 1 else name


class PipelineRunner:
    """Runs training and evaluation batches of `micro_batches` micro-batches through the pipeline.

    `groups` is the ProcessGroups object; `engine` provides `backward(loss)`
    (loss scaling); `context` wraps every forward (autocast); `seq_len`,
    `micro_batch` size the boundary tensors [s (/tp under SP), b, h].
    `eod` (data.reset_attention_mask): every stage masks attention at the
    documents its micro-batch's tokens delimit with this id; None: plain causal.
    """

    def __init__(self, model: StageModel, groups, engine, micro_batches: int, seq_len: int, micro_batch: int,
                 schedule: str = "1f1b", device: torch.device | str = "cpu", context=nullcontext,
                 eod: int | None = None):
        topo, self.groups, self.model, self.engine = groups.topology, groups, model, engine
        self.eod = eod
        self.pp, self.stage, self.v, self.m = groups.pp_size, groups.pp_rank, topo.virtual_stages, micro_batches
        self.kind, self.device, self.context = schedule_kind(schedule, self.v), torch.device(device), context
        # fail now, not at the first step: the schedule checks (pp, m, v) and names the fix
        self.train_steps = schedule_steps(self.kind, self.pp, self.stage, self.m, self.v)
        self.eval_steps = schedule_steps(self.kind, self.pp, self.stage, self.m, self.v, forward_only=True)
        s = seq_len // groups.tp_size if model.sequence_parallel else seq_len
        if model.sequence_parallel and seq_len % groups.tp_size:
            raise ValueError(f"data.seq_len={seq_len} must be divisible by tp={groups.tp_size} "
                             "under sequence parallelism")
        c = groups.coords
        self.last_rank = topo.rank(tp=c.tp, pp=self.pp - 1, dp=c.dp)
        self.p2p = P2P(groups.prev_rank, groups.next_rank, (s, micro_batch, model.cfg.hidden_size),
                       torch.float32, self.device, self.pp, groups.pp_group)
        # batched p2p must not be the first call on a NCCL group unless every rank joins it: one
        # collective over the pipeline group first sets its communicator up on all of them
        dist.all_reduce(torch.zeros(1, device=self.device), group=groups.pp_group)

    def _hooks(self, batches: list[dict], scale: float) -> StageHooks:
        tokens = [b["tokens"] for b in batches]  # [b, s + 1] each; every stage reads the same batches

        def first_input(mb: int) -> torch.Tensor:
            return tokens[mb][:, :-1].to(self.device, non_blocking=True)  # [b, s]

        def loss(mb: int, logits: torch.Tensor) -> torch.Tensor:
            labels = tokens[mb][:, 1:].to(self.device, non_blocking=True)  # [b, s]
            return self.model.loss_from_logits(logits, labels).mean() * scale

        def forward_kwargs(mb: int) -> dict:
            return {} if self.eod is None else {"doc_ids": document_ids(first_input(mb), self.eod)}

        return StageHooks(forward=self.model.forward, first_input=first_input, loss=loss,
                          backward_loss=self.engine.backward, context=self.context, forward_kwargs=forward_kwargs)

    def _run(self, batches: list[dict], forward_only: bool, scale: float) -> torch.Tensor:
        if len(batches) != self.m:
            raise ValueError(f"the pipeline was set up for {self.m} micro-batches, got {len(batches)}")
        executor = Executor(self._hooks(batches, scale), self.p2p, self.stage, self.pp, self.v)
        stats = executor.run(self.eval_steps if forward_only else self.train_steps, forward_only)
        self.last_peak_stashed = stats.peak_stashed
        total = torch.zeros((), device=self.device)
        for value in stats.losses.values():  # only the last stage has any
            total += value.float()
        dist.broadcast(total, src=self.last_rank, group=self.groups.pp_group)
        return total

    def train_batch(self, batches: list[dict]) -> torch.Tensor:
        """Forward and backward of one global batch's micro-batches; gradients left for the engine's step.

        Returns sum over micro-batches of loss / m (the batch's mean loss) on every pipeline rank.
        """
        total = self._run(batches, forward_only=False, scale=1.0 / self.m)
        tie_embedding_grads(self.model, self.groups.embedding_group)
        return total

    @torch.no_grad()
    def eval_batch(self, batches: list[dict]) -> torch.Tensor:
        """Sum over the micro-batches of their mean loss, forward only, on every pipeline rank."""
        return self._run(batches, forward_only=True, scale=1.0)
