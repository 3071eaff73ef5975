"""Validation: every rule of the config itself checked, every broken one reported at once (key,
value, rule). Pure: it reads no file and imports nothing outside megalite.config, so it runs
anywhere in microseconds; the checks that need the data, the tokenizer or the engine live with
them (megalite.data.checks, megalite.engine.checks) and run from megalite.preflight."""
from __future__ import annotations

import math

from megalite.config.batch_rampup import parse_rampup, ramp_sizes
from megalite.config.blend import parse_data_path
from megalite.config.fields import coerce, describe_type, field_types, section_types
from megalite.config.sections import Config, ConfigError, head_dim, is_moe_layer, kv_heads, resolved_ffn_hidden_size
from megalite.config.seq_schedule import parse_seq_len_schedule
from megalite.config.skip_samples import parse_skip_samples

SPLITS = ("train", "valid", "test")
POSITIVE = ("model.vocab_size", "model.pad_vocab_to", "model.hidden_size", "model.num_layers", "model.num_heads",
            "model.head_dim", "model.num_kv_heads", "model.ffn_hidden_size", "model.max_seq_len", "model.norm_eps",
            "model.rope_theta", "model.rope_scaling_factor", "model.rope_low_freq_factor",
            "model.rope_high_freq_factor", "model.rope_original_max_seq_len", "model.rope_beta_fast",
            "model.rope_beta_slow", "model.rope_attention_factor", "model.init_std",
            "parallel.tp", "parallel.pp", "parallel.cp", "parallel.ep", "parallel.dp", "parallel.virtual_stages",
            "parallel.timeout_s",
            "data.seq_len", "optim.eps", "optim.decay_steps", "train.steps", "train.micro_batch_size",
            "train.global_batch_size", "train.eval_steps", "train.initial_loss_scale", "train.loss_scale_window",
            "train.min_loss_scale", "checkpoint.keep_last", "logging.interval", "model.attention_window",
            "model.moe_top_k", "model.moe_every", "model.moe_ffn_hidden_size", "model.moe_capacity_factor")
NON_NEGATIVE = ("data.num_workers", "optim.weight_decay", "optim.warmup_steps", "optim.clip_grad",
                "train.eval_interval", "checkpoint.interval", "model.global_attention_every",
                "model.moe_num_experts", "model.moe_first_dense", "model.moe_shared_experts",
                "model.moe_aux_loss_coeff", "model.moe_z_loss_coeff")


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _check_types(cfg: Config, err) -> bool:
    """Fields set from code (not YAML) can hold anything; check them before doing arithmetic."""
    ok = True
    for section in section_types():
        for key, tp in field_types(section).items():
            value = getattr(getattr(cfg, section), key)
            try:
                coerced = coerce(value, tp, f"{section}.{key}")
                int_as_float = type(value) is int and isinstance(coerced, float)
                if coerced != value or (type(coerced) is not type(value) and not int_as_float):
                    raise ConfigError(f"{section}.{key}={value!r} must be {describe_type(tp)}")
            except ConfigError as e:
                err(str(e))
                ok = False
    return ok


def _check_generic(cfg: Config, err) -> None:
    for dotted in POSITIVE:
        value = _get(cfg, dotted)
        if value is not None and value <= 0:
            err(f"{dotted}={value!r} must be > 0")
    for dotted in NON_NEGATIVE:
        if _get(cfg, dotted) < 0:
            err(f"{dotted}={_get(cfg, dotted)!r} must be >= 0")


