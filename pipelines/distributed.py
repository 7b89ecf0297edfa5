"""What a pipeline does differently under several ranks (``trainer=ddp``): who writes, and the digest record.

Lightning's ``ddp`` strategy re-launches ``run.py`` for every rank above 0 (children reuse
the Hydra run dir, Lightning >= 2.1), and each rank runs the whole ``train()``: every fit
phase and every test (all ranks take part in those collectives), but only rank 0 times the
models and writes ``results.json``, plots and exports; the other ranks return after the
last collective step (:func:`distributed_summary`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from torch import nn

from modules.lit.distributed import gather_objects, is_global_zero, state_digest, world_size

__all__ = ["distributed_summary", "is_global_zero", "memory_digest", "models_digest"]


def models_digest(digests: dict[str, str]) -> str:
    """One SHA-256 (16 hex digits) over every final model's :func:`modules.lit.distributed.state_digest`, in name order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()[:16]


def memory_digest(module: nn.Module) -> str:
    """:func:`modules.lit.distributed.state_digest` of a model as this rank holds it in memory (masks, gates,
    shapes). Take it right after the phase's fit, before anything is reloaded: only rank 0 writes the
    checkpoints, so digests of reloaded models would agree whatever the ranks decided."""
    return state_digest(module)


def distributed_summary(digests: dict[str, str]) -> dict[str, Any]:
    """``{"world_size", "mask_digest_per_rank", "digests_agree"}`` for results.json.

    Args:
        digests: model name -> :func:`memory_digest` of that model on this rank.

    Every rank must call it (it gathers each rank's :func:`models_digest`); equal digests mean
    every rank ended with the same pruning decisions.
    """
    digests = gather_objects(models_digest(digests))
    return {"world_size": world_size(), "mask_digest_per_rank": digests, "digests_agree": len(set(digests)) == 1}
