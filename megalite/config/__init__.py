"""Typed, nested run configuration: sections, loading (YAML + dotted overrides), pure validation.

    cfg = validate(load_config("tiny", ["train.steps=100", "optim.lr=3e-4"]), world_size=8)

A leaf of the package graph: nothing here imports the rest of megalite. Checks that need the
data or the engine run from megalite.preflight, which every command calls before any process
group exists.
"""
from megalite.config.blend import is_number, parse_data_path, split_blend_string
from megalite.config.fields import all_choices, choices, did_you_mean
from megalite.config.loading import follow_the_run, list_presets, load_config, save_config, to_yaml
from megalite.config.sections import (
    CheckpointConfig,
    Config,
    ConfigError,
    ConfigWarning,
    DataConfig,
    EngineConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    attention_window,
    head_dim,
    is_moe_layer,
    kv_heads,
    moe_ffn_hidden_size,
    padded_vocab_size,
    resolved_ffn_hidden_size,
)
from megalite.config.seq_schedule import parse_seq_len_schedule, seq_len_at
from megalite.config.validation import data_parallel_size, samples_per_split, split_weights, splits_in_use, validate

__all__ = ["CheckpointConfig", "Config", "ConfigError", "ConfigWarning", "DataConfig", "EngineConfig",
           "LoggingConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "TrainConfig", "all_choices",
           "attention_window", "choices", "data_parallel_size", "did_you_mean", "follow_the_run", "head_dim",
           "is_moe_layer", "is_number", "kv_heads", "list_presets", "load_config", "moe_ffn_hidden_size",
           "padded_vocab_size", "parse_data_path",
           "parse_seq_len_schedule", "resolved_ffn_hidden_size", "samples_per_split", "save_config", "seq_len_at",
           "split_blend_string", "split_weights", "splits_in_use", "to_yaml", "validate"]
