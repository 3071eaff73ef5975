"""megalite: 3D-parallel (tensor x pipeline x data) LLM pretraining."""

__version__ = "0.1.0"
