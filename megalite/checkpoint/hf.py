"""Hugging Face Llama <-> megalite weights: the name map and the fused-layout conversions.

megalite (model/blocks.py)              Hugging Face LlamaForCausalLM
  blocks.0.word.weight [Vp, h]            model.embed_tokens.weight [V, h] (padding rows dropped)
  blocks.i.norm1.weight                   model.layers.{i-1}.input_layernorm.weight
  blocks.i.attn.qkv.weight                q_proj / k_proj / v_proj: rows viewed as [hkv, r + 2, d, h]
                                          (per kv group: its r q heads, then k, then v)
  blocks.i.attn.proj.weight               o_proj
  blocks.i.norm2.weight                   post_attention_layernorm
  blocks.i.mlp.fc1.weight [2f, h]         gate_proj / up_proj: rows alternate gate_j, up_j
  blocks.i.mlp.fc2.weight                 down_proj
  blocks.L+1.norm.weight                  model.norm.weight
  blocks.L+1.output.weight (or .weight)   lm_head.weight (absent when tied)

Both use rotate-half rotary over the same head-major q/k rows (kernels.reference
pairs features i and i + d/2, as HF's rotate_half does), so no per-head
permutation is needed; the logit-parity tests prove it. Query head j uses kv
head j // r in both. `export_hf` writes safetensors shards one at a time from
views of the consolidated state (the input is read whole, by consolidate_fp32);
`import_hf` builds the fused tensors back and writes per-rank checkpoint files
at any (tp, pp, dp) layout that the Trainer resumes from with fresh optimizer
state. Both write to a temporary directory and rename it last, so a refused or
failed conversion leaves no half-written output.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from megalite.checkpoint.io import CheckpointError
from megalite.config import ModelConfig
from megalite.model.transformer import _ffn_size

HF_ARCH = "LlamaForCausalLM"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_llama_style(cfg: ModelConfig) -> None:
    """Refuse model shapes that LlamaForCausalLM cannot represent, naming the setting."""
    wanted = {"norm": "rmsnorm", "position": "rope", "activation": "swiglu", "bias": False, "dropout": 0.0}
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            raise CheckpointError(
                f"model.{key}={getattr(cfg, key)!r}: only Llama-style models (rmsnorm, rope, swiglu, no bias) "
                f"convert to {HF_ARCH}; the GPT-2 style preset (GPT2LMHeadModel) is not supported yet")


def hf_config(cfg: ModelConfig, bos: int | None = None, eos: int | None = None,
              dtype: torch.dtype = torch.float32) -> dict:
    """config.json for LlamaForCausalLM of the megalite model `cfg` (unpadded vocabulary)."""
    check_llama_style(cfg)
    n_kv = cfg.num_kv_heads or cfg.num_heads
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    return {"architectures": [HF_ARCH], "model_type": "llama", "hidden_size": cfg.hidden_size,
            "intermediate_size": _ffn_size(cfg), "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": n_kv, "num_hidden_layers": cfg.num_layers,
            "head_dim": cfg.hidden_size // cfg.num_heads, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "rope_theta": float(cfg.rope_theta), "rope_parameters": rope,
            "rope_scaling": None, "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
            "tie_word_embeddings": bool(cfg.tie_embeddings), "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "initializer_range": cfg.init_std, "bos_token_id": bos,
            "eos_token_id": eos, "torch_dtype": _DTYPE_NAMES[dtype], "dtype": _DTYPE_NAMES[dtype]}


def _need(state: dict, name: str, shape: list[int]) -> torch.Tensor:
    if name not in state:
        raise CheckpointError(f"tensor '{name}' is missing from the checkpoint")
    t = state[name]
    if list(t.shape) != list(shape):
        raise CheckpointError(f"tensor '{name}' has shape {list(t.shape)}, expected {list(shape)} for this config")
    return t


def megalite_to_hf(state: dict, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor view) pairs from a full, padding-stripped megalite state, block by block."""
    check_llama_style(cfg)
    h, hq, L, f = cfg.hidden_size, cfg.num_heads, cfg.num_layers, _ffn_size(cfg)
    hkv, d = cfg.num_kv_heads or hq, h // hq
    r = hq // hkv
    yield "model.embed_tokens.weight", _need(state, "blocks.0.word.weight", [cfg.vocab_size, h])
    for i in range(1, L + 1):
        p, o = f"blocks.{i}.", f"model.layers.{i - 1}."
        qkv = _need(state, p + "attn.qkv.weight", [(hq + 2 * hkv) * d, h]).view(hkv, r + 2, d, h)
        fc1 = _need(state, p + "mlp.fc1.weight", [2 * f, h]).view(f, 2, h)  # rows: (gate_j, up_j) pairs
        yield o + "input_layernorm.weight", _need(state, p + "norm1.weight", [h])
        yield o + "self_attn.q_proj.weight", qkv[:, :r].reshape(hq * d, h)  # [hkv, r, d, h] -> [hq*d, h]
        yield o + "self_attn.k_proj.weight", qkv[:, r].reshape(hkv * d, h)
        yield o + "self_attn.v_proj.weight", qkv[:, r + 1].reshape(hkv * d, h)
        yield o + "self_attn.o_proj.weight", _need(state, p + "attn.proj.weight", [h, hq * d])
        yield o + "post_attention_layernorm.weight", _need(state, p + "norm2.weight", [h])
        yield o + "mlp.gate_proj.weight", fc1[:, 0]
        yield o + "mlp.up_proj.weight", fc1[:, 1]
        yield o + "mlp.down_proj.weight", _need(state, p + "mlp.fc2.weight", [h, f])
    yield "model.norm.weight", _need(state, f"blocks.{L + 1}.norm.weight", [h])
    if not cfg.tie_embeddings:
        yield "lm_head.weight", _need(state, f"blocks.{L + 1}.output.weight", [cfg.vocab_size, h])


