"""Config: presets, YAML files, dotted overrides, validation rules, round trip."""
import dataclasses
import typing

import pytest

from megalite.config import (
    Config,
    ConfigError,
    ConfigWarning,
    ModelConfig,
    ParallelConfig,
    head_dim,
    list_presets,
    load_config,
    padded_vocab_size,
    resolved_ffn_hidden_size,
    save_config,
    to_yaml,
    validate,
)

PRESET_WORLDS = {"tiny": 1, "gpt2-124m": 1, "llama-1b": 1, "llama-7b": 8, "llama-70b": 32}


def test_presets_are_listed():
    assert set(PRESET_WORLDS) <= set(list_presets())


@pytest.mark.parametrize("name", sorted(PRESET_WORLDS))
def test_every_preset_loads_and_validates(name):
    cfg = validate(load_config(name), world_size=PRESET_WORLDS[name])
    assert isinstance(cfg, Config) and load_config(name) == cfg


def test_preset_shapes():
    tiny = load_config("tiny")
    shape = (tiny.model.vocab_size, tiny.model.hidden_size, tiny.model.num_layers, tiny.data.seq_len)
    assert shape == (4096, 256, 4, 128)
    assert tiny.train.precision == "fp32" and tiny.train.global_batch_size == 16
    gpt2 = load_config("gpt2-124m").model
    assert (gpt2.position, gpt2.norm, gpt2.activation, gpt2.bias, gpt2.tie_embeddings) == (
        "learned", "layernorm", "gelu", True, True)
    assert padded_vocab_size(gpt2) == 50304 and resolved_ffn_hidden_size(gpt2) == 3072
    l1 = load_config("llama-1b")
    assert (l1.model.num_kv_heads, l1.model.rope_theta, l1.model.tie_embeddings, l1.train.precision) == (
        8, 500000.0, True, "bf16")
    l7 = load_config("llama-7b")
    assert resolved_ffn_hidden_size(dataclasses.replace(l7.model, ffn_hidden_size=None)) == 11008  # Llama rule
    assert head_dim(l7.model) == 128 and l7.parallel.tp == 1
    l70 = load_config("llama-70b")
    assert (l70.parallel.tp, l70.parallel.pp, l70.model.num_layers, l70.model.ffn_hidden_size) == (8, 4, 80, 28672)


def test_yaml_path_partial_sections_keep_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_size: 128\n  num_heads: 2\ntrain:\n  steps: 7\noptim:\n  lr: 1e-3\n")
    cfg = load_config(str(path))
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.train.steps, cfg.optim.lr) == (128, 2, 7, 1e-3)
    assert cfg.model.num_layers == ModelConfig().num_layers and cfg.parallel == ParallelConfig()
    assert isinstance(cfg.optim.lr, float)  # PyYAML reads '1e-3' as a string; it is coerced


