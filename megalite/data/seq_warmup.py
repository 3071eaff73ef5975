"""Cutting micro-batches into the shorter sequences of a sequence-length warm-up (data.seq_len_schedule).

A sample of L + 1 tokens (inputs 0..L-1, labels 1..L) becomes L / n sequences of n + 1 tokens that
overlap by one: sequence j holds tokens j*n .. (j+1)*n, so its inputs and labels are the sample's
own, and every token is predicted exactly once, as without warm-up. Document ids are cut alike
(attention masking compares them, so a document split between sequences stays masked from the
others). Rows stay in sample order: sample i's sequences are rows i*L/n .. (i+1)*L/n - 1.
"""
from __future__ import annotations


def cut_batch(batch: dict, length: int) -> dict:
    """A micro-batch {"tokens": [b, L + 1], "doc_ids": [b, L] (optional)} as sequences of `length` tokens:
    {"tokens": [b * L / length, length + 1], "doc_ids": [b * L / length, length]}."""
    tokens = batch["tokens"]
    total = tokens.shape[1] - 1
    if length == total:
        return batch
    if length < 1 or total % length:
        raise ValueError(f"a sequence length of {length} does not divide the samples' {total} tokens")
    out = {**batch, "tokens": tokens.unfold(1, length + 1, length).reshape(-1, length + 1)}  # [b, L/n, n+1]
    if "doc_ids" in batch:
        out["doc_ids"] = batch["doc_ids"].reshape(-1, length)
    return out


def cut_batches(batches: list[dict], length: int) -> list[dict]:
    return [cut_batch(b, length) for b in batches]

