"""`megalite convert to-hf | from-hf | reshard`: checkpoint conversion (tools/convert_checkpoint.py too).

The parsers need nothing heavy; the handler imports megalite.checkpoint (and torch) only when a
conversion runs. A refused conversion is one line on stderr and exit code 2; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from megalite.cli.errors import add_debug_argument, report_failures

CONVERT_DOC = """Convert checkpoints between megalite and Hugging Face transformers, or reshard them.

    megalite convert to-hf CKPT OUT_DIR [--config RUN/config.yaml] [--arch MistralForCausalLM]
                           [--max-shard-size 5GB] [--dtype fp32|bf16|fp16]
    megalite convert from-hf HF_DIR OUT_CKPT [parallel.tp=2 parallel.pp=2 ...]
    megalite convert reshard CKPT OUT --tp N --pp M [--cp C] [--ep E] [--dp D] [--virtual-stages V]
                             [--config RUN/config.yaml]

to-hf reads a checkpoint of any layout (tp, pp, ZeRO) tensor by tensor (memory: about one
--max-shard-size file plus one tensor) and writes a directory that LlamaForCausalLM (Llama-style
models, rope scaling linear, llama3, yarn or dynamic included), Qwen2ForCausalLM (Llama style with
model.qkv_bias=true), Qwen3ForCausalLM (with model.qk_norm=true, any model.head_dim),
MixtralForCausalLM (an MoE model, model.moe_*, with every layer MoE), Qwen3MoeForCausalLM (an MoE
model with model.qk_norm=true, dense first layers allowed) or GPT2LMHeadModel (the GPT-2 style:
layernorm, learned positions, gelu) loads as is.
from-hf imports any of these architectures and MistralForCausalLM (its sliding_window becomes
model.attention_window); to-hf writes Mistral for a model with model.attention_window, and for an
unwindowed one when --arch MistralForCausalLM asks for it.
from-hf streams (memory: about one output rank file plus one tensor) and writes a megalite checkpoint
(step 0, fresh optimizer) plus OUT_CKPT/config.yaml, with the model's tokenizer.json copied to
OUT_CKPT/tokenizer/ and configured; it prints what it found and the command that continues
pretraining: `megalite train OUT_CKPT/config.yaml train.resume=OUT_CKPT data.path=[...]` (under
torchrun for the parallel layout). reshard rewrites a (native-engine) training checkpoint at another tensor/pipeline
layout, optimizer state and data position included; resume with
`megalite train OUT/config.yaml train.resume=OUT train.run_dir=...` on N*M*D ranks.
Nothing is written when a conversion is refused.
"""

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r} is not like 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_commands(sub) -> None:
    """Register `convert` (with to-hf, from-hf and reshard under it) on the top-level subparsers `sub`."""
    p = sub.add_parser("convert", help="convert checkpoints: to-hf, from-hf (Hugging Face) or reshard (tp/pp)",
                       description=CONVERT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_conversions(p)


def add_conversions(p: argparse.ArgumentParser) -> None:
    """The to-hf, from-hf and reshard subcommands under parser `p`; each runs convert_command."""
    sub = p.add_subparsers(dest="conversion", required=True, metavar="CONVERSION", title="conversions")
    to = sub.add_parser("to-hf", help="megalite checkpoint -> Hugging Face Llama, Mistral, Qwen2, Qwen3, Mixtral, "
                        "Qwen3-MoE or GPT-2 directory")
    to.add_argument("checkpoint", help="checkpoint root (follows `latest`) or step_XXXXXXXX directory")
    to.add_argument("out_dir")
    to.add_argument("--config", default=None, help="the run's config.yaml (default: found next to the checkpoint)")
    to.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    to.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    to.add_argument("--arch", default=None, help="Hugging Face architecture to write (default: the first of "
                    "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM, "
                    "GPT2LMHeadModel that represents the model; MistralForCausalLM only when named)")
    frm = sub.add_parser("from-hf",
                         help="Hugging Face Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE or GPT-2 directory -> "
                         "megalite checkpoint")
    frm.add_argument("hf_dir")
    frm.add_argument("out_ckpt")
    frm.add_argument("overrides", nargs="*", help="layout and config overrides, e.g. parallel.tp=2 parallel.pp=2")
    rs = sub.add_parser("reshard", help="megalite checkpoint -> the same checkpoint at another tp/pp layout")
    rs.add_argument("checkpoint", help="checkpoint root (follows `latest`) or step_XXXXXXXX directory")
    rs.add_argument("out", help="new checkpoint root (must not exist)")
    rs.add_argument("--tp", type=int, required=True, help="tensor-parallel degree of the output")
    rs.add_argument("--pp", type=int, required=True, help="pipeline-parallel degree of the output")
    rs.add_argument("--cp", type=int, default=1, help="context-parallel degree of the output (replicas of each "
                    "tp x pp cell, like dp)")
    rs.add_argument("--ep", type=int, default=1, help="expert-parallel degree of the output (MoE experts sharded "
                    "over that many of the dp x cp ranks)")
    rs.add_argument("--dp", type=int, default=1, help="data-parallel replicas to write (the resumed run's dp)")
    rs.add_argument("--virtual-stages", type=int, default=1, help="model chunks per pipeline rank of the output")
    rs.add_argument("--config", default=None, help="the run's config.yaml (default: found next to the checkpoint)")
    for conversion in (to, frm, rs):
        conversion.set_defaults(handler=convert_command)


def convert_command(args: argparse.Namespace) -> int:
    source = args.hf_dir if args.conversion == "from-hf" else args.checkpoint
    if not os.path.exists(source):  # before importing torch: a mistyped path fails at once
        what = "Hugging Face directory" if args.conversion == "from-hf" else "checkpoint"
        print(f"megalite convert {args.conversion}: {what} {source} does not exist", file=sys.stderr)
        return 2
    from megalite.checkpoint.hf import export_hf, import_hf, import_report
    from megalite.checkpoint.io import CheckpointError
    from megalite.config import ConfigError

    try:
        if args.conversion == "to-hf":
            out = export_hf(args.checkpoint, args.out_dir, args.config, args.max_shard_size, args.dtype, args.arch)
        elif args.conversion == "reshard":
            from megalite.checkpoint.reshard import reshard

            out = reshard(args.checkpoint, args.out, args.tp, args.pp, args.dp, args.virtual_stages, args.config,
                          args.cp, args.ep)
        else:
            out = import_hf(args.hf_dir, args.out_ckpt, args.overrides)
            print(import_report(args.hf_dir, out))
            return 0
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"megalite convert {args.conversion}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def convert_main(argv: list[str] | None = None) -> int:
    """`megalite convert` as a program of its own (tools/convert_checkpoint.py): argv starts with the
    conversion (to-hf, from-hf or reshard)."""
    p = argparse.ArgumentParser(description=CONVERT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_conversions(p)
    add_debug_argument(p)
    args = p.parse_args(argv)
    return report_failures(lambda: args.handler(args), args.debug)
