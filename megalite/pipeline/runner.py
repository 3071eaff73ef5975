"""One global batch through the schedule: the trainer's one training path, for every pp.

`PipelineRunner` turns a list of micro-batches into a schedule run on this rank's model (pp=1:
the whole model as a one-stage pipeline, whose schedule is the gradient-accumulation loop F, B,
F, B, ...), sums the tied-embedding gradients over the first and last stage, and shares the
per-micro-batch losses (known on the last stage only) with the whole pipeline so every rank logs
the same numbers.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from megalite.kernels.ring_attention import load_balanced_chunks
from megalite.model import Transformer
from megalite.model.moe import summarize
from megalite.pipeline.executor import Executor, StageHooks
from megalite.pipeline.p2p import P2P
from megalite.pipeline.partition import tie_embedding_grads
from megalite.pipeline.schedules import schedule_steps


def schedule_kind(name: str, virtual_stages: int) -> str:
    """The schedule to run: '1f1b' with virtual stages means interleaved 1F1B."""
    return "interleaved" if name == "1f1b" and virtual_stages > 1 else name


class PipelineRunner:
    """Runs training and evaluation batches of `micro_batches` micro-batches through the schedule.

    `groups` is the ProcessGroups object; `engine` provides `backward(loss)` (loss scaling);
    `context` wraps every forward (autocast); `seq_len`, `micro_batch` and `dtype` (the compute
    dtype: 16-bit under autocast) describe the boundary tensors [s (/tp under SP), b, h] a
    pipeline sends and receives, activations forward and their gradients backward. A batch dict
    holds "tokens" [b, s + 1] and, for packed samples with data.reset_attention_mask, "doc_ids"
    [b, s] of the inputs, which every stage reads from the batch itself rather than receiving them over p2p.
    Under context parallelism every cp rank gets the same batches and takes its load-balanced chunks of
    inputs, labels and doc ids here; its loss is the mean over its share of the tokens (equal shares:
    the mean over cp of these is the sequence's mean), and the losses returned are averaged over cp.
    """

    def __init__(self, model: Transformer, groups, engine, micro_batches: int, seq_len: int, micro_batch: int,
                 schedule: str = "1f1b", device: torch.device | str = "cpu", context=nullcontext,
                 dtype: torch.dtype = torch.float32):
        topo, self.groups, self.model, self.engine = groups.topology, groups, model, engine
        self.pp, self.stage, self.v, self.m = groups.pp_size, groups.pp_rank, topo.virtual_stages, micro_batches
        self.kind, self.device, self.context = schedule_kind(schedule, self.v), torch.device(device), context
        # fail now, not at the first step: the schedule checks (pp, m, v) and names the fix
        self.train_steps = schedule_steps(self.kind, self.pp, self.stage, self.m, self.v)
        self.eval_steps = schedule_steps(self.kind, self.pp, self.stage, self.m, self.v, forward_only=True)
        self.p2p = None if self.pp == 1 else self._p2p(seq_len, micro_batch, dtype)
        self.last_peak_stashed = 0

    def set_micro_batches(self, m: int) -> None:
        """Run `m` micro-batches per batch from now on (train.rampup_batch_size changes the batch)."""
        if m != self.m:
            self.m = m
            self.train_steps = schedule_steps(self.kind, self.pp, self.stage, m, self.v)
            self.eval_steps = schedule_steps(self.kind, self.pp, self.stage, m, self.v, forward_only=True)

    def _boundary_shape(self, seq_len: int, micro_batch: int) -> tuple[int, int, int]:
        """[s (/cp) (/tp under SP), b, h] of the tensors crossing a stage boundary."""
        tp, cp = self.groups.tp_size, self.groups.cp_size
        split = cp * (tp if self.model.sequence_parallel else 1)
        if seq_len % split:
            raise ValueError(f"data.seq_len={seq_len} must be divisible by cp * tp (under sequence parallelism) = "
                             f"{split}")
        return seq_len // split, micro_batch, self.model.cfg.hidden_size

    def _p2p(self, seq_len: int, micro_batch: int, dtype: torch.dtype) -> P2P:
        groups, topo = self.groups, self.groups.topology
        c = groups.coords
        self.last_rank = topo.rank(tp=c.tp, pp=self.pp - 1, dp=c.dp, cp=c.cp)
        p2p = P2P(groups.prev_rank, groups.next_rank, self._boundary_shape(seq_len, micro_batch),
                  dtype, self.device, self.pp, groups.pp_group)
        # batched p2p must not be the first call on a NCCL group unless every rank joins it: one
        # collective over the pipeline group first sets its communicator up on all of them
        dist.all_reduce(torch.zeros(1, device=self.device), group=groups.pp_group)
        return p2p

    def _share(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s] -> this rank's [b, s / cp]: its load-balanced chunks under context parallelism."""
        cp = self.groups.cp_size
        x = x if cp == 1 else load_balanced_chunks(x, cp, self.groups.cp_rank, dim=1)
        return x.to(self.device, non_blocking=True)

    def _hooks(self, batches: list[dict], training: bool) -> StageHooks:
        def first_input(mb: int) -> torch.Tensor:
            return self._share(batches[mb]["tokens"][:, :-1])  # [b, s (/cp)]

        def loss(mb: int, logits: torch.Tensor) -> torch.Tensor:
            labels = self._share(batches[mb]["tokens"][:, 1:])  # [b, s (/cp)]
            mean = self.model.loss_from_logits(logits, labels).mean()
            return mean / self.m if training else mean  # training: the batch's mean is the sum of these

        def forward_kwargs(mb: int) -> dict:
            doc_ids = batches[mb].get("doc_ids")
            return {} if doc_ids is None else {"doc_ids": self._share(doc_ids)}

        def forward(chunk: int, x: torch.Tensor, **kwargs) -> torch.Tensor:
            return self.model(x, chunk=chunk, **kwargs)

        return StageHooks(forward=forward, first_input=first_input, loss=loss, backward_loss=self.engine.backward,
                          context=self.context, forward_kwargs=forward_kwargs)

    def _run(self, batches: list[dict], training: bool) -> torch.Tensor:
        """The m micro-batch losses [m] on every pipeline rank."""
        if len(batches) != self.m:
            raise ValueError(f"the pipeline was set up for {self.m} micro-batches, got {len(batches)}")
        if self.p2p is not None:  # a sequence-length warm-up changes [s, b] (not s * b) from step to step
            tokens = batches[0]["tokens"]
            self.p2p.shape = self._boundary_shape(tokens.shape[1] - 1, tokens.shape[0])
        executor = Executor(self._hooks(batches, training), self.p2p, self.stage, self.pp, self.v)
        stats = executor.run(self.train_steps if training else self.eval_steps, forward_only=not training)
        self.last_peak_stashed = stats.peak_stashed
        losses = torch.zeros(self.m, device=self.device)
        for mb, value in stats.losses.items():  # only the last stage has any
            losses[mb] = value.float()
        if self.pp > 1:
            dist.broadcast(losses, src=self.last_rank, group=self.groups.pp_group)
        if self.groups.cp_size > 1:  # each cp rank's loss is over its share: the micro-batch's is their mean
            dist.all_reduce(losses, group=self.groups.cp_group)
            losses /= self.groups.cp_size
        return losses

    def train_batch(self, batches: list[dict]) -> torch.Tensor:
        """Forward and backward of one global batch's micro-batches; gradients are left for the engine's step.

        Returns the batch's mean loss (the sum over micro-batches of loss / m) on every pipeline rank.
        """
        # MoE layers feed their auxiliary losses' gradients in themselves (model.moe.AddAuxLossGrad): at the
        # scale backward gives the language-model loss of one micro-batch
        self.model.moe_state.grad_scale = float(getattr(self.engine, "loss_scale", 1.0)) / self.m
        self.model.moe_state.take_stats()  # what an evaluation left
        total = torch.zeros((), device=self.device)
        for value in self._run(batches, training=True):
            total += value
        tie_embedding_grads(self.model, self.groups.embedding_group)
        return total

    @torch.no_grad()
    def eval_batch(self, batches: list[dict]) -> torch.Tensor:
        """The mean loss of each micro-batch [m], forward only, on every pipeline rank."""
        return self._run(batches, training=False)

    def moe_metrics(self) -> dict:
        """The last training batch's MoE metrics (model.moe.summarize) over every layer of the model and
        every micro-batch of the step, gathered from the pipeline stages and dp replicas; {} when dense."""
        if not self.model.cfg.moe_num_experts:
            return {}
        stats = self.model.moe_state.take_stats()
        for size, group in ((self.pp, self.groups.pp_group), (self.groups.dp_size, self.groups.dp_group)):
            if size > 1:  # stages hold other layers; replicas other micro-batches of the same layers
                every: list = [None] * size
                dist.all_gather_object(every, stats, group=group)
                stats = {layer: [row for part in every for row in part.get(layer, [])]
                         for layer in sorted({layer for part in every for layer in part})}
        return summarize(stats)
