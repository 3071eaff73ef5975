"""Hugging Face export and import: megalite checkpoints <-> transformers model directories.

Seven architectures, picked from the model config (export) or config.json (import):
Llama style (rmsnorm, rope, swiglu) <-> LlamaForCausalLM (checkpoint.hf_llama); on the same tensor
map (checkpoint.hf_llama_family) the same with q/k/v-only biases <-> Qwen2ForCausalLM, with per-head
q/k RMSNorm and any head_dim <-> Qwen3ForCausalLM, and with a sliding window on every layer
(model.attention_window) <-> MistralForCausalLM (an unwindowed one is written as Mistral when asked
by name); GPT-2 style (layernorm, learned positions, gelu) <->
GPT2LMHeadModel (checkpoint.hf_gpt2); and Mixture-of-Experts models (model.moe_*) on the Llama map
<-> MixtralForCausalLM (every layer MoE) and Qwen3MoeForCausalLM (q/k RMSNorm, dense and MoE layers)
(checkpoint.hf_moe; Qwen2MoeForCausalLM is refused, saying why).
Anything else is refused by name.

`export_hf` streams: a dry run of the conversion on meta tensors checks every
name and shape and plans the output files, then each megalite tensor is read
from the rank files on its own (checkpoint.reader.CheckpointReader, any tp, pp
and ZeRO layout), converted, put in its output file, and dropped when that file
is written; peak memory is about one output file plus one tensor (see
checkpoint.reader). `import_hf` streams the other way: a dry run on meta tensors
checks every HF name and shape against every output stage, then each output rank
file (any tp, pp, dp layout, fresh optimizer state, which the Trainer resumes
from) is made tensor by tensor from lazily read HF tensors and written before
the next rank's are made; peak memory is about one rank file plus one full
tensor (tools/bench_import_memory.py measures it). Both write to a temporary
directory and rename it last, so a refused or failed conversion leaves no
half-written output.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from megalite.checkpoint import hf_gpt2, hf_llama, hf_moe
from megalite.checkpoint.hf_files import HFTensors, write_safetensors
from megalite.checkpoint.hf_llama import check as check_llama_style  # re-exported (__all__)
from megalite.checkpoint.hf_llama import from_hf as hf_to_megalite
from megalite.checkpoint.hf_llama import hf_config
from megalite.checkpoint.hf_llama import model_overrides as model_overrides_from_hf
from megalite.checkpoint.hf_llama import to_hf as megalite_to_hf
from megalite.checkpoint.hf_llama_family import MISTRAL, QWEN2, QWEN3
from megalite.checkpoint.hf_moe import MIXTRAL, QWEN3_MOE
from megalite.checkpoint.hf_tokenizer import sentencepiece_to_tokenizer_json, write_tokenizer
from megalite.checkpoint.io import CheckpointError, fresh_output, read_manifest, step_directory
from megalite.checkpoint.layout import StagePlan, fresh_engine_state, fresh_rng, layout_of, run_config, write_offline
from megalite.checkpoint.reader import CheckpointReader
from megalite.checkpoint.schema import Progress, RankState
from megalite.config import ModelConfig, head_dim, is_moe_layer, load_config, moe_ffn_hidden_size, padded_vocab_size
from megalite.config import resolved_ffn_hidden_size as ffn_size
from megalite.model import check_model
from megalite.model.transformer import total_parameters
from megalite.preflight import preflight

__all__ = ["ARCHS", "DTYPES", "arch_for_hf", "arch_for_model", "check_llama_style", "export_hf", "hf_config",
           "hf_to_megalite", "import_hf", "import_report", "megalite_to_hf", "model_overrides_from_hf",
           "sentencepiece_to_tokenizer_json", "write_safetensors", "write_tokenizer"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# each (a module or a LlamaRelative): ARCH, MODEL_TYPE, mismatches, check, hf_config, to_hf, from_hf,
# model_overrides
ARCHS = (hf_llama, MISTRAL, QWEN2, QWEN3, MIXTRAL, QWEN3_MOE, hf_gpt2)  # export's default: the first that fits


def _mismatches(arch, cfg: ModelConfig) -> dict[str, tuple]:
    """arch.mismatches(cfg), and a dense architecture's need of a dense model (GPT-2's map has no experts)."""
    dense = not isinstance(arch, hf_moe.MoERelative) and cfg.moe_num_experts
    return {**arch.mismatches(cfg), **({"moe_num_experts": (cfg.moe_num_experts, 0)} if dense else {})}


def arch_for_model(cfg: ModelConfig, name: str | None = None):
    """The architecture module that represents the megalite model `cfg` (the one called `name`, when given:
    Llama and Mistral hold the same models); refuses a mix, naming the fields."""
    if name is not None:
        chosen = [a for a in ARCHS if a.ARCH == name]
        if not chosen:
            raise CheckpointError(f"architecture {name!r} is not one of {[a.ARCH for a in ARCHS]}")
        chosen[0].check(cfg)
        if "moe_num_experts" in _mismatches(chosen[0], cfg):
            raise CheckpointError(f"model.moe_num_experts={cfg.moe_num_experts}: {name} has no experts; export "
                                  "an MoE model as MixtralForCausalLM or Qwen3MoeForCausalLM")
        return chosen[0]
    for arch in ARCHS:
        if not _mismatches(arch, cfg):
            return arch
    why = "; ".join(f"{a.ARCH} needs " + ", ".join(f"model.{k}={w!r} (not {v!r})" for k, (v, w) in
                                                   _mismatches(a, cfg).items()) for a in ARCHS)
    raise CheckpointError(f"this model has no Hugging Face equivalent: {why}")


def arch_for_hf(conf: dict):
    """The architecture module for a HF config.json; refuses an unknown architecture by name."""
    hf_moe.refuse_unsupported(conf)  # a known MoE architecture megalite cannot compute: say why
    archs = conf.get("architectures") or []
    for arch in ARCHS:
        if arch.ARCH in archs or (not archs and conf.get("model_type") == arch.MODEL_TYPE):
            return arch
    raise CheckpointError(f"architecture {archs or conf.get('model_type')} is not supported; megalite imports "
                          + " and ".join(f"{a.ARCH} (model_type {a.MODEL_TYPE})" for a in ARCHS))


# ------------------------------------------------------------------ export
def _write_metadata(cfg, arch, tmp: Path, dtype: torch.dtype) -> None:
    """tokenizer files, config.json and generation_config.json of the exported model."""
    ids = write_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, tmp)
    conf = arch.hf_config(cfg.model, ids["bos"], ids["eos"], dtype)
    (tmp / "config.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")
    gen = {k: v for k, v in (("bos_token_id", ids["bos"]), ("eos_token_id", ids["eos"])) if v is not None}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")


def export_hf(checkpoint, out_dir, config: str | None = None, max_shard_bytes: int = 5 * 2**30,
              dtype: str = "fp32", arch: str | None = None) -> Path:
    """Write a Hugging Face model directory (config.json, safetensors, tokenizer) of any architecture in ARCHS.

    `checkpoint` is a checkpoint root or step directory of any layout (tp, pp, native or ZeRO);
    `config` the run's config.yaml when it is not next to the checkpoint; `arch` the HF architecture
    (default: the first in ARCHS that represents the model; MistralForCausalLM must be asked for).
    Streams tensor by tensor: peak memory is about max_shard_bytes plus the largest tensor, not the model.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max shard size {max_shard_bytes} must be positive")
    step = step_directory(checkpoint)
    cfg = run_config(step, config)
    arch = arch_for_model(cfg.model, arch)
    reader = CheckpointReader(step)
    # dry run on meta tensors: every name and shape checked, files planned, before anything is read or written
    plan = [(name, list(t.shape)) for name, t in arch.to_hf(reader.view(meta=True), cfg.model)]
    with fresh_output(out_dir) as tmp:
        _write_metadata(cfg, arch, tmp, DTYPES[dtype])
        write_safetensors(arch.to_hf(reader.view(), cfg.model), tmp, max_shard_bytes, DTYPES[dtype], plan)
    return Path(out_dir)