def hf_to_megalite(hf: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full megalite state (unpadded vocabulary, fp32) from HF Llama tensors; names every missing one."""
    check_llama_style(cfg)
    h, hq, L, f = cfg.hidden_size, cfg.num_heads, cfg.num_layers, _ffn_size(cfg)
    hkv, d = cfg.num_kv_heads or hq, h // hq
    r, V = hq // hkv, cfg.vocab_size
    g = lambda name, shape: _need(hf, name, shape).float()  # noqa: E731
    out = {"blocks.0.word.weight": g("model.embed_tokens.weight", [V, h])}
    for i in range(1, L + 1):
        p, o = f"blocks.{i}.", f"model.layers.{i - 1}."
        q = g(o + "self_attn.q_proj.weight", [hq * d, h]).view(hkv, r, d, h)
        k = g(o + "self_attn.k_proj.weight", [hkv * d, h]).view(hkv, 1, d, h)
        v = g(o + "self_attn.v_proj.weight", [hkv * d, h]).view(hkv, 1, d, h)
        gate, up = g(o + "mlp.gate_proj.weight", [f, h]), g(o + "mlp.up_proj.weight", [f, h])
        out[p + "norm1.weight"] = g(o + "input_layernorm.weight", [h])
        out[p + "attn.qkv.weight"] = torch.cat((q, k, v), dim=1).reshape(-1, h)  # -> [(hq + 2hkv) d, h]
        out[p + "attn.proj.weight"] = g(o + "self_attn.o_proj.weight", [h, hq * d])
        out[p + "norm2.weight"] = g(o + "post_attention_layernorm.weight", [h])
        out[p + "mlp.fc1.weight"] = torch.stack((gate, up), dim=1).reshape(2 * f, h)  # interleave rows
        out[p + "mlp.fc2.weight"] = g(o + "mlp.down_proj.weight", [h, f])
    out[f"blocks.{L + 1}.norm.weight"] = g("model.norm.weight", [h])
    if cfg.tie_embeddings:
        out[f"blocks.{L + 1}.weight"] = out["blocks.0.word.weight"]
    else:
        out[f"blocks.{L + 1}.output.weight"] = g("lm_head.weight", [V, h])
    return out


def _plan_shards(named: list[tuple[str, torch.Tensor]], max_bytes: int, dtype: torch.dtype) -> list[list[int]]:
    """Indices of `named` grouped into files of at most max_bytes (a larger tensor gets its own file)."""
    size = torch.tensor([], dtype=dtype).element_size()
    shards, current, used = [], [], 0
    for i, (_, t) in enumerate(named):
        n = t.numel() * size
        if current and used + n > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        shards.append(current)
    return shards


def write_safetensors(named: list[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int,
                      dtype: torch.dtype = torch.float32) -> list[str]:
    """Write model.safetensors, or model-XXXXX-of-YYYYY.safetensors + index when larger than max_shard_bytes.

    Tensors are materialised (contiguous, cast) one file at a time. Returns the file names written.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max shard size {max_shard_bytes} must be positive")
    plan = _plan_shards(named, max_shard_bytes, dtype)
    meta = {"format": "pt"}
    if len(plan) == 1:
        save_file({n: t.to(dtype).contiguous() for n, t in named}, out_dir / "model.safetensors", metadata=meta)
        return ["model.safetensors"]
    files, weight_map, total = [], {}, 0
    for k, idx in enumerate(plan, start=1):
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        chunk = {named[i][0]: named[i][1].to(dtype).contiguous() for i in idx}
        save_file(chunk, out_dir / fname, metadata=meta)
        total += sum(t.numel() * t.element_size() for t in chunk.values())
        weight_map.update({name: fname for name in chunk})
        files.append(fname)
        del chunk
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return files


def sentencepiece_to_tokenizer_json(model_file: str, out_path: Path) -> None:
    """A `tokenizers` tokenizer.json giving the same ids as the SentencePiece BPE model (AutoTokenizer loads it).

    SentencePiece BPE merges are implied by its pieces: every split of a piece into two known pieces is
    a merge, ranked by the merged piece's id (SentencePiece scores BPE pieces by creation order).
    Whitespace follows the model: optional dummy prefix, spaces as '▁', no other normalisation.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    pieces = [p.piece for p in proto.pieces]
    unk, spec = pieces[proto.trainer_spec.unk_id], proto.normalizer_spec
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], proto.trainer_spec.unk_id,
                               proto.trainer_spec.byte_fallback)
    elif proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {p: i for i, p in enumerate(pieces)}
        merges = sorted((i, vocab[p[:k]], vocab[p[k:]]) for i, p in enumerate(pieces)
                        if proto.pieces[i].type == proto.pieces[i].NORMAL
                        for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
        model = models.BPE(vocab=vocab, merges=[(pieces[a], pieces[b]) for _, a, b in merges], unk_token=unk,
                           fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback)
    else:
        raise CheckpointError(f"{model_file}: SentencePiece model type {proto.trainer_spec.model_type} cannot be "
                              "converted (only bpe and unigram)")
    tok = Tokenizer(model)
    prefix = [normalizers.Prepend("\u2581")] if spec.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()] + strip)
    special = (proto.pieces[0].CONTROL, proto.pieces[0].UNKNOWN)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in special])
    tok.save(str(out_path))


def write_tokenizer(tokenizer_type: str, tokenizer_model: str | None, out_dir: Path) -> dict:
    """The run's tokenizer as tokenizer.json + tokenizer_config.json (AutoTokenizer loads them); the
    SentencePiece .model is copied too. Returns {'bos': id|None, 'eos': id|None}."""
    if not tokenizer_model:
        return {"bos": None, "eos": None}
    from megalite.data.tokenizer import SENTENCEPIECE_TYPES, build_tokenizer

    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    if tokenizer_type in SENTENCEPIECE_TYPES:
        shutil.copyfile(tok.model_file, out_dir / "tokenizer.model")
        sentencepiece_to_tokenizer_json(tok.model_file, out_dir / "tokenizer.json")
        name = lambda i: None if i is None or i < 0 else tok.sp.id_to_piece(i)  # noqa: E731
        unk = tok.sp.unk_id()
    else:
        shutil.copyfile(tok.model_file, out_dir / "tokenizer.json")
        name = lambda i: None if i is None else tok.tok.id_to_token(i)  # noqa: E731
        unk = None
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30, "eos_token": name(tok.eod), "bos_token": name(tok.bos),
            "pad_token": name(tok.pad), "unk_token": name(unk)}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")
    return {"bos": tok.bos, "eos": tok.eod}


# ------------------------------------------------------------------ export
def _run_config(step_dir: Path, config: str | None):
    """The run's Config: `config` if given, else config.yaml of the run (or checkpoint root) directory."""
    from megalite.config import load_config

    if config is None:
        found = [p / "config.yaml" for p in (step_dir.parent.parent, step_dir.parent) if (p / "config.yaml").is_file()]
        if not found:
            raise CheckpointError(f"no config.yaml next to {step_dir} (looked in its run directory and checkpoint "
                                  "root); pass the run's config with --config")
        config = str(found[0])
    return load_config(config)


def _fresh_dir(out_dir) -> tuple[Path, Path]:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output {out} exists and is not empty; choose a new directory")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return out, tmp


def _publish_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # empty (checked by _fresh_dir)
    tmp.rename(out)


def export_hf(checkpoint, out_dir, config: str | None = None, max_shard_bytes: int = 5 * 2**30,
              dtype: str = "fp32") -> Path:
    """Write a LlamaForCausalLM directory (config.json, safetensors, tokenizer) from a megalite checkpoint.

    `checkpoint` is a checkpoint root or step directory of any layout (tp, pp, native or ZeRO).
    """
    from megalite.checkpoint.consolidate import _step_dir, consolidate_fp32

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    step = _step_dir(checkpoint)
    cfg = _run_config(step, config)
    check_llama_style(cfg.model)
    state = consolidate_fp32(step, strip_padding=True)
    named = list(megalite_to_hf(state, cfg.model))  # views: validates every tensor before writing anything
    out, tmp = _fresh_dir(out_dir)
    try:
        ids = write_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, tmp)
        conf = hf_config(cfg.model, ids["bos"], ids["eos"], DTYPES[dtype])
        (tmp / "config.json").write_text(json.dumps(conf, indent=2), encoding="utf-8")
        gen = {k: v for k, v in (("bos_token_id", ids["bos"]), ("eos_token_id", ids["eos"])) if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
        write_safetensors(named, tmp, max_shard_bytes, DTYPES[dtype])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_dir(tmp, out)
    return out


# ------------------------------------------------------------------ import
class _LazyHF(dict):
    """name -> tensor over a HF safetensors directory, each tensor read only when asked for."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        super().__init__()
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (hf_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{hf_dir} holds neither model.safetensors nor model.safetensors.index.json "
                                  "(only safetensors checkpoints are imported; nothing is unpickled)")
        self.handles = {}
        for fname in files:
            try:
                handle = safe_open(str(hf_dir / fname), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{hf_dir / fname} is not a readable safetensors file: {e}") from e
            for key in handle.keys():
                self.handles[key] = handle
                super().__setitem__(key, None)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.handles[name].get_tensor(name)


def model_overrides_from_hf(conf: dict) -> list[str]:
    """megalite model.* overrides equal to a HF Llama config.json; refuses what megalite cannot build."""
    arch = conf.get("architectures") or [conf.get("model_type")]
    if HF_ARCH not in arch and conf.get("model_type") != "llama":
        raise CheckpointError(f"architecture {arch} is not supported; only {HF_ARCH} (model_type llama) imports")
    hq = conf["num_attention_heads"]
    bad = {"rope_scaling": conf.get("rope_scaling"), "attention_bias": conf.get("attention_bias", False),
           "mlp_bias": conf.get("mlp_bias", False), "hidden_act": conf.get("hidden_act", "silu")}
    rope = conf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        bad["rope_parameters.rope_type"] = rope["rope_type"]
    for key, value in bad.items():
        if value not in (None, False, "silu", "default"):
            raise CheckpointError(f"config.json {key}={value!r} is not supported (megalite has plain rotary, "
                                  "no biases, SiLU); convert a model without it")
    if conf.get("head_dim", conf["hidden_size"] // hq) * hq != conf["hidden_size"]:
        raise CheckpointError(f"head_dim={conf['head_dim']} * num_attention_heads={hq} != hidden_size="
                              f"{conf['hidden_size']}; megalite needs head_dim = hidden_size / heads")
    theta = rope.get("rope_theta", conf.get("rope_theta", 10000.0))
    kv = {"vocab_size": conf["vocab_size"], "hidden_size": conf["hidden_size"],
          "num_layers": conf["num_hidden_layers"], "num_heads": hq,
          "num_kv_heads": conf.get("num_key_value_heads") or hq, "ffn_hidden_size": conf["intermediate_size"],
          "max_seq_len": conf.get("max_position_embeddings", 2048), "norm": "rmsnorm", "position": "rope",
          "activation": "swiglu", "bias": False, "dropout": 0.0, "norm_eps": conf.get("rms_norm_eps", 1e-6),
          "rope_theta": float(theta), "tie_embeddings": bool(conf.get("tie_word_embeddings", False))}
    return [f"model.{k}={v}" for k, v in kv.items()]


def _stage_skeleton(cfg, pp: int, pp_rank: int):
    """(shard metadata at tp=1, fresh native engine state) of pipeline rank pp_rank's model."""
    from megalite.checkpoint.sharding import shard_metadata
    from megalite.engine import build_engine
    from megalite.model import Transformer
    from megalite.pipeline import build_stage_model
    from megalite.topology import ProcessGroups

    with torch.device("meta"):  # shapes, names and parameter order only: no memory, no init cost
        model = Transformer(cfg.model) if pp == 1 else build_stage_model(
            cfg.model, pp, pp_rank, cfg.parallel.virtual_stages)
    return shard_metadata(model, 1), build_engine(cfg, model, ProcessGroups.single(), "cpu").state_dict()


def _layout_full(full: dict, cfg) -> dict:
    """The full tensors at this layout: vocabulary tables zero-padded to its (tp-dependent) padded size."""
    from megalite.model.transformer import _padded_vocab

    vp, vocab = _padded_vocab(cfg.model, cfg.parallel.tp), cfg.model.vocab_size
    out = dict(full)
    for name, t in full.items():
        if t.dim() == 2 and t.shape[0] == vocab and (name.startswith("blocks.0.word") or name.endswith(
                (f"blocks.{cfg.model.num_layers + 1}.weight", "output.weight"))):
            out[name] = torch.cat((t, t.new_zeros(vp - vocab, t.shape[1])))
    return out


def _rank_state(full: dict, meta: dict, engine: dict, cfg, tp_rank: int, world: int) -> dict:
    """One rank's checkpoint state as Trainer._state lays it out: its tp shard of its stage's tensors."""
    from megalite.rng import rng_state
    from megalite.tensor_parallel.random import TPRngTracker

    p, tp = cfg.parallel, cfg.parallel.tp
    meta = {name: {**entry, "tp_size": tp, "full_shape": list(full[name].shape)} for name, entry in meta.items()}
    model = {}
    for name, entry in meta.items():  # each shard is a contiguous chunk (checkpoint.sharding)
        dim, t = entry["partition_dim"], full[name]
        model[name] = t.clone() if dim is None else t.chunk(tp, dim=dim)[tp_rank].clone()
    return {"model": model, "shards": meta, "engine": engine,
            "rng": {**rng_state(), "tp_tracker": TPRngTracker(cfg.train.seed, tp_rank).get_state()},
            "progress": {"step": 0, "consumed_samples": 0},
            "layout": {"tp": tp, "pp": p.pp, "world_size": world, "virtual_stages": p.virtual_stages}}


def _import_config(conf: dict, overrides):
    """The tiny preset with the HF model section, a sequence length that fits it, then `overrides`."""
    from megalite.config import load_config

    model_kv = model_overrides_from_hf(conf)
    base = load_config("tiny", model_kv)
    seq = f"data.seq_len={min(base.data.seq_len, base.model.max_seq_len)}"  # the preset's may be too long
    return load_config("tiny", model_kv + [seq] + list(overrides))


def import_hf(hf_dir, out_root, overrides: list[str] = ()) -> Path:
    """Write a megalite checkpoint (step 0, fresh optimizer) of a HF Llama model at the layout in `overrides`.

    `overrides` are dotted config overrides (parallel.tp=2 parallel.pp=2 parallel.dp=..). The output root
    also gets config.yaml (the tiny preset with the imported model section and the overrides), so
    `megalite train OUT/config.yaml train.resume=OUT data.path=...` continues training from it.
    """
    from megalite.checkpoint.io import _publish, _write_rank, step_dir_name
    from megalite.config import save_config, validate
    from megalite.model.transformer import _check
    from megalite.rng import seed_everything
    from megalite.topology import Topology

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir} has no config.json; give a Hugging Face model directory")
    cfg = _import_config(json.loads((hf_dir / "config.json").read_text(encoding="utf-8")), overrides)
    if cfg.engine.backend != "native":
        raise CheckpointError(f"engine.backend={cfg.engine.backend!r}: import writes fresh native-engine "
                              "state; import with engine.backend=native")
    p = cfg.parallel
    world = p.tp * p.pp * (p.dp or 1)
    validate(cfg, world_size=world)  # ConfigError naming the bad value, before anything is written
    _check(cfg.model, p.tp)
    topo = Topology.from_world(world, tp=p.tp, pp=p.pp, virtual_stages=p.virtual_stages, order=p.order)
    full = _layout_full(hf_to_megalite(_LazyHF(hf_dir), cfg.model), cfg)  # every tensor checked first
    stages = [_stage_skeleton(cfg, p.pp, s) for s in range(p.pp)]
    seed_everything(cfg.train.seed)  # the saved RNG state is a fresh run's
    out, tmp_root = _fresh_dir(out_root)
    try:
        tmp = tmp_root / (step_dir_name(0) + ".tmp")
        tmp.mkdir()
        for rank in range(world):
            c = topo.coords(rank)
            _write_rank(tmp, rank, _rank_state(full, *stages[c.pp], cfg, c.tp, world))
        _publish(tmp_root, tmp, tmp_root / step_dir_name(0), 0, world)
        save_config(cfg, tmp_root / "config.yaml")
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    _publish_dir(tmp_root, out)
    return out