def _check_model(cfg: Config, err) -> None:
    m, tp = cfg.model, cfg.parallel.tp
    if m.num_heads > 0 and m.head_dim is None and m.hidden_size % m.num_heads:
        err(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads} "
            "(or set model.head_dim)")
    elif m.num_heads > 0 and m.position == "rope" and head_dim(m) > 0 and head_dim(m) % 2:
        err(f"model.hidden_size={m.hidden_size} / model.num_heads={m.num_heads} (or model.head_dim) = head_dim "
            f"{head_dim(m)} "
            "must be even for position='rope' (rotary turns pairs of channels)")
    if m.num_kv_heads and m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
        err(f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads} "
            "(each kv head serves a whole group of query heads)")
    if not 0 <= m.dropout < 1:
        err(f"model.dropout={m.dropout} must be in [0, 1)")
    if m.moe_num_experts > 0 and m.moe_top_k > m.moe_num_experts:
        err(f"model.moe_top_k={m.moe_top_k} must be <= model.moe_num_experts={m.moe_num_experts} (a token is "
            "routed to that many distinct experts)")
    if m.moe_num_experts > 0 and not any(is_moe_layer(m, layer) for layer in range(1, m.num_layers + 1)):
        err(f"model.moe_num_experts={m.moe_num_experts} but no layer is MoE: moe_every={m.moe_every} and "
            f"moe_first_dense={m.moe_first_dense} leave all {m.num_layers} layers dense; lower them")
    _check_rope_scaling(m, err)
    if m.global_attention_every and m.attention_window is None:
        err(f"model.global_attention_every={m.global_attention_every} picks the global layers among windowed "
            "ones, but model.attention_window is None; set model.attention_window or "
            "model.global_attention_every=0")
    if tp > 1:
        if m.num_heads % tp:
            err(f"model.num_heads={m.num_heads} must be divisible by parallel.tp={tp} (heads are split over tp)")
        if kv_heads(m) % tp:
            err(f"model.num_kv_heads={kv_heads(m)} must be divisible by parallel.tp={tp} "
                "(kv heads are split over tp, not replicated)")
        if m.hidden_size > 0 and resolved_ffn_hidden_size(m) % tp:
            err(f"model.ffn_hidden_size={resolved_ffn_hidden_size(m)} must be divisible by parallel.tp={tp}")


_YARN_DEFAULTS = {"rope_beta_fast": 32.0, "rope_beta_slow": 1.0, "rope_attention_factor": None, "rope_mscale": None,
                 "rope_mscale_all_dim": None, "rope_truncate": True}  # transformers' defaults


def _check_rope_scaling(m, err) -> None:
    """Scaling settings that would be silently ignored, or divide by zero in the llama3 interpolation."""
    if m.rope_scaling != "none" and m.position != "rope":
        err(f"model.rope_scaling={m.rope_scaling!r} needs model.position='rope' (not {m.position!r}); "
            "or set model.rope_scaling=none")
    if m.rope_scaling == "none" and m.rope_scaling_factor != 1.0:
        err(f"model.rope_scaling_factor={m.rope_scaling_factor} has no effect with model.rope_scaling='none'; "
            "set model.rope_scaling=linear, llama3, yarn or dynamic, or the factor to 1")
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        err(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must be > model.rope_low_freq_factor="
            f"{m.rope_low_freq_factor} for model.rope_scaling='llama3' (Llama 3.1 uses 4 and 1)")
    for key, default in _YARN_DEFAULTS.items():
        value = getattr(m, key)
        if m.rope_scaling != "yarn" and value != default:
            err(f"model.{key}={value!r} has no effect with model.rope_scaling={m.rope_scaling!r}; "
                f"set model.rope_scaling=yarn, or model.{key}={'null' if default is None else default}")
    for key in ("rope_mscale", "rope_mscale_all_dim"):
        if isinstance(getattr(m, key), (int, float)) and getattr(m, key) < 0:
            err(f"model.{key}={getattr(m, key)!r} must be >= 0 (or null: the attention factor from the factor alone)")
    if m.rope_scaling == "yarn" and m.rope_beta_fast < m.rope_beta_slow:
        err(f"model.rope_beta_fast={m.rope_beta_fast} must be >= model.rope_beta_slow={m.rope_beta_slow} for "
            "model.rope_scaling='yarn' (YaRN uses 32 and 1)")
    if m.rope_scaling == "dynamic" and m.num_heads > 0 and head_dim(m) == 2:
        err("model.rope_scaling='dynamic' needs head_dim > 2 (its theta exponent is d / (d - 2)); "
            "raise model.head_dim or use another rope_scaling")


