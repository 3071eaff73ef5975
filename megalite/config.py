"""Typed, nested run configuration.

One dataclass per section; each component receives only its own section.
Every field carries a docstring (the string literal under it). Loading from
YAML, dotted command-line overrides and validation live below the sections.
"""
from __future__ import annotations

import difflib
import importlib.resources
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml


@dataclass
class ModelConfig:
    """Decoder-only transformer shape."""

    vocab_size: int = 32000
    """Tokenizer vocabulary size; the embedding is padded up to a multiple of `pad_vocab_to`."""
    pad_vocab_to: int = 64
    """Embedding rows are padded to a multiple of this times tp; padded ids are never predicted."""
    hidden_size: int = 256
    """Width of the residual stream (h)."""
    num_layers: int = 4
    """Number of transformer blocks (L)."""
    num_heads: int = 4
    """Attention query heads; hidden_size must divide evenly by it."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means num_heads (plain multi-head)."""
    ffn_hidden_size: int | None = None
    """MLP inner width; None picks 4h for GELU and the Llama rule (8h/3 rounded up to 256) for SwiGLU."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (rotary table or learned position rows)."""
    norm: str = "rmsnorm"
    """Normalization: 'rmsnorm' or 'layernorm'."""
    norm_eps: float = 1e-5
    """Epsilon inside the norm's square root."""
    position: str = "rope"
    """Positions: 'rope' (rotary) or 'learned' (absolute embedding, GPT-2 style)."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    activation: str = "swiglu"
    """MLP: 'swiglu' (gated, Llama) or 'gelu' (GPT-2)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    bias: bool = False
    """Biases in linear layers (GPT-2 style) or none (Llama style)."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches."""
    init_std: float = 0.02
    """Std of normal init; output projections are scaled by 1/sqrt(2*num_layers)."""


