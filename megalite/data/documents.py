"""Documents inside packed samples: which document each position belongs to.

A packed sample holds several documents, each ended by an EOD token. With
data.reset_attention_mask the loader adds the document ids of each micro-batch's
inputs to the batch, and the model turns them into an attention mask
(kernels.attention.DocumentMask) so a token sees only its own document.
"""
from __future__ import annotations

import torch


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Document index of every position of packed samples tokens [b, s] -> int32 [b, s].

    0 up to and including the first `eod`, 1 from the token after it, and so
    on: a new document starts right after each EOD token.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq]; got shape {tuple(tokens.shape)}")
    is_eod = (tokens == eod).to(torch.int32)
    return is_eod.cumsum(1, dtype=torch.int32) - is_eod  # count of EODs strictly before each position


