"""Shared test inputs for the BERT tests."""

from __future__ import annotations

import torch


def bert_inputs(vocab: int, b: int = 4, n: int = 12, seed: int = 0):
    """(B, N) input_ids, attention_mask with varied padding, and two-segment token_type_ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for i, length in enumerate([n, n - 3, 5, n - 1][:b]):
        mask[i, length:] = 0
    types = torch.zeros(b, n, dtype=torch.long)
    types[:, n // 2 :] = 1
    return ids, mask, types