@dataclass
class ParallelConfig:
    """How the world is split: tensor x pipeline x data."""

    tp: int = 1
    """Tensor-parallel degree (ranks that split each layer)."""
    pp: int = 1
    """Pipeline-parallel degree (stages)."""
    dp: int | None = None
    """Data-parallel degree; None means world_size / (tp * pp)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    sequence_parallel: bool = False
    """Split activations outside attention/MLP along the sequence over the tp group."""
    order: str = "tp-dp-pp"
    """Rank order of the grid, fastest-varying first (Megatron's default keeps tp ranks adjacent)."""
    schedule: str = "1f1b"
    """Pipeline schedule: '1f1b', 'interleaved' or 'afab' (all-forward-all-backward)."""
    timeout_s: float = 600.0
    """Collective timeout; a dead rank ends the job after at most this long."""


@dataclass
class DataConfig:
    """Where tokens come from and how samples are cut."""

    path: list[str] = field(default_factory=list)
    """Dataset prefixes, optionally weighted: ['0.3', 'A_text_document', '0.7', 'B_text_document'].
    Empty: the tiny preset builds (and caches) the demo corpus."""
    split: str = "969,30,1"
    """Train/valid/test proportions over documents."""
    seq_len: int = 256
    """Tokens per sample fed to the model (each sample reads seq_len + 1)."""
    tokenizer_type: str = "SentencePieceTokenizer"
    """'SentencePieceTokenizer' or 'HuggingFaceTokenizer'."""
    tokenizer_model: str | None = None
    """SentencePiece .model file or Hugging Face tokenizer.json (or its directory)."""
    seed: int = 1234
    """Shuffling seed for the sample order."""
    cache_dir: str | None = None
    """Where built index arrays are cached; None: next to the data."""
    reset_attention_mask: bool = False
    """Mask attention across document boundaries inside packed samples."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-5
    """Floor the decay ends at."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms, biases or (1-D) gains."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr."""
    decay: str = "cosine"
    """Decay after warmup: 'cosine', 'linear' or 'constant'."""
    decay_steps: int | None = None
    """Steps over which to decay to min_lr; None means train.steps - warmup_steps."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""


@dataclass
class TrainConfig:
    """The loop: batch sizes, precision, length, evaluation, resume."""

    steps: int = 100
    """Optimizer steps to run."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all dp ranks (micro x accumulation x dp)."""
    precision: str = "fp32"
    """'fp32', 'bf16' or 'fp16' (fp16 uses dynamic loss scaling)."""
    seed: int = 1234
    """Seed for weights, dropout and everything random except the data order."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    eval_interval: int = 50
    """Evaluate every this many steps (and at the end); 0 disables."""
    eval_steps: int = 5
    """Validation batches per evaluation."""
    resume: str = "auto"
    """'auto' (continue from run_dir's latest checkpoint if any), 'none', or a checkpoint path."""
    run_dir: str | None = None
    """Run directory; None creates runs/<timestamp> under the current directory."""
    device: str = "auto"
    """'auto' (cuda when present), 'cuda' or 'cpu'."""
    initial_loss_scale: float = 65536.0
    """fp16 only: starting dynamic loss scale."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the scale doubles."""
    min_loss_scale: float = 1.0
    """fp16 only: the scale never drops below this."""


@dataclass
class EngineConfig:
    """Who owns the optimizer step and data-parallel gradients."""

    backend: str = "native"
    """'native' (plain PyTorch) or 'deepspeed' (ZeRO)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (deepspeed backend only): 1 shards optimizer states over dp, 2 also
    gradients, 3 also parameters. With pp > 1 only stage 0 and 1 are accepted."""
    zero_bucket_size: int = 50_000_000
    """Elements per ZeRO reduce-scatter / all-gather bucket (deepspeed backend)."""
    overlap_comm: bool = False
    """Overlap ZeRO's gradient reduction with backward (deepspeed backend; costs extra buffers)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the fp32 master weights) in CPU memory and step there with
    DeepSpeed's CPU Adam (deepspeed backend, zero_stage >= 1; needs the cpu_adam op)."""
    offload_params: bool = False
    """ZeRO-3 only: keep the parameter shards in CPU memory between uses."""
    ds_config: str | None = None
    """Path of a raw DeepSpeed JSON merged on top of the generated one; a key it sets to a value
    different from the generated one is an error naming both (deepspeed backend)."""


@dataclass
class CheckpointConfig:
    """When and how checkpoints are written."""

    interval: int = 100
    """Save every this many steps (and always at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a new one is complete."""
    dir: str | None = None
    """Checkpoint directory; None means <run_dir>/checkpoints."""


@dataclass
class LoggingConfig:
    """What is reported, where, and how often."""

    interval: int = 10
    """Log every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard events under <run_dir>/tensorboard when tensorboard is installed."""
    wandb: bool = False
    """Log to Weights & Biases when it is installed and this is set."""
    wandb_project: str = "megalite"
    """W&B project name."""
    progress_bar: bool = True
    """Show a console progress bar with ETA on rank 0."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------------
# Derived sizes
# --------------------------------------------------------------------------------------
def head_dim(model: ModelConfig) -> int:
    """Per-head width: hidden_size / num_heads."""
    return model.hidden_size // model.num_heads


def kv_heads(model: ModelConfig) -> int:
    """Key/value heads actually used (num_kv_heads, or num_heads when unset)."""
    return model.num_kv_heads or model.num_heads


def resolved_ffn_hidden_size(model: ModelConfig) -> int:
    """MLP inner width: ffn_hidden_size if set; else 4h for GELU, int(8h/3) rounded up to 256 for SwiGLU.

    The SwiGLU rule keeps the parameter count of a 4h GELU MLP (three matrices
    instead of two); rounding to Llama's multiple_of=256 gives its h=4096 -> 11008.
    """
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if model.activation == "swiglu":
        return -(-int(8 * model.hidden_size / 3) // 256) * 256
    return 4 * model.hidden_size


def padded_vocab_size(model: ModelConfig, tp: int = 1) -> int:
    """vocab_size rounded up to a multiple of pad_vocab_to * tp (every tp shard gets equal, aligned rows)."""
    multiple = model.pad_vocab_to * tp
    return -(-model.vocab_size // multiple) * multiple


# --------------------------------------------------------------------------------------
# Loading: YAML file or preset, then dotted overrides, coerced to the field types
# --------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the value and the rule (one per line)."""


def _section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def list_presets() -> list[str]:
    """Names of the presets shipped in megalite/configs (usable wherever a CONFIG is asked for)."""
    root = importlib.resources.files("megalite").joinpath("configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_source(name_or_path: str) -> tuple[dict, str]:
    """YAML text of a file path or a preset name, parsed to a dict; also a label for messages."""
    looks_like_path = name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path
    if looks_like_path or Path(name_or_path).is_file():
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; give a YAML path or a preset "
                              f"({', '.join(list_presets())})")
        text, label = path.read_text(encoding="utf-8"), str(path)
    else:
        presets = list_presets()
        if name_or_path not in presets:
            raise ConfigError(f"unknown preset {name_or_path!r}{_did_you_mean(name_or_path, presets)}; "
                              f"presets: {', '.join(presets)} (or give a YAML path)")
        res = importlib.resources.files("megalite").joinpath("configs", f"{name_or_path}.yaml")
        text, label = res.read_text(encoding="utf-8"), f"preset {name_or_path}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: top level must be a mapping of sections (model:, train:, ...), "
                          f"got {type(data).__name__}")
    return data, label


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "a list of str"
    return {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a str",
            type(None): "null"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """`value` converted to field type `tp`, or ConfigError naming key, value and expected type.

    Lenient only where YAML is surprising: '1e-3' (a str to PyYAML) is a float,
    an integral number like 1e4 is an int, a number is accepted for a str field.
    """
    bad = ConfigError(f"{key}={value!r} must be {_type_name(tp)}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        tp, origin = args[0], typing.get_origin(args[0])
    if origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or any(isinstance(v, (list, dict, type(None))) for v in value):
            raise bad
        return [str(v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(value, bool):
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad
    if tp in (int, float) and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad from None
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    if tp is int and isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    raise bad


def _set_field(cfg: Config, section: str, key: str, value, source: str, parsed: bool = True) -> None:
    """Assign cfg.section.key = value after checking the names and coercing the type.

    `parsed` False means `value` is raw override text: str and list fields take it
    literally (so '1:30' or 'yes' stay strings), the rest go through YAML.
    """
    sections = _section_types()
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r}{_did_you_mean(section, sections)}; "
                          f"sections: {', '.join(sections)}")
    hints = typing.get_type_hints(sections[section])
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}{_did_you_mean(key, hints)}; "
                          f"keys of {section}: {', '.join(hints)}")
    tp = hints[key]
    if not parsed:
        value = _parse_override_value(value, tp, f"{section}.{key}")
    setattr(getattr(cfg, section), key, _coerce(value, tp, f"{section}.{key}"))


def _parse_override_value(raw: str, tp, key: str):
    """Raw override text -> Python value. See load_config for the rules."""
    text = raw.strip()
    optional = type(None) in typing.get_args(tp)
    if optional and text in ("null", "~", "None"):
        return None
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if typing.get_origin(base) is list:
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
    if base is str:
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        return text[1:-1] if quoted else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key}={raw!r} must be {_type_name(tp)}") from None


