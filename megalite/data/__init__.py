"""Data: indexed token files, tokenizers, preprocessing, datasets, blending, sampling."""