def _check_parallel(cfg: Config, world_size: int | None, err) -> None:
    p, m = cfg.parallel, cfg.model
    if p.virtual_stages > 1 and p.pp == 1:
        err(f"parallel.virtual_stages={p.virtual_stages} requires parallel.pp > 1")
    if p.schedule == "interleaved" and p.virtual_stages == 1:
        err("parallel.schedule='interleaved' requires parallel.virtual_stages > 1 (chunks per pipeline rank)")
    if p.sequence_parallel and p.tp == 1:
        err("parallel.sequence_parallel=True requires parallel.tp > 1 (it splits activations over tp)")
    chunks = p.pp * p.virtual_stages
    if p.pp > 0 and p.virtual_stages > 0 and p.partition == "balanced" and m.num_layers < chunks:
        err(f"model.num_layers={m.num_layers} must be >= parallel.pp * parallel.virtual_stages = "
            f"{p.pp}*{p.virtual_stages} = {chunks} with parallel.partition='balanced' (every model chunk "
            "needs a layer); lower parallel.pp or parallel.virtual_stages")
    elif p.pp > 0 and p.virtual_stages > 0 and p.partition != "balanced" and m.num_layers % chunks:
        err(f"model.num_layers={m.num_layers} must be divisible by parallel.pp * parallel.virtual_stages = "
            f"{p.pp}*{p.virtual_stages} = {chunks} (equal layers per model chunk with parallel.partition="
            f"{p.partition!r}); or set parallel.partition='balanced' to cut by parameter count")
    if p.cp > 1:
        _check_context_parallel(cfg, err)
    if p.ep > 1:
        _check_expert_parallel(cfg, world_size, err)
    if world_size is None or p.tp <= 0 or p.pp <= 0 or p.cp <= 0:
        return
    split = p.tp * p.cp * p.pp
    if world_size % split:
        err(f"world_size={world_size} must be divisible by parallel.tp * parallel.cp * parallel.pp = "
            f"{p.tp}*{p.cp}*{p.pp}; launch a multiple of {split} ranks")
    elif p.dp is not None and p.dp * split != world_size:
        err(f"parallel.dp={p.dp} must equal world_size / (tp*cp*pp) = {world_size // split}; "
            "or leave it unset (null) to infer it")


def _check_expert_parallel(cfg: Config, world_size: int | None, err) -> None:
    p, m = cfg.parallel, cfg.model
    if not m.moe_num_experts:
        err(f"parallel.ep={p.ep} needs an MoE model (model.moe.num_experts > 0): there are no experts to shard")
    elif m.moe_num_experts % p.ep:
        err(f"parallel.ep={p.ep} must divide model.moe_num_experts={m.moe_num_experts} (each expert-parallel rank "
            "holds an equal share of the experts); set model.moe.num_experts or parallel.ep")
    if cfg.engine.backend == "deepspeed" and cfg.engine.zero_stage == 3:
        err(f"parallel.ep={p.ep} with engine.zero_stage=3: DeepSpeed partitions only its own AutoEP layers' "
            "experts under ZeRO-3; use engine.zero_stage 1 or 2 (experts sharded over their edp group)")
    if cfg.train.precision == "fp16":
        err(f"parallel.ep={p.ep} with train.precision=fp16: dynamic loss scaling with expert parallelism is not "
            "tested yet; use bf16 or fp32")
    split = p.tp * p.cp * p.pp
    if world_size and min(p.tp, p.cp, p.pp) > 0 and world_size % split == 0:
        dp = p.dp or world_size // split
        if (dp * p.cp) % p.ep:
            err(f"parallel.ep={p.ep} must divide dp * cp = {dp}*{p.cp} = {dp * p.cp} (expert-parallel groups are "
                "carved from the data- and context-parallel ranks); change parallel.ep or the world size")


def _cp_chunk_rule(cfg: Config) -> tuple[int, str]:
    """What every sequence length must divide by under context parallelism, and why."""
    p = cfg.parallel
    sp = p.tp if p.sequence_parallel and p.tp > 1 else 1
    why = f"2 * parallel.cp = {2 * p.cp} load-balanced chunks"
    return 2 * p.cp * sp, why + (f", each rank's share split over parallel.tp={sp} by sequence parallelism"
                                 if sp > 1 else "")


def _check_context_parallel(cfg: Config, err) -> None:
    p, m = cfg.parallel, cfg.model
    multiple, why = _cp_chunk_rule(cfg)
    if cfg.data.seq_len % multiple:
        err(f"data.seq_len={cfg.data.seq_len} must be divisible by {multiple} with parallel.cp={p.cp} ({why})")
    if m.dropout > 0:
        err(f"model.dropout={m.dropout} with parallel.cp={p.cp}: ring attention has no attention dropout; "
            "set model.dropout=0 or parallel.cp=1")
    if cfg.train.compile:
        err(f"train.compile=True with parallel.cp={p.cp}: the compiled blocks are not traced through ring "
            "attention's point-to-point exchange; set train.compile=false or parallel.cp=1")