def load_config(name_or_path: str, overrides: typing.Iterable[str] = ()) -> Config:
    """Config from a YAML file or shipped preset, then `section.key=value` overrides.

    Sections and keys missing from the YAML keep their defaults. Override values:
    str fields take the text literally (quotes stripped); list fields split on
    commas, with or without brackets (`data.path=[a,b]`, `data.path=0.3,A,0.7,B`,
    `data.path=[]`); `null` sets an optional field to None; everything else is
    parsed as YAML (`train.steps=100`, `optim.lr=3e-4`, `model.bias=true`) and
    checked against the field's type. All unknown names and type errors are
    reported together. The result is not validated: call `validate`.
    """
    data, label = _read_source(str(name_or_path))
    cfg, errors = Config(), []
    for section, values in data.items():
        pairs = values.items() if isinstance(values, dict) else []
        if section in _section_types() and not isinstance(values, (dict, type(None))):
            errors.append(f"{label}: section {section!r} must be a mapping of keys, got {values!r}")
        elif section not in _section_types():
            pairs = [(None, None)]  # reported by _set_field with a did-you-mean
        for key, value in pairs:
            try:
                _set_field(cfg, str(section), str(key), value, label)
            except ConfigError as e:
                errors.append(str(e) if str(e).startswith(label) else f"{label}: {e}")
    for text in overrides:
        dotted, eq, raw = str(text).partition("=")
        parts = dotted.strip().split(".")
        try:
            if not eq or len(parts) != 2 or not all(parts):
                raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.steps=100")
            _set_field(cfg, parts[0], parts[1], raw, f"override {text!r}", parsed=False)
        except ConfigError as e:
            errors.append(str(e) if str(e).startswith("override") else f"override {text!r}: {e}")
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def to_yaml(cfg: Config) -> str:
    """The whole resolved config as YAML; load_config(path of it) gives an equal Config."""
    return yaml.safe_dump(asdict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path) -> None:
    """Write to_yaml(cfg) to `path` atomically (temp file, fsync, rename): never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(to_yaml(cfg))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# Validation: every rule, every error at once, before any process group exists
# --------------------------------------------------------------------------------------
CHOICES = {
    "model.norm": ("rmsnorm", "layernorm"),
    "model.position": ("rope", "learned"),
    "model.activation": ("swiglu", "gelu"),
    "parallel.schedule": ("1f1b", "interleaved", "afab"),
    "data.tokenizer_type": ("SentencePieceTokenizer", "HuggingFaceTokenizer"),
    "optim.decay": ("cosine", "linear", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cuda", "cpu"),
    "engine.backend": ("native", "deepspeed"),
}
POSITIVE = ("model.vocab_size", "model.pad_vocab_to", "model.hidden_size", "model.num_layers", "model.num_heads",
            "model.num_kv_heads", "model.ffn_hidden_size", "model.max_seq_len", "model.norm_eps",
            "model.rope_theta", "model.init_std", "parallel.tp", "parallel.pp", "parallel.dp",
            "parallel.virtual_stages", "parallel.timeout_s", "data.seq_len", "optim.eps", "optim.decay_steps",
            "train.steps", "train.micro_batch_size", "train.global_batch_size", "train.eval_steps",
            "train.initial_loss_scale", "train.loss_scale_window", "train.min_loss_scale",
            "checkpoint.keep_last", "logging.interval")
NON_NEGATIVE = ("data.num_workers", "optim.weight_decay", "optim.warmup_steps", "optim.clip_grad",
                "train.eval_interval", "checkpoint.interval")


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _check_types(cfg: Config, err) -> bool:
    """Fields set from code (not YAML) can hold anything; check them before doing arithmetic."""
    ok = True
    for section, cls in _section_types().items():
        for key, tp in typing.get_type_hints(cls).items():
            value = getattr(getattr(cfg, section), key)
            try:
                coerced = _coerce(value, tp, f"{section}.{key}")
                int_as_float = type(value) is int and isinstance(coerced, float)
                if coerced != value or (type(coerced) is not type(value) and not int_as_float):
                    raise ConfigError(f"{section}.{key}={value!r} must be {_type_name(tp)}")
            except ConfigError as e:
                err(str(e))
                ok = False
    return ok


def _check_generic(cfg: Config, err) -> None:
    for dotted, allowed in CHOICES.items():
        if _get(cfg, dotted) not in allowed:
            value = _get(cfg, dotted)
            err(f"{dotted}={value!r} must be one of {', '.join(allowed)}{_did_you_mean(str(value), allowed)}")
    for dotted in POSITIVE:
        value = _get(cfg, dotted)
        if value is not None and value <= 0:
            err(f"{dotted}={value!r} must be > 0")
    for dotted in NON_NEGATIVE:
        if _get(cfg, dotted) < 0:
            err(f"{dotted}={_get(cfg, dotted)!r} must be >= 0")


def _check_model(cfg: Config, err) -> None:
    m, tp = cfg.model, cfg.parallel.tp
    if m.num_heads > 0 and m.hidden_size % m.num_heads:
        err(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
    elif m.num_heads > 0 and m.position == "rope" and head_dim(m) % 2:
        err(f"model.hidden_size={m.hidden_size} / model.num_heads={m.num_heads} = head_dim {head_dim(m)} "
            "must be even for position='rope' (rotary turns pairs of channels)")
    if m.num_kv_heads and m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
        err(f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads} "
            "(each kv head serves a whole group of query heads)")
    if not 0 <= m.dropout < 1:
        err(f"model.dropout={m.dropout} must be in [0, 1)")
    if tp > 1:
        if m.num_heads % tp:
            err(f"model.num_heads={m.num_heads} must be divisible by parallel.tp={tp} (heads are split over tp)")
        if kv_heads(m) % tp:
            err(f"model.num_kv_heads={kv_heads(m)} must be divisible by parallel.tp={tp} "
                "(kv heads are split over tp, not replicated)")
        if m.hidden_size > 0 and resolved_ffn_hidden_size(m) % tp:
            err(f"model.ffn_hidden_size={resolved_ffn_hidden_size(m)} must be divisible by parallel.tp={tp}")


def _check_parallel(cfg: Config, world_size: int | None, err) -> None:
    p, m = cfg.parallel, cfg.model
    dims = sorted(str(p.order).split("-"))
    if dims != ["dp", "pp", "tp"]:
        err(f"parallel.order={p.order!r} must be a permutation of tp, dp and pp joined by '-', e.g. 'tp-dp-pp'")
    if p.virtual_stages > 1 and p.pp == 1:
        err(f"parallel.virtual_stages={p.virtual_stages} requires parallel.pp > 1")
    if p.schedule == "interleaved" and p.virtual_stages == 1:
        err("parallel.schedule='interleaved' requires parallel.virtual_stages > 1 (chunks per pipeline rank)")
    if p.sequence_parallel and p.tp == 1:
        err("parallel.sequence_parallel=True requires parallel.tp > 1 (it splits activations over tp)")
    if p.pp > 0 and p.virtual_stages > 0 and m.num_layers % (p.pp * p.virtual_stages):
        err(f"model.num_layers={m.num_layers} must be divisible by parallel.pp * parallel.virtual_stages = "
            f"{p.pp}*{p.virtual_stages} = {p.pp * p.virtual_stages} (equal layers per model chunk)")
    if world_size is None or p.tp <= 0 or p.pp <= 0:
        return
    if world_size % (p.tp * p.pp):
        err(f"world_size={world_size} must be divisible by parallel.tp * parallel.pp = {p.tp}*{p.pp}; "
            f"launch a multiple of {p.tp * p.pp} ranks")
    elif p.dp is not None and p.dp * p.tp * p.pp != world_size:
        err(f"parallel.dp={p.dp} must equal world_size / (tp*pp) = {world_size // (p.tp * p.pp)}; "
            "or leave it unset (null) to infer it")


def _check_train(cfg: Config, world_size: int | None, err) -> None:
    t, o, p = cfg.train, cfg.optim, cfg.parallel
    dp = p.dp or (world_size // (p.tp * p.pp) if world_size and p.tp > 0 and p.pp > 0 else 1)
    if t.micro_batch_size > 0 and dp > 0 and t.global_batch_size % (t.micro_batch_size * dp):
        err(f"train.global_batch_size={t.global_batch_size} must be divisible by train.micro_batch_size * dp = "
            f"{t.micro_batch_size}*{dp} = {t.micro_batch_size * dp}")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        err(f"data.seq_len={cfg.data.seq_len} must be <= model.max_seq_len={cfg.model.max_seq_len}")
    if o.warmup_steps > t.steps:
        err(f"optim.warmup_steps={o.warmup_steps} must be <= train.steps={t.steps}; lower optim.warmup_steps or raise train.steps")
    if o.lr < o.min_lr:
        err(f"optim.lr={o.lr} must be >= optim.min_lr={o.min_lr}")
    if o.min_lr < 0:
        err(f"optim.min_lr={o.min_lr} must be >= 0")
    for key, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0 <= beta < 1:
            err(f"{key}={beta} must be in [0, 1)")
    if t.precision == "fp16" and t.device == "cpu":
        err("train.precision='fp16' is not supported with train.device='cpu'; use 'bf16' or 'fp32' on CPU")
    if t.min_loss_scale > t.initial_loss_scale:
        err(f"train.min_loss_scale={t.min_loss_scale} must be <= train.initial_loss_scale={t.initial_loss_scale}")
    e = cfg.engine
    if e.zero_stage not in (0, 1, 2, 3):
        err(f"engine.zero_stage={e.zero_stage} must be 0, 1, 2 or 3")
    elif e.zero_stage > 0 and e.backend != "deepspeed":
        err(f"engine.zero_stage={e.zero_stage} requires engine.backend='deepspeed' (got {e.backend!r})")
    _check_engine(cfg, err)


def _check_engine(cfg: Config, err) -> None:
    """DeepSpeed-only fields, and the ZeRO x pipeline combinations that are refused (with the reason)."""
    e, p = cfg.engine, cfg.parallel
    if e.backend != "deepspeed":
        for key, default in (("overlap_comm", False), ("offload_optimizer", False), ("offload_params", False),
                             ("ds_config", None)):
            if getattr(e, key) != default:
                err(f"engine.{key}={getattr(e, key)!r} requires engine.backend='deepspeed' (got {e.backend!r})")
        return
    if e.zero_bucket_size <= 0:
        err(f"engine.zero_bucket_size={e.zero_bucket_size} must be > 0 (elements per bucket, e.g. 50000000)")
    if e.offload_params and e.zero_stage != 3:
        err(f"engine.offload_params=True requires engine.zero_stage=3 (got {e.zero_stage}): only ZeRO-3 "
            "partitions parameters; nearest valid: engine.zero_stage=3, or engine.offload_params=false")
    if e.offload_optimizer and e.zero_stage == 0:
        err("engine.offload_optimizer=True requires engine.zero_stage >= 1 (ZeRO-0 has no sharded optimizer "
            "to offload); nearest valid: engine.zero_stage=1")
    if e.zero_stage >= 2 and p.pp > 1:
        err(f"engine.zero_stage={e.zero_stage} with parallel.pp={p.pp} is refused: ZeRO-{e.zero_stage} reduce-scatters "
            "gradients from hooks driven by DeepSpeed's own backward, which non-last pipeline stages (they run "
            "autograd.backward on their outputs with the received gradients) bypass"
            f"{', and it would re-gather every parameter once per micro-batch' if e.zero_stage == 3 else ''}; "
            "nearest valid: engine.zero_stage=1, or parallel.pp=1 (ZeRO-2/3 with tp x dp)")
    if e.zero_stage <= 1 and p.pp > 1:
        _check_pipeline_zero1(cfg, err)
    if e.ds_config is not None and not os.path.isfile(e.ds_config):
        err(f"engine.ds_config={e.ds_config!r} does not exist; give the path of a DeepSpeed JSON or null")
    if e.offload_optimizer:
        _check_cpu_adam(err)


def _check_pipeline_zero1(cfg: Config, err) -> None:
    """ZeRO-1 under megalite's pipeline scheduler (see megalite/engine/deepspeed.py)."""
    from megalite.engine.ds_config import PIPELINE_ZERO1_REASON, PIPELINE_ZERO1_SUPPORTED

    if not PIPELINE_ZERO1_SUPPORTED:
        err(f"engine.backend='deepspeed' (zero_stage={cfg.engine.zero_stage}) with parallel.pp={cfg.parallel.pp} "
            f"is refused: {PIPELINE_ZERO1_REASON}; nearest valid: engine.backend=native (with pp), or parallel.pp=1")


