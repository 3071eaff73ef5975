"""The decoder model: `Transformer`, an ordered list of blocks built from tensor-parallel layers."""
from megalite.model.blocks import MLP, Attention, Embedding, Head, LayerNorm, RMSNorm, TransformerBlock
from megalite.model.transformer import Transformer

__all__ = ["Transformer", "Embedding", "TransformerBlock", "Head", "Attention", "MLP", "RMSNorm", "LayerNorm"]