def _check_train(cfg: Config, world_size: int | None, err) -> None:
    t, o, p = cfg.train, cfg.optim, cfg.parallel
    dp = p.dp or (world_size // (p.tp * p.pp * p.cp) if world_size and min(p.tp, p.pp, p.cp) > 0 else 1)
    if t.micro_batch_size > 0 and dp > 0 and t.global_batch_size % (t.micro_batch_size * dp):
        err(f"train.global_batch_size={t.global_batch_size} must be divisible by train.micro_batch_size * dp = "
            f"{t.micro_batch_size}*{dp} = {t.micro_batch_size * dp}")
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp) if t.micro_batch_size > 0 and dp > 0 else 0
    if p.virtual_stages > 1 and p.pp > 1 and micro_batches % p.pp:
        err(f"parallel.virtual_stages={p.virtual_stages} (interleaved 1F1B) needs the micro-batches per step, "
            f"global_batch_size / (micro_batch_size * dp) = {micro_batches}, to be a multiple of parallel.pp="
            f"{p.pp}; change train.global_batch_size or train.micro_batch_size")
    if p.sequence_parallel and p.tp > 1 and cfg.data.seq_len % p.tp:
        err(f"data.seq_len={cfg.data.seq_len} must be divisible by parallel.tp={p.tp} with "
            "parallel.sequence_parallel=True (each tp rank holds an equal slice of the sequence)")
    if t.recompute_num_layers < 0 or t.recompute_num_layers > cfg.model.num_layers:
        err(f"train.recompute_num_layers={t.recompute_num_layers} must be in 0..model.num_layers="
            f"{cfg.model.num_layers} (0: every layer)")
    if t.recompute_num_layers and t.activation_checkpointing != "full":
        err(f"train.recompute_num_layers={t.recompute_num_layers} needs train.activation_checkpointing='full' "
            f"(got {t.activation_checkpointing!r}); set it to 0 or choose 'full'")
    if t.compile and cfg.model.moe_num_experts > 0:
        err(f"train.compile=True with model.moe_num_experts={cfg.model.moe_num_experts}: the expert loop's "
            "data-dependent token counts do not compile; set train.compile=false")
    if t.compile and cfg.model.dropout > 0:
        err(f"train.compile=True needs model.dropout=0 (got {cfg.model.dropout}): compiled blocks would draw "
            "dropout masks from Inductor's generator, not the tensor-parallel RNG tracker (masks neither per tp "
            "rank nor reproducible on resume); set model.dropout=0 or train.compile=false")
    if t.compile and p.sequence_parallel and p.tp > 1:
        err(f"train.compile=True does not work with parallel.sequence_parallel=True (tp={p.tp}): Dynamo (torch "
            "2.13) fails tracing the backward of the sequence-parallel linear; set parallel.sequence_parallel=false "
            "or train.compile=false")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        err(f"data.seq_len={cfg.data.seq_len} must be <= model.max_seq_len={cfg.model.max_seq_len}")
    if o.warmup_steps > t.steps:
        err(f"optim.warmup_steps={o.warmup_steps} must be <= train.steps={t.steps}; lower optim.warmup_steps or "
            "raise train.steps")
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
    if e.zero_stage > 0 and e.backend != "deepspeed":
        err(f"engine.zero_stage={e.zero_stage} requires engine.backend='deepspeed' (got {e.backend!r})")
    _check_engine(cfg, err)


