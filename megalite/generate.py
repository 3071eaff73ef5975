"""Text generation from a megalite checkpoint: greedy or sampled decoding with a KV cache, one device.

`load_model` rebuilds the whole model (tp=1, pp=1) from a checkpoint of any
layout (checkpoint.consolidate). `generate` runs the prompt once, then one
token per step against each layer's KVCache (model.blocks), so a step costs
O(sequence) rather than O(sequence^2). The cached path computes the same
function as the training forward; tests compare it with transformers' greedy
`generate` on the exported model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from megalite.model import Transformer
from megalite.model.blocks import KVCache
from megalite.model.transformer import _padded_vocab


def load_model(checkpoint, config: str | None = None, device: str = "cpu"):
    """(model in eval mode, run Config) from a checkpoint root or step directory of any layout."""
    from megalite.checkpoint.consolidate import _step_dir, consolidate_fp32
    from megalite.checkpoint.hf import _run_config

    step = _step_dir(checkpoint)
    cfg = _run_config(step, config)
    state = consolidate_fp32(step, strip_padding=True)  # independent of the tp size that wrote it
    model = Transformer(cfg.model, seed=cfg.train.seed)
    vp = _padded_vocab(cfg.model, 1)
    for name, t in state.items():  # re-pad the vocabulary tables for tp=1 (padded rows are never used)
        if t.dim() == 2 and t.shape[0] == cfg.model.vocab_size and name.startswith(
                ("blocks.0.word", f"blocks.{cfg.model.num_layers + 1}.")):
            state[name] = torch.cat((t, t.new_zeros(vp - t.shape[0], t.shape[1])))
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def _embed(model: Transformer, tokens: torch.Tensor, offset: int) -> torch.Tensor:
    """tokens [b, s] at positions offset.. -> hidden [s, b, h] (learned positions shifted by offset)."""
    emb = model.blocks[0]
    x = emb.word(tokens.t())  # [b, s] -> [s, b, h]
    if emb.position is not None:
        x = x + emb.position[offset: offset + tokens.shape[1]].unsqueeze(1)  # [s, h] -> [s, 1, h]
    return x


@torch.no_grad()
def _next_logits(model: Transformer, tokens: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
    """Logits [b, V] of the token after `tokens` [b, s], extending the caches by s positions."""
    x = _embed(model, tokens, caches[0].offset)
    for block, cache in zip(model.blocks[1:-1], caches):
        x = block(x, kv_cache=cache)
    logits = model.blocks[-1](x[-1:])  # [1, b, Vp]
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


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eod: int | None = None) -> list[int]:
    """The new token ids after `prompt` (at most max_new_tokens; stops after emitting `eod`)."""
    cfg = model.cfg
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if bad := [t for t in prompt if not 0 <= t < cfg.vocab_size]:
        raise ValueError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    if len(prompt) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens={max_new_tokens} exceeds "
                         f"model.max_seq_len={cfg.max_seq_len}; shorten one of them")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    caches = [KVCache() for _ in range(cfg.num_layers)]
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, s]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = sample(_next_logits(model, tokens, caches), temperature, top_k, top_p, generator)  # [1]
        out.append(int(nxt[0]))
        if eod is not None and out[-1] == eod:
            break
        tokens = nxt[:, None]  # only the new token goes through the model next step
    return out


def generate_main(args) -> int:
    """`megalite generate CKPT --prompt ...`: print the prompt's continuation."""
    model, cfg = load_model(args.checkpoint, args.config, args.device)
    tok = None
    if cfg.data.tokenizer_model and Path(cfg.data.tokenizer_model).exists():
        from megalite.data.tokenizer import build_tokenizer

        tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    if args.ids or tok is None:
        try:
            prompt = [int(t) for t in args.prompt.replace(",", " ").split()]
        except ValueError:
            print(f"megalite: the run has no tokenizer; give --prompt as token ids like '1 2 3', "
                  f"not {args.prompt!r}", file=sys.stderr)
            return 2
    else:
        prompt = tok.encode(args.prompt)
    eod = tok.eod if tok is not None else args.eod
    try:
        new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       args.seed, eod)
    except ValueError as e:
        print(f"megalite: {e}", file=sys.stderr)
        return 2
    print(tok.decode(prompt + new) if tok is not None and not args.ids else " ".join(map(str, prompt + new)))
    return 0