# ------------------------------------------------------------------ import
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _tokenizer(hf_dir: Path, out_root: Path, overrides, vocab_size: int) -> tuple[list[str], dict[str, Path]]:
    """The data.tokenizer_* overrides and the files to copy for the HF directory's tokenizer.json, which
    is used as is (copied to OUT/tokenizer/); none when it has none or `overrides` name a tokenizer."""
    if not (hf_dir / "tokenizer.json").is_file() or any(o.startswith("data.tokenizer_model=") for o in overrides):
        return [], {}
    from megalite.data.tokenizer import build_tokenizer

    try:  # refused here, not at the first training step: a tokenizer without an end-of-document token
        tok = build_tokenizer("HuggingFaceTokenizer", str(hf_dir))
    except ValueError as e:
        raise CheckpointError(f"{hf_dir}/tokenizer.json cannot tokenize for training: {e}; or import with "
                              "data.tokenizer_model=PATH naming another tokenizer") from e
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{hf_dir}/tokenizer.json has {tok.vocab_size} tokens but config.json vocab_size="
                              f"{vocab_size}: ids past the embedding table; import with data.tokenizer_model=PATH "
                              "naming the model's own tokenizer")
    copies = {f"tokenizer/{n}": hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).is_file()}
    where = Path(out_root).resolve() / "tokenizer"
    return ["data.tokenizer_type=HuggingFaceTokenizer", f"data.tokenizer_model={where}"], copies


def _import_config(conf: dict, arch, overrides):
    """The tiny preset with the HF model section, a sequence length that fits it, then `overrides`."""
    model_kv = arch.model_overrides(conf)
    base = load_config("tiny", model_kv)
    seq = f"data.seq_len={min(base.data.seq_len, base.model.max_seq_len)}"  # the preset's may be too long
    return load_config("tiny", model_kv + [seq] + list(overrides))