def test_overrides_of_every_type():
    cfg = load_config("tiny", ["train.steps=12", "optim.lr=3e-4", "model.bias=true", "model.num_kv_heads=null",
                               "data.split=98,2,0", "train.run_dir=runs/x", "data.tokenizer_model=null",
                               "model.norm_eps=1", "train.steps=1e2", "data.seed=007"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.model.bias, cfg.model.num_kv_heads) == (100, 3e-4, True, None)
    assert (cfg.data.split, cfg.train.run_dir, cfg.data.tokenizer_model) == ("98,2,0", "runs/x", None)
    assert cfg.model.norm_eps == 1.0 and isinstance(cfg.model.norm_eps, float) and cfg.data.seed == 7


@pytest.mark.parametrize("text, value", [
    ("data.path=[a,b]", ["a", "b"]),
    ("data.path=[ a , 'b c' ]", ["a", "b c"]),
    ("data.path=0.3,A,0.7,B", ["0.3", "A", "0.7", "B"]),
    ("data.path=/data/one_text_document", ["/data/one_text_document"]),
    ("data.path=[]", []),
    ("data.path=0.3 A 0.7 B", ["0.3", "A", "0.7", "B"]),  # Megatron's single-string blend
    ("data.path=[0.3 /d/A, 0.7 /d/B]", ["0.3", "/d/A", "0.7", "/d/B"]),
])
def test_list_overrides(text, value):
    assert load_config("tiny", [text]).data.path == value


def test_str_override_is_literal():
    cfg = load_config("tiny", ["train.resume=yes", "data.split=1:30", "train.run_dir='with space'"])
    assert (cfg.train.resume, cfg.data.split, cfg.train.run_dir) == ("yes", "1:30", "with space")


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=3", "unknown key model.hiden_size (did you mean 'hidden_size'?)"),
    ("modle.hidden_size=3", "unknown section 'modle' (did you mean 'model'?)"),
    ("train.steps=abc", "train.steps='abc' must be an int"),
    ("train.steps=1.5", "train.steps=1.5 must be an int"),
    ("model.bias=maybe", "model.bias='maybe' must be a bool"),
    ("optim.lr=fast", "optim.lr='fast' must be a float"),
    ("model.num_kv_heads=[1]", "model.num_kv_heads=[1] must be an int or null"),
    ("train.steps=null", "train.steps=None must be an int"),
    ("train.steps", "must look like section.key=value"),
    ("steps=3", "must look like section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert message in str(info.value)


def test_all_load_errors_are_reported_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden: 3\ntrian:\n  steps: 3\ntrain: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["optim.lrr=1"])
    lines = str(info.value).splitlines()
    assert len(lines) == 4
    assert "hidden" in lines[0] and "'trian' (did you mean 'train'?)" in lines[1]
    assert "section 'train' must be a mapping" in lines[2] and "did you mean 'lr'" in lines[3]


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'tinny' \\(did you mean 'tiny'\\?\\)"):
        load_config("tinny")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"))


def test_save_load_round_trip(tmp_path):
    cfg = load_config("llama-70b", ["data.path=0.3,A,0.7,B", "train.run_dir=runs/r", "optim.lr=1e-5",
                                    "data.split=1:30", "train.resume=none"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(str(path)) == cfg
    assert path.read_text() == to_yaml(cfg)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_derived_sizes():
    m = ModelConfig(hidden_size=4096, num_heads=32, activation="swiglu")
    assert resolved_ffn_hidden_size(m) == 11008 and head_dim(m) == 128
    assert resolved_ffn_hidden_size(dataclasses.replace(m, activation="gelu")) == 16384
    assert resolved_ffn_hidden_size(dataclasses.replace(m, ffn_hidden_size=1000)) == 1000
    assert resolved_ffn_hidden_size(ModelConfig(hidden_size=256)) == 768  # int(682.7) -> 768
    v = ModelConfig(vocab_size=50257, pad_vocab_to=128)
    assert padded_vocab_size(v) == 50304 and padded_vocab_size(v, tp=8) == 51200
    assert padded_vocab_size(ModelConfig(vocab_size=4096)) == 4096


# Each case: overrides on the tiny preset (and a world size) that break exactly one rule,
# and text the message must contain: the key, the offending value and the rule. A value outside
# a field's choices is refused as it is loaded, the other rules by validate.
RULES = [
    (["data.reset_attention_mask=true", "data.path=[corpus_text_document]"], None,
     "data.reset_attention_mask=true needs the end-of-document id"),
    (["model.hidden_size=250"], None, "model.hidden_size=250 must be divisible by model.num_heads=4"),
    (["model.num_kv_heads=3"], None, "model.num_heads=4 must be divisible by model.num_kv_heads=3"),
    (["parallel.tp=4", "model.num_kv_heads=2"], None, "model.num_kv_heads=2 must be divisible by parallel.tp=4"),
    (["parallel.tp=8", "model.num_kv_heads=8", "model.num_heads=4", "model.hidden_size=256"], None,
     "model.num_heads=4 must be divisible by parallel.tp=8"),
    (["parallel.tp=2", "model.ffn_hidden_size=701"], None,
     "model.ffn_hidden_size=701 must be divisible by parallel.tp=2"),
    (["model.norm=batchnorm"], None, "model.norm='batchnorm' must be one of rmsnorm, layernorm"),
    (["model.position=alibi"], None, "model.position='alibi' must be one of rope, learned"),
    (["model.activation=relu"], None, "model.activation='relu' must be one of swiglu, gelu"),
    (["train.precision=fp8"], None, "train.precision='fp8' must be one of fp32, bf16, fp16"),
    (["optim.decay=exp"], None, "optim.decay='exp' must be one of cosine, linear, constant"),
    (["parallel.schedule=gpipe"], None, "parallel.schedule='gpipe' must be one of 1f1b, interleaved, afab"),
    (["engine.backend=fsdp"], None, "engine.backend='fsdp' must be one of native, deepspeed"),
    (["train.device=tpu"], None, "train.device='tpu' must be one of auto, cuda, cpu"),
    (["data.tokenizer_type=BPE"], None, "data.tokenizer_type='BPE' must be one of"),
    (["parallel.order=tp-pp-tp"], None, "parallel.order='tp-pp-tp' must be one of tp-dp-pp, tp-pp-dp,"),
    (["model.vocab_size=0"], None, "model.vocab_size=0 must be > 0"),
    (["model.num_layers=-1"], None, "model.num_layers=-1 must be > 0"),
    (["train.micro_batch_size=0"], None, "train.micro_batch_size=0 must be > 0"),
    (["checkpoint.interval=-5"], None, "checkpoint.interval=-5 must be >= 0"),
    (["model.dropout=1.0"], None, "model.dropout=1.0 must be in [0, 1)"),
    (["optim.beta2=1.0"], None, "optim.beta2=1.0 must be in [0, 1)"),
    (["data.seq_len=256"], None, "data.seq_len=256 must be <= model.max_seq_len=128"),
    (["parallel.tp=2", "parallel.pp=2"], 6,
     "world_size=6 must be divisible by parallel.tp * parallel.cp * parallel.pp = 2*1*2"),
    (["parallel.dp=4", "train.global_batch_size=16"], 2, "parallel.dp=4 must equal world_size / (tp*cp*pp) = 2"),
    (["parallel.cp=2", "data.seq_len=66", "model.max_seq_len=66"], 2,
     "data.seq_len=66 must be divisible by 4 with parallel.cp=2 (2 * parallel.cp = 4 load-balanced chunks)"),
    (["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=68", "model.max_seq_len=68"],
     4, "data.seq_len=68 must be divisible by 8 with parallel.cp=2 (2 * parallel.cp = 4 load-balanced chunks, each "
        "rank's share split over parallel.tp=2 by sequence parallelism)"),
    (["parallel.cp=2", "model.dropout=0.1"], 2, "model.dropout=0.1 with parallel.cp=2: ring attention has no"),
    (["parallel.cp=2", "train.compile=true"], 2, "train.compile=True with parallel.cp=2"),
    (["train.global_batch_size=20"], 2,
     "train.global_batch_size=20 must be divisible by train.micro_batch_size * dp = 8*2 = 16"),
    (["train.global_batch_size=12"], None, "train.global_batch_size=12 must be divisible by"),
    (["parallel.pp=3"], None, "model.num_layers=4 must be divisible by parallel.pp * parallel.virtual_stages = 3*1"),
    (["parallel.pp=2", "parallel.virtual_stages=4"], None, "parallel.pp * parallel.virtual_stages = 2*4 = 8"),
    (["parallel.virtual_stages=2", "model.num_layers=4"], None, "parallel.virtual_stages=2 requires parallel.pp > 1"),
    (["parallel.schedule=interleaved", "parallel.pp=2"], None,
     "parallel.schedule='interleaved' requires parallel.virtual_stages > 1"),
    (["parallel.sequence_parallel=true"], None, "parallel.sequence_parallel=True requires parallel.tp > 1"),
    (["engine.zero_stage=4", "engine.backend=deepspeed"], None, "engine.zero_stage=4 must be one of 0, 1, 2, 3"),
    (["engine.zero_stage=1"], None, "engine.zero_stage=1 requires engine.backend='deepspeed'"),
    (["parallel.pp=2", "parallel.virtual_stages=2", "train.global_batch_size=24", "train.micro_batch_size=8"], 2,
     "needs the micro-batches per step, global_batch_size / (micro_batch_size * dp) = 3, to be a multiple of"),
    (["parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_len=126", "model.num_kv_heads=4"], 4,
     "data.seq_len=126 must be divisible by parallel.tp=4"),
    (["optim.warmup_steps=301"], None, "optim.warmup_steps=301 must be <= train.steps=300; lower"),
    (["optim.lr=1e-5", "optim.min_lr=1e-4"], None, "optim.lr=1e-05 must be >= optim.min_lr=0.0001"),
    (["optim.lr=0", "optim.min_lr=-1"], None, "optim.min_lr=-1.0 must be >= 0"),
    (["train.precision=fp16", "train.device=cpu"], None,
     "train.precision='fp16' is not supported with train.device='cpu'"),
    (["data.split=1,2,3,4"], None, "data.split='1,2,3,4' must be up to three non-negative numbers"),
    (["data.path=0.5,A,B"], None, "data.path=['0.5', 'A', 'B'] must alternate positive weights and prefixes"),
    (["model.position=rope", "model.hidden_size=12", "model.num_heads=4", "model.num_kv_heads=null"], None,
     "head_dim 3 must be even for position='rope'"),
    (["train.min_loss_scale=1e9"], None, "train.min_loss_scale=1000000000.0 must be <= train.initial_loss_scale"),
    (["parallel.partition=greedy"], None, "parallel.partition='greedy' must be one of uniform, balanced"),
    (["parallel.pp=4", "parallel.virtual_stages=2", "parallel.partition=balanced", "train.global_batch_size=64"],
     None, "model.num_layers=4 must be >= parallel.pp * parallel.virtual_stages = 4*2 = 8 with parallel.partition"),
    (["data.split=100,0,0"], None, "data.split='100,0,0' gives the valid split a zero share, but "
                                   "train.eval_interval=100 evaluates on it"),
    (["data.split=0,1,0", "train.eval_interval=0"], None, "data.split='0,1,0' gives the train split a zero share"),
    (["model.head_dim=7"], None, "(or model.head_dim) = head_dim 7 must be even for position='rope'"),
    (["model.head_dim=0"], None, "model.head_dim=0 must be > 0"),
    (["model.rope_scaling=longrope"], None,
     "model.rope_scaling='longrope' must be one of none, linear, llama3, yarn, dynamic"),
    (["model.rope_scaling=linear", "model.rope_scaling_factor=0"], None, "model.rope_scaling_factor=0.0 must be > 0"),
    (["model.rope_scaling_factor=8"], None,
     "model.rope_scaling_factor=8.0 has no effect with model.rope_scaling='none'"),
    (["model.rope_scaling=llama3", "model.rope_low_freq_factor=4"], None,
     "model.rope_high_freq_factor=4.0 must be > model.rope_low_freq_factor=4.0 for model.rope_scaling='llama3'"),
    (["model.rope_scaling=linear", "model.position=learned"], None,
     "model.rope_scaling='linear' needs model.position='rope' (not 'learned')"),
    (["optim.decay=wsd", "optim.wsd_decay_style=sqrt"], None,
     "optim.wsd_decay_style='sqrt' must be one of exponential, linear, cosine, minus_sqrt"),
    (["optim.wsd_decay_steps=50"], None,
     "optim.wsd_decay_steps=50 applies only to optim.decay='wsd' (got 'cosine'); set optim.decay=wsd or drop"),
    (["optim.decay=linear", "optim.wsd_decay_start_step=100"], None,
     "optim.wsd_decay_start_step=100 applies only to optim.decay='wsd' (got 'linear')"),
    (["optim.decay=inverse-square-root", "optim.decay_steps=100"], None,
     "optim.decay_steps=100 does not apply to optim.decay='inverse-square-root'"),
    (["optim.decay=wsd", "optim.wsd_decay_fraction=0"], None, "optim.wsd_decay_fraction=0.0 must be in (0, 1]"),
    (["optim.decay=wsd", "optim.wsd_decay_steps=0"], None, "optim.wsd_decay_steps=0 must be >= 1, or null"),
    (["optim.decay=wsd", "optim.wsd_decay_steps=290"], None,
     "optim.wsd_decay_steps=290 is longer than the 280 steps after warmup"),
    (["optim.decay=wsd", "optim.wsd_decay_start_step=10"], None,
     "optim.wsd_decay_start_step=10 is inside the warmup (optim.warmup_steps=20)"),
    (["optim.decay=wsd", "optim.wsd_decay_start_step=300", "optim.wsd_decay_steps=50"], None,
     "optim.wsd_decay_start_step=300 is at or after the run's last step (train.steps=300), so no step decays; "
     "set train.steps=350"),
    (["optim.decay=wsd", "optim.wsd_decay_start_step=100", "optim.decay_steps=50"], None,
     "optim.wsd_decay_start_step=100 leaves no step to decay: the decay phase would end at step 70"),
]


@pytest.mark.parametrize("overrides, world, message", RULES, ids=[r[2][:40] for r in RULES])
def test_each_validation_rule_names_key_value_and_rule(overrides, world, message):
    with pytest.raises(ConfigError) as info:
        validate(load_config("tiny", overrides), world_size=world)
    assert message in str(info.value)


def test_choices_come_from_the_typed_fields_alone():
    from megalite.config import all_choices, choices
    from megalite.config.sections import Schedule
    from megalite.optim import DECAY_KINDS
    from megalite.pipeline.schedules import SCHEDULES

    assert choices("parallel.schedule") == typing.get_args(Schedule) == SCHEDULES
    assert choices("optim.decay") == DECAY_KINDS and choices("engine.zero_stage") == (0, 1, 2, 3)
    assert set(all_choices()) >= {"model.norm", "train.precision", "data.tokenizer_type", "parallel.order"}
    with pytest.raises(KeyError, match="train.steps is not a config field with a fixed set of choices"):
        choices("train.steps")


def test_a_presets_schedule_follows_a_shorter_run_with_a_warning():
    with pytest.warns(ConfigWarning, match="optim.warmup_steps=20 from preset tiny exceeds train.steps=10: "
                                           "using optim.warmup_steps=10"):
        cfg = validate(load_config("tiny", ["train.steps=10"]))
    assert cfg.optim.warmup_steps == 10
    with pytest.warns(ConfigWarning, match="optim.min_lr=0.0001 from preset tiny exceeds optim.lr=1e-05"):
        assert load_config("tiny", ["optim.lr=1e-5"]).optim.min_lr == 1e-5
    with pytest.raises(ConfigError, match="optim.warmup_steps=20 must be <= train.steps=10"):
        validate(load_config("tiny", ["train.steps=10", "optim.warmup_steps=20"]))  # both written: an error


def test_a_users_own_yaml_keeps_its_contradictions(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  steps: 10\noptim:\n  warmup_steps: 20\n")
    with pytest.raises(ConfigError, match="optim.warmup_steps=20 must be <= train.steps=10"):
        validate(load_config(str(path)))
    path.write_text("train:\n  steps: 5\n")  # warmup left at its default (10): follows the run
    with pytest.warns(ConfigWarning, match="optim.warmup_steps=10 from the defaults exceeds train.steps=5"):
        assert load_config(str(path)).optim.warmup_steps == 5


def test_bf16_on_cpu_is_allowed():
    validate(load_config("tiny", ["train.precision=bf16", "train.device=cpu"]), world_size=1)


def test_all_validation_errors_come_together_one_per_line():
    cfg = load_config("tiny", ["model.dropout=2", "train.micro_batch_size=0", "optim.warmup_steps=1000",
                               "engine.zero_stage=2"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    lines = str(info.value).splitlines()
    assert len(lines) == 4 and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError) as info:
        load_config("tiny", ["model.norm=x", "train.steps=abc", "model.hiden_size=3"])
    assert len(str(info.value).splitlines()) == 3


def test_wrong_types_set_from_code_are_caught():
    cfg = Config()
    cfg.parallel.tp = "2"
    cfg.train.steps = 3.0
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "parallel.tp='2' must be an int" in str(info.value) and "train.steps=3.0 must be an int" in str(info.value)
    with pytest.raises(ConfigError, match="world_size=0"):
        validate(Config(), world_size=0)


def test_dp_is_inferred_for_the_batch_rule():
    cfg = load_config("tiny", ["parallel.tp=2", "model.num_kv_heads=2", "train.global_batch_size=32"])
    validate(cfg, world_size=8)  # dp = 4, 32 % (8 * 4) == 0
    with pytest.raises(ConfigError, match="8\\*8 = 64"):
        validate(cfg, world_size=16)


def test_balanced_partition_only_needs_a_layer_per_chunk():
    validate(load_config("tiny", ["parallel.pp=3", "parallel.partition=balanced"]))
    with pytest.raises(ConfigError, match="or set parallel.partition='balanced'"):
        validate(load_config("tiny", ["parallel.pp=3"]))  # uniform (the default) needs 4 % 3 == 0
    assert ParallelConfig().partition == "uniform"


def test_split_without_valid_share_is_fine_when_nothing_is_evaluated():
    validate(load_config("tiny", ["data.split=100,0,0", "train.eval_interval=0"]))


def test_the_swiglu_width_rule_rounds_to_256():
    for h in (32, 64, 100, 256, 4096):
        assert resolved_ffn_hidden_size(ModelConfig(hidden_size=h)) % 256 == 0


