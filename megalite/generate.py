"""Text generation from a megalite checkpoint: greedy or sampled decoding with a KV cache, on one device
or tensor-parallel over tp ranks.

`load_model` builds the model for a tp group (None: one device) and fills it
from a checkpoint of any layout (tp, pp, ZeRO), one tensor at a time: each full
tensor is read (checkpoint.reader), re-padded to this tp size's vocabulary and
cut to this rank's shard by the model's own sharding metadata. `generate` runs
the prompt once, then one token per step against each layer's KVCache
(model.blocks), so a step costs O(sequence) rather than O(sequence^2). With
tp > 1 each rank caches its own kv heads, the vocabulary-parallel logits are
all-gathered, and tp rank 0's token is broadcast, so every rank feeds the same
token next (all ranks also draw from identically seeded generators). The cached
path computes the same function as the training forward; tests compare it with
transformers' greedy `generate` on the exported model and tp=2 with tp=1.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megalite.checkpoint.io import CheckpointError, step_directory
from megalite.checkpoint.layout import pad_rows, run_config, take_shard
from megalite.checkpoint.reader import CheckpointReader
from megalite.data.tokenizer import build_tokenizer
from megalite.distributed import discover, init_distributed
from megalite.model import Transformer
from megalite.model.blocks import KVCache
from megalite.tensor_parallel import gather_from_tp_region, group_rank, group_size, shard_metadata
from megalite.topology import ProcessGroups, Topology


@torch.no_grad()
def load_model(checkpoint, config: str | None = None, device: str = "cpu", tp_group=None):
    """(model in eval mode, run Config) from a checkpoint root or step directory of any layout.

    With `tp_group` (size tp) every rank of the group calls this and gets its tp shard.
    """
    step = step_directory(checkpoint)
    cfg = run_config(step, config)
    reader = CheckpointReader(step)
    model = Transformer(cfg.model, tp_group=tp_group, seed=cfg.train.seed)
    tp, rank, params = group_size(tp_group), group_rank(tp_group), model.state_dict()
    for name, entry in shard_metadata(model, tp).items():  # independent of the layout that wrote it
        full = reader.read(name)
        if "valid_rows" in entry:  # the vocabulary table, padded for this tp size (padded rows are never used)
            full = pad_rows(full, entry["full_shape"][0])
        if list(full.shape) != entry["full_shape"]:
            raise CheckpointError(f"'{name}' has shape {list(full.shape)} in {step} but the run's config builds "
                                  f"{entry['full_shape']}; pass the config the checkpoint was trained with")
        params[name].copy_(take_shard(full, entry["partition_dim"], tp, rank))
    return model.to(device).eval(), cfg


def _embed(model: Transformer, tokens: torch.Tensor, offset: int) -> torch.Tensor:
    """tokens [b, s] at positions offset.. -> hidden [s, b, h] (learned positions shifted by offset)."""
    emb = model.blocks[0]
    x = emb.word(tokens.t())  # [b, s] -> [s, b, h] (vocabulary-parallel lookup, all-reduced over tp)
    if emb.position is not None:
        x = x + emb.position[offset: offset + tokens.shape[1]].unsqueeze(1)  # [s, h] -> [s, 1, h]
    return x


@torch.no_grad()
def _next_logits(model: Transformer, tokens: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
    """Logits [b, V] of the token after `tokens` [b, s], extending the caches by s positions."""
    x = _embed(model, tokens, caches[0].offset)
    for i, cache in enumerate(caches, start=1):
        block = model.blocks[i]
        x = block(x, kv_cache=cache)
    logits = model.blocks[-1](x[-1:])  # [1, b, Vp/tp]
    logits = gather_from_tp_region(logits, model.tp_group)  # -> [1, b, Vp], the same on every tp rank
    return logits[0, :, : model.cfg.vocab_size].float()


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [b] from logits [b, V]: argmax when temperature <= 0, else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))  # the top token is never dropped
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _check_args(cfg, prompt: list[int], max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if bad := [t for t in prompt if not 0 <= t < cfg.vocab_size]:
        raise ValueError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens={max_new_tokens} exceeds "
                         f"model.max_seq_len={cfg.max_seq_len}; shorten one of them")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or unset)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or unset)")


def _agree(token: torch.Tensor, tp_group) -> torch.Tensor:
    """tp rank 0's token on every tp rank, so the ranks' caches never diverge."""
    if group_size(tp_group) > 1:
        dist.broadcast(token, src=dist.get_global_rank(tp_group, 0), group=tp_group)
    return token


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eod: int | None = None) -> list[int]:
    """The new token ids after `prompt` (at most max_new_tokens; stops after emitting `eod`).

    A tensor-parallel model is driven by every rank of its tp group with the same arguments; all
    return the same tokens.
    """
    _check_args(model.cfg, prompt, max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    caches = [KVCache() for _ in range(model.cfg.num_layers)]
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, s]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = sample(_next_logits(model, tokens, caches), temperature, top_k, top_p, generator)  # [1]
        nxt = _agree(nxt, model.tp_group)
        out.append(int(nxt[0]))
        if eod is not None and out[-1] == eod:
            break
        tokens = nxt[:, None]  # only the new token goes through the model next step
    return out


def _prompt_ids(args, tok) -> list[int]:
    if args.ids or tok is None:
        try:
            return [int(t) for t in args.prompt.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"the run has no tokenizer; give --prompt as token ids like '1 2 3', "
                             f"not {args.prompt!r}") from None
    return tok.encode(args.prompt)


def _run(args, tp_group, rank: int, device: str) -> int:
    try:
        model, cfg = load_model(args.checkpoint, args.config, device, tp_group)
        tok = None
        if cfg.data.tokenizer_model and Path(cfg.data.tokenizer_model).exists():
            tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        prompt = _prompt_ids(args, tok)
        eod = tok.eod if tok is not None else args.eod
        new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       args.seed, eod)
    except (ValueError, CheckpointError) as e:
        print(f"megalite: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(tok.decode(prompt + new) if tok is not None and not args.ids else " ".join(map(str, prompt + new)))
    return 0


def generate_main(args) -> int:
    """`megalite generate CKPT --prompt ...`: print the prompt's continuation (rank 0).

    Under a launcher (torchrun --nproc_per_node N ...) the N ranks decode tensor-parallel with tp = N.
    """
    env = discover()
    if args.tp is not None and args.tp != env.world_size:
        print(f"megalite: --tp {args.tp} needs {args.tp} ranks but this launch has {env.world_size}; "
              f"launch with torchrun --nproc_per_node {args.tp} (or drop --tp)", file=sys.stderr)
        return 2
    device = args.device
    if device == "cuda" and env.world_size > 1:
        device = f"cuda:{env.local_rank}"
    created = init_distributed(env)  # False when one process, or when the caller already initialised it
    try:
        tp_group = None
        if env.world_size > 1:
            tp_group = ProcessGroups.build(Topology.from_world(env.world_size, tp=env.world_size)).tp_group
        return _run(args, tp_group, env.rank, device)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