def _check_cpu_adam(err) -> None:
    """Offload needs DeepSpeed's compiled cpu_adam op: fail here, not minutes into the launch."""
    from megalite.engine.deepspeed import cpu_adam_problem  # imports DeepSpeed: only when offloading

    problem = cpu_adam_problem()
    if problem:
        err(f"engine.offload_optimizer=True needs DeepSpeed's cpu_adam op, but {problem}; nearest valid: "
            "engine.offload_optimizer=false (optimizer states sharded on the device), or rebuild DeepSpeed "
            "with DS_BUILD_CPU_ADAM=1")


def _check_data(cfg: Config, err) -> None:
    d = cfg.data
    parts = [s.strip() for s in str(d.split).split(",")]
    try:
        weights = [float(s) for s in parts]
        if len(weights) > 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError
    except ValueError:
        err(f"data.split={d.split!r} must be up to three non-negative numbers with a positive sum, e.g. '969,30,1'")
    path = list(d.path)
    if path and _is_number(path[0]):  # weighted form: weight, prefix, weight, prefix, ...
        bad = len(path) % 2 or any(not _is_number(w) or float(w) <= 0 for w in path[0::2])
        if bad or any(_is_number(p) for p in path[1::2]):
            err(f"data.path={path!r} must alternate positive weights and prefixes, e.g. [0.3, A, 0.7, B], "
                "or list prefixes only")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Raise ConfigError listing every broken rule (one per line, each naming key, value and rule).

    `world_size` (when known) also checks that tp*pp divides it and that dp and
    the batch sizes fit. Returns cfg unchanged, so `validate(load_config(...))` chains.
    Pure: it never looks at the machine, so fp16 is refused only for device='cpu'
    (device='auto' is resolved later, where the hardware is known).
    """
    errors: list[str] = []
    err = errors.append
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int)
                                   or world_size < 1):
        err(f"world_size={world_size!r} must be a positive integer")
        world_size = None
    if _check_types(cfg, err):
        _check_generic(cfg, err)
        _check_model(cfg, err)
        _check_parallel(cfg, world_size, err)
        _check_train(cfg, world_size, err)
        _check_data(cfg, err)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg
