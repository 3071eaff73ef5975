"""The run configuration's sections: one typed dataclass each, a docstring per field.

Each component receives only its own section. Sizes that follow from a
section (head dim, padded vocabulary, MLP width) are computed here too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import permutations
from typing import Literal

# Every choice is typed once, here; megalite.config.choices() and the rest of the package derive
# their lists of allowed values from these.
Norm = Literal["rmsnorm", "layernorm"]
Position = Literal["rope", "learned"]
RopeScaling = Literal["none", "linear", "llama3", "yarn", "dynamic"]
Activation = Literal["swiglu", "gelu"]
# Three dimensions (cp follows tp), then every order of the four.
GridOrder = Literal[("tp-dp-pp", "tp-pp-dp", "dp-tp-pp", "dp-pp-tp", "pp-tp-dp", "pp-dp-tp",
                     *("-".join(p) for p in permutations(("tp", "cp", "dp", "pp"))))]
Schedule = Literal["1f1b", "interleaved", "afab"]
Partition = Literal["uniform", "balanced"]
TokenCheck = Literal["sample", "all", "off"]
StabilityAction = Literal["off", "log", "skip", "rollback"]
TokenizerType = Literal["SentencePieceTokenizer", "HuggingFaceTokenizer"]
Decay = Literal["cosine", "linear", "constant", "wsd", "inverse-square-root"]
WSDDecay = Literal["exponential", "linear", "cosine", "minus_sqrt"]
Optimizer = Literal["adamw", "lion", "muon"]
Recompute = Literal["none", "selective", "full"]
MoERouter = Literal["softmax", "sigmoid"]
Precision = Literal["fp32", "bf16", "fp16"]
Device = Literal["auto", "cuda", "cpu"]
Backend = Literal["native", "deepspeed"]
ZeroStage = Literal[0, 1, 2, 3]


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the value and the rule (one per line)."""


class ConfigWarning(UserWarning):
    """A value the user did not write was adjusted to the run they did write (see loading.follow_the_run)."""


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
    """Attention query heads; hidden_size must divide evenly by it unless head_dim is set."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means num_heads (plain multi-head)."""
    head_dim: int | None = None
    """Per-head width of q, k and v; None means hidden_size / num_heads. Qwen3 and Gemma set it
    otherwise: the attention output is then num_heads * head_dim wide, projected back to hidden_size."""
    qk_norm: bool = False
    """RMSNorm over each head's query and key (gains [head_dim], shared by the heads), after the
    projection and before rotary, as Qwen3 does."""
    attention_window: int | None = None
    """Sliding-window attention: a query sees itself and the attention_window - 1 keys before it
    (Mistral's sliding_window, flash-attn's window_size=(window - 1, 0)); None sees the whole causal
    context. Which layers use it: global_attention_every."""
    global_attention_every: int = 0
    """With attention_window: every N-th layer (layers N, 2N, ... counted from 1) attends globally and
    the others use the window (Gemma 2: 2, Gemma 3: 6; Megatron's window_attn_skip_freq); 0 puts the
    window on every layer (Mistral)."""
    ffn_hidden_size: int | None = None
    """MLP inner width; None picks 4h for GELU and the Llama rule (8h/3 rounded up to 256) for SwiGLU."""
    moe_num_experts: int = 0
    """Mixture-of-Experts: routed experts per MoE layer (also `model.moe.num_experts`); 0 is dense. Which
    layers are MoE: moe_every and moe_first_dense."""
    moe_top_k: int = 2
    """Experts each token is routed to (Megatron's --moe-router-topk)."""
    moe_router: MoERouter = "softmax"
    """'softmax': probabilities over all experts, the top k kept (Mixtral, Qwen-MoE); 'sigmoid': a
    sigmoid score per expert, the top k normalised to sum to 1 (DeepSeek-V3)."""
    moe_norm_topk_prob: bool = True
    """softmax router: renormalise the k kept probabilities to sum to 1 (Mixtral always does; Qwen3-MoE's
    norm_topk_prob)."""
    moe_ffn_hidden_size: int | None = None
    """Inner width of each expert; None: ffn_hidden_size (resolved)."""
    moe_shared_experts: int = 0
    """Experts every token passes through besides its routed ones (DeepSeek's n_shared_experts): one
    MLP of moe_shared_experts * moe_ffn_hidden_size width, added to the routed output."""
    moe_every: int = 1
    """Every N-th layer (N, 2N, ... counted from 1) is MoE, the others dense; 1: every layer."""
    moe_first_dense: int = 0
    """The first this many layers stay dense whatever moe_every says (DeepSeek's first_k_dense_replace)."""
    moe_aux_loss_coeff: float = 0.01
    """Coefficient of the load-balancing loss E * sum_i f_i * P_i (Switch Transformer), per MoE layer;
    f_i the fraction of routed slots expert i got, P_i its mean router probability over the tokens."""
    moe_z_loss_coeff: float = 0.0
    """Coefficient of the router z-loss mean(logsumexp(logits)^2) (ST-MoE), per MoE layer; 0: off."""
    moe_capacity_factor: float | None = None
    """None: dropless (every routed token is computed). A factor c caps each expert at
    ceil(c * tokens * top_k / num_experts) tokens per micro-batch; the rest of its slots are dropped
    (in routing order) and counted in the moe_dropped_tokens metric."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (rotary table or learned position rows)."""
    norm: Norm = "rmsnorm"
    """Normalization: 'rmsnorm' or 'layernorm'."""
    norm_eps: float = 1e-5
    """Epsilon inside the norm's square root."""
    position: Position = "rope"
    """Positions: 'rope' (rotary) or 'learned' (absolute embedding, GPT-2 style)."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    rope_scaling: RopeScaling = "none"
    """Rotary frequency scaling for contexts longer than pretraining's, as Hugging Face's rope_type:
    'none' (theta^(-2i/d)), 'linear' (every frequency / rope_scaling_factor), 'llama3'
    (Llama 3.1+: frequencies with wavelength above rope_original_max_seq_len / rope_low_freq_factor
    divided by the factor, below rope_original_max_seq_len / rope_high_freq_factor kept, and
    interpolated smoothly between), 'yarn' (YaRN: frequencies turning over rope_beta_fast times in
    rope_original_max_seq_len kept, under rope_beta_slow times divided by the factor, a ramp between;
    cos and sin times rope_attention_factor) or 'dynamic' (dynamic NTK: a forward over more than
    rope_original_max_seq_len positions rescales rope_theta for its length)."""
    rope_scaling_factor: float = 1.0
    """The scaling factor ('linear', 'llama3', 'yarn', 'dynamic'; Llama 3.1 uses 8)."""
    rope_low_freq_factor: float = 1.0
    """'llama3': wavelengths above rope_original_max_seq_len / this are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """'llama3': wavelengths below rope_original_max_seq_len / this are left alone."""
    rope_original_max_seq_len: int | None = None
    """'llama3', 'yarn', 'dynamic': pretraining's context length before scaling (Llama 3.1: 8192); None: max_seq_len."""
    rope_beta_fast: float = 32.0
    """'yarn': dimensions turning more than this many times over rope_original_max_seq_len keep their frequency."""
    rope_beta_slow: float = 1.0
    """'yarn': dimensions turning fewer than this many times over rope_original_max_seq_len are fully scaled."""
    rope_attention_factor: float | None = None
    """'yarn': multiplier of cos and sin; None derives it from the factor (and rope_mscale / rope_mscale_all_dim)."""
    rope_mscale: float | None = None
    """'yarn': mscale of the attention factor's numerator (DeepSeek); used only with rope_mscale_all_dim."""
    rope_mscale_all_dim: float | None = None
    """'yarn': mscale of the attention factor's denominator (DeepSeek); used only with rope_mscale."""
    rope_truncate: bool = True
    """'yarn': round the ramp's ends to whole dimensions (floor, ceil), as transformers' truncate."""
    activation: Activation = "swiglu"
    """MLP: 'swiglu' (gated, Llama) or 'gelu' (GPT-2)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    bias: bool = False
    """Biases in linear layers (GPT-2 style) or none (Llama style)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections only (Qwen2); `bias` puts them everywhere."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches."""
    init_std: float = 0.02
    """Std of normal init; output projections are scaled by 1/sqrt(2*num_layers)."""


@dataclass
class ParallelConfig:
    """How the world is split: tensor x context x pipeline x data."""

    tp: int = 1
    """Tensor-parallel degree (ranks that split each layer)."""
    pp: int = 1
    """Pipeline-parallel degree (stages)."""
    cp: int = 1
    """Context-parallel degree: ranks that split each sequence (ring attention, megalite.kernels.
    ring_attention). Each holds two load-balanced chunks (i and 2cp-1-i of 2cp), so data.seq_len must
    divide by 2 * cp (by 2 * cp * tp with sequence parallelism). cp ranks read the same samples and
    hold the same parameters: gradients are averaged over dp x cp."""
    dp: int | None = None
    """Data-parallel degree; None means world_size / (tp * cp * pp)."""
    ep: int = 1
    """Expert-parallel degree: MoE layers' experts are sharded over ep ranks carved from the dp x cp
    ranks (consecutive ones), tokens sent to their experts' ranks and back by all-to-all; must divide
    dp * cp and model.moe_num_experts. Expert gradients are averaged over the ranks holding the same
    experts (dp * cp / ep of them), the rest over dp x cp as before."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B when > 1)."""
    sequence_parallel: bool = False
    """Split activations outside attention/MLP along the sequence over the tp group."""
    order: GridOrder = "tp-dp-pp"
    """Rank order of the grid, fastest-varying first (Megatron's default keeps tp ranks adjacent)."""
    schedule: Schedule = "1f1b"
    """Pipeline schedule: '1f1b', 'interleaved' or 'afab' (all-forward-all-backward)."""
    partition: Partition = "uniform"
    """How blocks are cut into pipeline stages (model chunks): 'uniform' gives every chunk
    num_layers / (pp * virtual_stages) transformer blocks (num_layers must divide evenly);
    'balanced' cuts so chunks hold about equal parameter counts (megalite.pipeline.partition),
    so any num_layers >= pp * virtual_stages works."""
    timeout_s: float = 600.0
    """Collective timeout; a dead rank ends the job after at most this long."""