def import_hf(hf_dir, out_root, overrides: list[str] = ()) -> Path:
    """Write a megalite checkpoint (step 0, fresh optimizer) of a HF Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE
    or GPT-2 model at the layout in `overrides`.

    `overrides` are dotted config overrides (parallel.tp=2 parallel.pp=2 parallel.dp=..). The output root
    also gets config.yaml (the tiny preset with the imported model section and the overrides), so
    `megalite train OUT/config.yaml train.resume=OUT data.path=...` continues training from it
    (`import_report` prints the exact command). A tokenizer.json in `hf_dir` is copied to OUT/tokenizer/
    and configured (data.tokenizer_type=HuggingFaceTokenizer), so data preprocessed with it matches and
    export writes it back unchanged.
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir} has no config.json; give a Hugging Face model directory")
    conf = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    arch = arch_for_hf(conf)
    tokenizer, copies = _tokenizer(hf_dir, out_root, overrides, conf.get("vocab_size", 0))
    cfg = _import_config(conf, arch, tokenizer + list(overrides))
    if cfg.engine.backend != "native":
        raise CheckpointError(f"engine.backend={cfg.engine.backend!r}: import writes fresh native-engine "
                              "state; import with engine.backend=native")
    p = cfg.parallel
    layout = layout_of(cfg, p.dp or 1)
    preflight(cfg, world_size=layout.world_size, data=False, engine=False)  # before anything is read or written
    check_model(cfg.model, p.tp)
    hf = HFTensors(hf_dir)
    _dry_run(cfg, arch.from_hf(hf.view(meta=True), cfg.model), hf_dir)  # before anything is read or written
    full = arch.from_hf(hf, cfg.model)  # lazy, in the files' dtype: each tensor made when asked for, cut, cast

    def stage(s: int) -> Iterator[RankState]:  # one rank at a time: one rank file plus one tensor in memory
        plan = StagePlan(cfg, s)
        engine = fresh_engine_state(cfg, plan.model)
        for t in range(plan.tp):  # the RNG state a fresh run starts from
            yield RankState(plan.rank_weights(full.__getitem__, hf_dir, t, torch.float32), plan.meta, engine,
                            fresh_rng(cfg.train.seed, t), Progress(), layout)

    return write_offline(out_root, cfg, layout, 0, (stage(s) for s in range(p.pp)), copies)


def _dry_run(cfg, meta_state, hf_dir: Path) -> None:
    """The conversion on meta tensors: every HF name and shape, and every stage's tensors, checked."""
    for s in range(cfg.parallel.pp):
        StagePlan(cfg, s).rank_weights(meta_state.__getitem__, hf_dir, 0)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _moe_summary(m: ModelConfig) -> list[str]:
    """The MoE layers of an imported model, for the report (none when dense)."""
    moe = sum(is_moe_layer(m, i) for i in range(1, m.num_layers + 1))
    if not moe:
        return []
    return [f"{moe} of {m.num_layers} layers MoE: {m.moe_num_experts} experts of {moe_ffn_hidden_size(m)}, "
            f"top {m.moe_top_k}" + (", renormalised" if m.moe_norm_topk_prob else "")]


def import_report(hf_dir, out_root) -> str:
    """What `import_hf` found in `hf_dir` and wrote at `out_root`, and the command that continues
    pretraining from it (printed by `megalite convert from-hf`)."""
    conf = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    cfg = load_config(str(Path(out_root) / "config.yaml"))
    m, p = cfg.model, cfg.parallel
    world = read_manifest(out_root)["world_size"]
    rope = "learned positions" if m.position != "rope" else (
        f"rope theta {m.rope_theta:g}, scaling {m.rope_scaling}"
        + ("" if m.rope_scaling == "none" else f" x{m.rope_scaling_factor:g}"))
    extras = [name for name, on in (("q/k/v bias", m.qkv_bias), ("q/k RMSNorm", m.qk_norm),
                                    ("tied embeddings", m.tie_embeddings)) if on] + _moe_summary(m)
    launcher = "megalite" if world == 1 else f"torchrun --nproc_per_node {world} -m megalite"
    tokenizer = cfg.data.tokenizer_model or "none (set data.tokenizer_type and data.tokenizer_model)"
    return "\n".join([
        f"found {', '.join(conf.get('architectures') or [conf.get('model_type', '?')])} in {hf_dir}: "
        f"{_count(total_parameters(m))} parameters, {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_heads} query / {m.num_kv_heads or m.num_heads} kv heads of {head_dim(m)}, FFN {ffn_size(m)}",
        f"  vocabulary {m.vocab_size} (padded to {padded_vocab_size(m, p.tp)} at tp={p.tp}), max positions "
        f"{m.max_seq_len}, {rope}" + "".join(f", {e}" for e in extras),
        f"  tokenizer: {tokenizer}",
        f"wrote {out_root}: step 0, fresh optimizer, tp={p.tp} x pp={p.pp} x dp={world // (p.tp * p.pp)} "
        f"({world} rank files)",
        "continue pretraining with:",
        f"  {launcher} train {Path(out_root) / 'config.yaml'} train.resume={out_root} data.path=[PREFIX]",
    ])
