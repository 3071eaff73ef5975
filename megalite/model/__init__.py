"""The decoder model: `Transformer`, an ordered list of blocks built from tensor-parallel layers; one
class for the whole model and for each pipeline stage."""
from megalite.model.blocks import MLP, Attention, BlockSettings, Embedding, Head, KVCache, TransformerBlock, build_block
from megalite.model.norms import LayerNorm, RMSNorm
from megalite.model.transformer import (
    Transformer,
    active_matmul_parameters,
    block_parameter_counts,
    check_model,
    matmul_parameters,
    total_parameters,
)

__all__ = ["Attention", "BlockSettings", "Embedding", "Head", "KVCache", "LayerNorm", "MLP", "RMSNorm", "Transformer",
           "TransformerBlock", "active_matmul_parameters", "block_parameter_counts", "build_block", "check_model",
           "matmul_parameters", "total_parameters"]
