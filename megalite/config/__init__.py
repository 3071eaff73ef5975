"""Typed, nested run configuration: sections, loading (YAML + dotted overrides), validation.

    cfg = validate(load_config("tiny", ["train.steps=100", "optim.lr=3e-4"]), world_size=8)
"""
from megalite.config.loading import list_presets, load_config, save_config, to_yaml
from megalite.config.sections import (CheckpointConfig, Config, ConfigError, DataConfig, EngineConfig,
                                      LoggingConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig,
                                      head_dim, kv_heads, padded_vocab_size, resolved_ffn_hidden_size)
from megalite.config.validation import CHOICES, validate

__all__ = ["CHOICES", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EngineConfig", "LoggingConfig",
           "ModelConfig", "OptimConfig", "ParallelConfig", "TrainConfig", "head_dim", "kv_heads", "list_presets",
           "load_config", "padded_vocab_size", "resolved_ffn_hidden_size", "save_config", "to_yaml", "validate"]