@dataclass
class DataConfig:
    """Where tokens come from and how samples are cut."""

    path: list[str] = field(default_factory=list)
    """Dataset prefixes, optionally weighted: ['0.3', 'A_text_document', '0.7', 'B_text_document'].
    Megatron's single string '0.3 A_text_document 0.7 B_text_document' (weights and prefixes
    separated by spaces) is read as the same list. Each prefix needs PREFIX.idx and PREFIX.bin.
    Empty: the tiny preset builds (and caches) the demo corpus."""
    split: str = "969,30,1"
    """Train/valid/test proportions over documents; valid needs a share when train.eval_interval > 0."""
    seq_len: int = 256
    """Tokens per sample fed to the model (each sample reads seq_len + 1)."""
    seq_len_schedule: list[str] = field(default_factory=list)
    """Sequence-length warm-up: ['1:512', '1000:2048', '3000:8192'] trains on sequences of 512 tokens
    from step 1, 2048 from step 1000, 8192 from 3000 (config.seq_schedule). Each length divides
    seq_len; samples are cut into whole sequences, so tokens per step and the sample order stay."""
    tokenizer_type: TokenizerType = "SentencePieceTokenizer"
    """'SentencePieceTokenizer' or 'HuggingFaceTokenizer'."""
    tokenizer_model: str | None = None
    """SentencePiece .model file or Hugging Face tokenizer.json (or its directory); when set,
    model.vocab_size must be at least its vocabulary size."""
    seed: int = 1234
    """Shuffling seed for the sample order."""
    cache_dir: str | None = None
    """Where built index arrays are cached; None: next to the data."""
    reset_attention_mask: bool = False
    """Mask attention across document boundaries inside packed samples."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    token_check: TokenCheck = "sample"
    """Pre-flight check that every token id in the data is below model.vocab_size (else the
    embedding fails mid-run): 'sample' reads about a million tokens spread over each file
    (seconds, whatever the size), 'all' reads every token, 'off' reads none."""


@dataclass
class OptimConfig:
    """The optimizer (AdamW or Lion) and the learning-rate schedule."""

    optimizer: Optimizer = "adamw"
    """'adamw', or 'lion' (megalite.lion: sign updates, one state per parameter; its paper's lr is 3-10x
    smaller than AdamW's, weight decay 3-10x larger, betas 0.9/0.99; native engine), or 'muon' (megalite.muon:
    orthogonalized momentum for the blocks' matrices at AdamW's lr scale, AdamW for the rest; native engine)."""
    muon_momentum: float = 0.95
    """Muon's momentum (Nesterov), for its matrices only."""
    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-5
    """Floor the decay ends at."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms, biases or (1-D) gains."""
    beta1: float = 0.9
    """Adam first-moment decay (Lion: the interpolation that makes the update's sign)."""
    beta2: float = 0.95
    """Adam second-moment decay (Lion: the momentum's decay; its paper uses 0.99)."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr."""
    decay: Decay = "cosine"
    """Decay after warmup (Megatron's --lr-decay-style): 'cosine', 'linear' or 'constant'; 'wsd'
    (warmup-stable-decay: lr until the decay phase, see wsd_*, then down to min_lr); or
    'inverse-square-root' (lr * sqrt(warmup_steps / step), floored at min_lr; decay_steps does not apply)."""
    decay_steps: int | None = None
    """Steps after warmup over which to decay to min_lr ('wsd': whose end its decay phase ends at);
    None means train.steps - warmup_steps."""
    wsd_decay_steps: int | None = None
    """'wsd': steps of the decay phase (Megatron's --lr-wsd-decay-iters); None means wsd_decay_fraction of
    the steps after warmup, or with wsd_decay_start_step every step from there to the end."""
    wsd_decay_fraction: float = 0.2
    """'wsd' with no wsd_decay_steps: the share of the steps after warmup that decay (rounded), in (0, 1]."""
    wsd_decay_style: WSDDecay = "exponential"
    """'wsd': the decay phase's shape, r its fraction done (Megatron's --lr-wsd-decay-style): 'exponential'
    (2 * 0.5^r - 1), 'linear' (1 - r), 'cosine' ((1 + cos(pi r)) / 2) or 'minus_sqrt' (1 - sqrt(r))."""
    wsd_decay_start_step: int | None = None
    """'wsd': the last step at peak lr, the decay phase following it; None means the decay phase ends the
    run (decay_steps). A cooldown: resume a stable-phase checkpoint of step N (any decay; 'constant'
    too) with optim.decay=wsd optim.wsd_decay_start_step=N optim.wsd_decay_steps=D train.steps=N+D."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    z_loss: float = 0.0
    """z-loss coefficient c: the objective adds c * log(Z)^2 per token, Z the output softmax's normaliser
    (PaLM: 1e-4), computed vocabulary-parallel; the logged loss stays the cross-entropy; 0 disables."""


@dataclass
class TrainConfig:
    """The loop: batch sizes, precision, length, evaluation, resume."""

    steps: int = 100
    """Optimizer steps to run."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all dp ranks (micro x accumulation x dp)."""
    precision: Precision = "fp32"
    """'fp32', 'bf16' or 'fp16' (fp16 uses dynamic loss scaling)."""
    seed: int = 1234
    """Seed for weights, dropout and everything random except the data order."""
    activation_checkpointing: Recompute = "none"
    """What transformer blocks recompute in backward instead of storing (Megatron's
    --recompute-granularity): 'none'; 'selective' (the attention core and SwiGLU's activation:
    cheap to redo, large to keep; the matmul inputs stay); 'full' (keep only each block's input)."""
    recompute_num_layers: int = 0
    """With 'full': recompute only the first this many transformer blocks of each pipeline chunk
    (Megatron's --recompute-method block --recompute-num-layers); 0 recomputes all of them."""
    compile: bool = False
    """Compile every transformer block with torch.compile (Inductor), in place, so parameter names and
    checkpoints are unchanged (torchtitan's --compile; Megatron has no such flag). Needs
    model.dropout=0 and no sequence parallelism; composes with every activation_checkpointing mode.
    The first step is slower (compilation: tens of seconds for a small model on CPU, which needs a
    C++ compiler; Triton on CUDA)."""
    eval_interval: int = 50
    """Evaluate every this many steps (and at the end); 0 disables."""
    eval_steps: int = 5
    """Validation batches per evaluation."""
    resume: str = "auto"
    """'auto' (continue from run_dir's latest checkpoint if any), 'none', or a checkpoint path."""
    run_dir: str | None = None
    """Run directory; None creates runs/<timestamp> under the current directory."""
    device: Device = "auto"
    """'auto' (cuda when present), 'cuda' or 'cpu'."""
    initial_loss_scale: float = 65536.0
    """fp16 only: starting dynamic loss scale."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the scale doubles."""
    min_loss_scale: float = 1.0
    """fp16 only: the scale never drops below this."""
    stability_action: StabilityAction = "off"
    """Loss / grad-norm spikes (also `train.stability.action`; megalite.stability): 'off' (a non-finite loss
    ends the run); 'log'; 'skip' (a loss spike's update is dropped; native engine); 'rollback' (reload the
    latest checkpoint, skip the samples read since it, continue)."""
    stability_window: int = 50
    """Steps whose values form the rolling median and MAD a new value is tested against."""
    stability_threshold: float = 6.0
    """A value above median + threshold * 1.4826 * MAD (a robust z-score) is a spike."""
    stability_min_history: int = 10
    """Values the window must hold before anything is called a spike."""
    stability_max_rollbacks: int = 3
    """'rollback': rollbacks allowed per run (process); one more spike ends the run with what was skipped."""
    stability_rollback_lr_scale: float = 1.0
    """'rollback': the learning rate is multiplied by this for the stability_rollback_lr_steps steps after a
    rollback (e.g. 0.5 to step more carefully past the spike); 1 keeps the schedule."""
    stability_rollback_lr_steps: int = 0
    """'rollback': how many steps after a rollback run at stability_rollback_lr_scale times the rate."""
    rampup_batch_size: list[int] = field(default_factory=list)
    """Megatron's --rampup-batch-size: [START, INCR, SAMPLES] grows the global batch from START by INCR over
    the first SAMPLES samples to global_batch_size (config.batch_rampup); [] keeps it constant. Every size
    must divide by micro_batch_size * dp. The LR schedule counts optimizer steps, not samples (Megatron's
    counts samples under a ramp)."""
    skip_samples: list[str] = field(default_factory=list)
    """Sample ranges of the training order never trained on, 'START:END' (multiples of global_batch_size),
    e.g. ['4096:8192']; a rollback adds its own (kept in checkpoints and run_dir/skipped_samples.json)."""


@dataclass
class EngineConfig:
    """Who owns the optimizer step and data-parallel gradients."""

    backend: Backend = "native"
    """'native' (plain PyTorch) or 'deepspeed' (ZeRO)."""
    zero_stage: ZeroStage = 0
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


def head_dim(model: ModelConfig) -> int:
    """Per-head width: model.head_dim, or hidden_size / num_heads when unset."""
    return model.head_dim or model.hidden_size // model.num_heads


def attention_window(model: ModelConfig, layer: int) -> int | None:
    """The sliding window of transformer layer `layer` (1 .. num_layers), or None where it attends over
    the whole causal context (model.attention_window, model.global_attention_every)."""
    every = model.global_attention_every
    return None if model.attention_window is None or (every and layer % every == 0) else model.attention_window


def is_moe_layer(model: ModelConfig, layer: int) -> bool:
    """Whether transformer layer `layer` (1 .. num_layers) has the MoE feed-forward (model.moe_*)."""
    every = max(model.moe_every, 1)
    return model.moe_num_experts > 0 and layer > model.moe_first_dense and layer % every == 0


def moe_ffn_hidden_size(model: ModelConfig) -> int:
    """Inner width of one expert: model.moe_ffn_hidden_size, else the dense MLP's."""
    return model.moe_ffn_hidden_size or resolved_ffn_hidden_size(model)


def kv_heads(model: ModelConfig) -> int:
    """Key/value heads actually used (num_kv_heads, or num_heads when unset)."""
    return model.num_kv_heads or model.num_heads


def resolved_ffn_hidden_size(model: ModelConfig) -> int:
    """MLP inner width: ffn_hidden_size if set; else 4h for GELU, int(8h/3) rounded up to 256 for SwiGLU.

    The one rule for the width: the model, validation, pipeline partitioning and
    checkpoint conversion all call this. The SwiGLU rule keeps the parameter
    count of a 4h GELU MLP (three matrices instead of two); rounding to Llama's
    multiple_of=256 gives its h=4096 -> 11008.
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
