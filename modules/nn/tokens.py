"""Token importance and token removal: the two tensor operations token pruning is made of.

* :func:`attention_received` - ToP's token score (arXiv 2306.14393 Sec. 3.1).
* :func:`gather_tokens` - physically remove closed tokens (the real speedup of token pruning).

Shapes: ``B`` batch, ``N`` tokens, ``A`` heads.
"""

from __future__ import annotations

import torch


def attention_received(
    probs: torch.Tensor, query_present: torch.Tensor, head_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Token importance: attention each token receives, averaged over heads and present queries.

    arXiv 2306.14393 Sec. 3.1 (the score ToP ranks tokens by).

    Args:
        probs: (B, A, N, N) attention probabilities (query, key).
        query_present: (B, N) bool or float weights of the queries to average over.
        head_weight: (A,) 0/1 head mask; the average runs over the kept heads only,
            so a masked model scores tokens as its physically shrunk copy does.
            None means all heads.

    Returns:
        (B, N) scores; padding keys get about 0.

    Raises:
        ValueError: no head to average over (A = 0 or every head masked).
    """
    if probs.shape[1] == 0 or (head_weight is not None and not bool((head_weight != 0).any())):
        raise ValueError("No attention head left in this layer, so it gives no token scores.")
    if head_weight is None:
        per_query = probs.mean(dim=1)  # (B, N, N)
    else:
        hw = head_weight.to(probs.dtype)
        per_query = (probs * hw[None, :, None, None]).sum(dim=1) / hw.sum()
    w = query_present.to(probs.dtype)
    return (per_query * w[:, :, None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1e-12)


def gather_tokens(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Physically remove closed tokens: keep the open ones, in order, padded to the batch maximum.

    Args:
        keep: (B, N) bool.
        tensors: tensors of shape (B, N, ...) to gather along dim 1.

    Returns:
        the new presence mask (B, N') bool and the gathered tensors (B, N', ...),
        where N' is the largest number of kept tokens in the batch.
    """
    counts = keep.sum(dim=1)
    n_new = int(counts.max())
    # Stable sort puts kept tokens first in their original order (CLS stays at 0).
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n_new]
    new_keep = torch.gather(keep, 1, order)
    out = []
    for t in tensors:
        idx = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        out.append(torch.gather(t, 1, idx))
    return new_keep, out