def _check_lr_schedule(cfg: Config, err) -> None:
    """optim.decay's own settings: the wsd_* ones only with 'wsd', a decay phase after the warmup and inside
    the run, and no decay_steps for 'inverse-square-root' (which has no end)."""
    o, steps = cfg.optim, cfg.train.steps
    if o.decay != "wsd":
        for key in ("wsd_decay_steps", "wsd_decay_start_step"):
            if getattr(o, key) is not None:
                err(f"optim.{key}={getattr(o, key)} applies only to optim.decay='wsd' (got {o.decay!r}); set "
                    f"optim.decay=wsd or drop optim.{key}")
    if o.decay == "inverse-square-root" and o.decay_steps is not None:
        err(f"optim.decay_steps={o.decay_steps} does not apply to optim.decay='inverse-square-root' (lr * "
            "sqrt(warmup_steps / step), floored at min_lr, has no end); drop optim.decay_steps")
    if o.decay != "wsd" or o.warmup_steps < 0 or (o.decay_steps is not None and o.decay_steps < 1):
        return
    if not 0 < o.wsd_decay_fraction <= 1:
        err(f"optim.wsd_decay_fraction={o.wsd_decay_fraction} must be in (0, 1] (the share of the steps after "
            "warmup that decay; 0.2 is the default), or set optim.wsd_decay_steps")
        return
    if o.wsd_decay_steps is not None and o.wsd_decay_steps < 1:
        err(f"optim.wsd_decay_steps={o.wsd_decay_steps} must be >= 1, or null for optim.wsd_decay_fraction of the "
            "steps after warmup")
        return
    span = max(o.decay_steps if o.decay_steps is not None else steps - o.warmup_steps, 1)
    end, start = o.warmup_steps + span, o.wsd_decay_start_step
    if start is None:
        length = o.wsd_decay_steps or max(1, round(o.wsd_decay_fraction * span))
        if length > span:
            err(f"optim.wsd_decay_steps={length} is longer than the {span} steps after warmup (optim.decay_steps, "
                "or train.steps - optim.warmup_steps); lower optim.wsd_decay_steps or raise train.steps")
        return
    if start < o.warmup_steps:
        err(f"optim.wsd_decay_start_step={start} is inside the warmup (optim.warmup_steps={o.warmup_steps}); the "
            f"decay starts after the warmup: use optim.wsd_decay_start_step >= {o.warmup_steps}")
    elif start >= steps:
        to = f"{start + o.wsd_decay_steps}" if o.wsd_decay_steps else f"{start} + the cooldown's steps"
        err(f"optim.wsd_decay_start_step={start} is at or after the run's last step (train.steps={steps}), so no "
            f"step decays; set train.steps={to}")
    elif o.wsd_decay_steps is None and start >= end:
        err(f"optim.wsd_decay_start_step={start} leaves no step to decay: the decay phase would end at step {end} "
            "(optim.warmup_steps + optim.decay_steps); set optim.wsd_decay_steps or drop optim.decay_steps")


def _check_engine(cfg: Config, err) -> None:
    """DeepSpeed-only fields, and the ZeRO x pipeline combinations that are refused (with the reason).

    The raw DeepSpeed JSON and the cpu_adam op are checked by megalite.engine.checks (pre-flight)."""
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
    if e.zero_stage == 0 and cfg.train.precision != "fp32":
        err(f"engine.zero_stage=0 with train.precision={cfg.train.precision!r} is refused: DeepSpeed runs it through "
            "its FP16_UnfusedOptimizer (half-precision weights, its own fp32 copies), whose state megalite can "
            "neither checkpoint nor clip with the tp/pp-aware norm; nearest valid: engine.zero_stage=1 (same "
            "mixed precision, optimizer state sharded), or train.precision='fp32'")
    if e.overlap_comm and e.zero_stage < 2:
        err(f"engine.overlap_comm=True with engine.zero_stage={e.zero_stage} is refused: DeepSpeed overlaps the "
            "gradient reduction with backward only when gradients are partitioned (ZeRO-2/3), and asserts otherwise "
            "under megalite's step-bounded accumulation; nearest valid: engine.overlap_comm=false, or "
            "engine.zero_stage=2")
    if e.zero_stage >= 2 and p.pp > 1:
        err(f"engine.zero_stage={e.zero_stage} with parallel.pp={p.pp} is refused: ZeRO-{e.zero_stage} reduce-scatters "
            "gradients from hooks driven by DeepSpeed's own backward, which non-last pipeline stages (they run "
            "autograd.backward on their outputs with the received gradients) bypass"
            f"{', and it would re-gather every parameter once per micro-batch' if e.zero_stage == 3 else ''}; "
            "nearest valid: engine.zero_stage=1, or parallel.pp=1 (ZeRO-2/3 with tp x dp)")
    scale = cfg.train.initial_loss_scale
    if cfg.train.precision == "fp16" and scale > 0 and not math.log2(scale).is_integer():
        err(f"train.initial_loss_scale={scale} must be a power of two for the deepspeed engine (it takes "
            f"initial_scale_power); use {2 ** round(math.log2(scale)):g}")


