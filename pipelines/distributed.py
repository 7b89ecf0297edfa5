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

from modules.distributed import gather_objects, is_global_zero, state_digest, world_size

__all__ = ["distributed_summary", "is_global_zero", "models_digest"]


def models_digest(models: dict[str, nn.Module]) -> str:
    """One SHA-256 (16 hex digits) over the masks and gates (:func:`modules.distributed.state_digest`)
    of every final model, in name order."""
    h = hashlib.sha256()
    for name in sorted(models):
        h.update(f"{name}={state_digest(models[name])};".encode())
    return h.hexdigest()[:16]


def distributed_summary(models: dict[str, nn.Module]) -> dict[str, Any]:
    """``{"world_size", "mask_digest_per_rank", "digests_agree"}`` for results.json.

    Every rank must call it (it gathers each rank's :func:`models_digest`); equal digests mean
    every rank ended with the same pruning decisions.
    """
    digests = gather_objects(models_digest(models))
    return {"world_size": world_size(), "mask_digest_per_rank": digests, "digests_agree": len(set(digests)) == 1}