def split_weights(split: str) -> list[float] | None:
    """The three train/valid/test weights of data.split ('969,30,1', missing ones 0), None when malformed."""
    try:
        weights = [float(s) for s in str(split).replace("/", ",").split(",")]
    except ValueError:
        return None
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or not all(map(math.isfinite, weights)) \
            or sum(weights) <= 0:
        return None
    return weights + [0.0] * (3 - len(weights))


def splits_in_use(cfg: Config) -> dict[str, str]:
    """Splits the run reads, each with why (the test split is built but never evaluated)."""
    used = {"train": f"train.steps={cfg.train.steps} trains on it"}
    if cfg.train.eval_interval > 0:
        used["valid"] = f"train.eval_interval={cfg.train.eval_interval} evaluates on it"
    return used


def samples_per_split(cfg: Config) -> dict[str, int]:
    """Samples the run reads from each split: every step's global batch, every evaluation's batches."""
    t = cfg.train
    evals = (t.steps // t.eval_interval + 1) if t.eval_interval else 1
    return {"train": (t.steps + _skipped_steps(cfg)) * t.global_batch_size,
            "valid": evals * t.eval_steps * t.global_batch_size,
            "test": t.eval_steps * t.global_batch_size}


def _skipped_steps(cfg: Config) -> int:
    """Global batches the run may skip besides those it trains on: train.skip_samples, and per rollback
    at most the batches since the latest checkpoint (checkpoint.interval)."""
    t = cfg.train
    try:
        ranges = sum(-(-(end - start) // t.global_batch_size) for start, end in
                     parse_skip_samples(t.skip_samples, t.global_batch_size))
    except (ValueError, ZeroDivisionError):  # validate reports a bad entry
        ranges = 0
    rollbacks = t.stability_max_rollbacks * cfg.checkpoint.interval if t.stability_action == "rollback" else 0
    return ranges + max(rollbacks, 0)


def _check_split_shares(cfg: Config, err) -> None:
    """A split the run reads must have a positive share of data.split."""
    weights = split_weights(cfg.data.split)
    for name, why in splits_in_use(cfg).items():
        if weights[SPLITS.index(name)] == 0:
            fix = "or set train.eval_interval=0" if name == "valid" else "it is the data trained on"
            err(f"data.split={cfg.data.split!r} gives the {name} split a zero share, but {why}; give it a "
                f"positive share, e.g. data.split='969,30,1' ({fix})")


def _check_data(cfg: Config, err) -> None:
    d = cfg.data
    if split_weights(d.split) is None:
        err(f"data.split={d.split!r} must be up to three non-negative numbers with a positive sum, e.g. '969,30,1'")
    else:
        _check_split_shares(cfg, err)
    try:
        schedule = parse_seq_len_schedule(list(d.seq_len_schedule), d.seq_len)
    except ValueError as e:
        err(str(e))
    else:
        tp = cfg.parallel.tp if cfg.parallel.sequence_parallel else 1
        multiple, why = _cp_chunk_rule(cfg) if cfg.parallel.cp > 1 else (tp, f"parallel.tp={tp} by sequence "
                                                                              "parallelism")
        for step, length in schedule:
            if length % multiple:
                err(f"data.seq_len_schedule entry '{step}:{length}': every sequence is split into {why}; use "
                    f"lengths divisible by {multiple}")
    if d.path:
        try:
            parse_data_path(list(d.path))
        except ValueError as e:
            err(f"data.path={list(d.path)!r} must alternate positive weights and prefixes, e.g. "
                f"[0.3, A, 0.7, B], or list prefixes only ({e})")
    # With no data.path the demo corpus and its tokenizer are used, so the end-of-document id is known.
    if d.reset_attention_mask and d.path and not d.tokenizer_model:
        err("data.reset_attention_mask=true needs the end-of-document id of the tokenizer the data was "
            "preprocessed with: set data.tokenizer_model")


def _check_stability(cfg: Config, err) -> None:
    """train.stability_* and train.skip_samples (megalite.stability)."""
    t = cfg.train
    for key, low in (("stability_window", 2), ("stability_min_history", 1), ("stability_max_rollbacks", 0)):
        if getattr(t, key) < low:
            err(f"train.{key}={getattr(t, key)} must be >= {low}")
    if t.stability_min_history > t.stability_window:
        err(f"train.stability_min_history={t.stability_min_history} must be <= train.stability_window="
            f"{t.stability_window} (the window holds the history)")
    if cfg.optim.optimizer != "adamw" and cfg.engine.backend != "native":
        err(f"optim.optimizer={cfg.optim.optimizer} with engine.backend={cfg.engine.backend}: megalite wires only "
            "AdamW into DeepSpeed so far; use engine.backend=native or optim.optimizer=adamw")
    if not 0 <= cfg.optim.muon_momentum < 1:
        err(f"optim.muon_momentum={cfg.optim.muon_momentum} must be in [0, 1) (0.95 is the usual value)")
    if cfg.optim.z_loss < 0:
        err(f"optim.z_loss={cfg.optim.z_loss} must be >= 0 (PaLM used 1e-4; 0 disables it)")
    if not 0 < t.stability_rollback_lr_scale <= 1 or t.stability_rollback_lr_steps < 0:
        err(f"train.stability_rollback_lr_scale={t.stability_rollback_lr_scale} must be in (0, 1] and "
            f"train.stability_rollback_lr_steps={t.stability_rollback_lr_steps} >= 0")
    if not t.stability_threshold > 0:
        err(f"train.stability_threshold={t.stability_threshold} must be > 0 (a robust z-score; 6 is the default)")
    if t.stability_action == "skip" and cfg.engine.backend != "native":
        err(f"train.stability_action='skip' with engine.backend={cfg.engine.backend}: dropping an update "
            "mid-accumulation is implemented for the native engine; use 'rollback' or 'log' with DeepSpeed")
    if t.stability_action == "rollback" and not cfg.checkpoint.interval:
        err("train.stability_action='rollback' needs checkpoints to roll back to: set checkpoint.interval > 0")
    if t.global_batch_size > 0:
        try:
            parse_skip_samples(t.skip_samples, t.global_batch_size)
        except ValueError as e:
            err(str(e))


def _check_rampup(cfg: Config, world_size: int | None, err) -> None:
    """train.rampup_batch_size: well formed, every size whole micro-steps; the engines and schedules it runs on."""
    t = cfg.train
    try:
        rampup = parse_rampup(t.rampup_batch_size, t.global_batch_size)
    except ValueError as e:
        return err(str(e))
    if rampup is None:
        return None
    if cfg.engine.backend != "native" or cfg.parallel.pp > 1:
        err(f"train.rampup_batch_size={t.rampup_batch_size} runs on the native engine without pipeline "
            f"parallelism so far (engine.backend={cfg.engine.backend}, parallel.pp={cfg.parallel.pp}): DeepSpeed "
            "fixes its accumulation steps at start-up; drop the ramp or use engine.backend=native and pp=1")
    step = t.micro_batch_size * (data_parallel_size(cfg, world_size) or 1)
    bad = [size for size in ramp_sizes(rampup, t.global_batch_size) if step > 0 and size % step]
    if bad:
        err(f"train.rampup_batch_size={t.rampup_batch_size} makes global batches {bad} that are not multiples of "
            f"train.micro_batch_size * dp = {step}; choose START and INCR as multiples of {step}")
    return None


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Raise ConfigError listing every broken rule (one per line, each naming key, value and rule).

    `world_size` (when known) also checks that tp*pp divides it and that dp and
    the batch sizes fit. Returns cfg unchanged, so `validate(load_config(...))` chains.
    Pure: no file is read (megalite.preflight adds the checks of the data, the tokenizer
    and the engine), and the hardware is not looked at, so fp16 is refused only for
    device='cpu' (device='auto' is resolved later, where the hardware is known).
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
        _check_lr_schedule(cfg, err)
        _check_stability(cfg, err)
        _check_rampup(cfg, world_size, err)
        _check_data(cfg, err)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def data_parallel_size(cfg: Config, world_size: int | None) -> int | None:
    """dp of a valid config: parallel.dp, else world_size / (tp * cp * pp); None when neither is known."""
    p = cfg.parallel
    return p.dp or (world_size // (p.tp * p.cp * p.pp) if world_size else None)
