"""SwiftPruner's unit importance (``pruner.importance``): which heads and FFN neurons a candidate keeps.

A candidate fixes how many heads and neurons each layer keeps; which ones is decided
once, before the search, by the first-order Taylor importance of the dense fine-tuned
model (:func:`modules.nn.structured.taylor_importance`) on a seeded subset of training
sentences (2,048 by default, the sample size of Kwon et al. 2022, arXiv 2204.09656, whose
mask search also scores units on training examples).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from modules.lit.distributed import shared_map
from modules.nn.structured import UnitImportance, taylor_importance
from pruners.base import PrunerConfigError, check_choice, check_positive_int
from pruners.swiftpruner.proxy import by_length, collated

IMPORTANCE_SPLITS = ("train", "validation")
#: offset of the importance subset's generator from the search seed (its draw leaves the other subsets unchanged)
SEED_OFFSET = 104729


class Importance:
    """Taylor importance of the dense model's units on a seeded subset (``pruner.importance``).

    Args:
        examples: examples of the estimate.
        split: ``train`` or ``validation``. From ``validation`` the examples are taken before
            the proxy's from the same seeded order (so the two are disjoint), at most half the split.
        batch_size: batch size of the estimate.

    Raises:
        PrunerConfigError: a setting out of range (the message names it as ``pruner.importance.<key>``).
    """

    def __init__(self, examples: int = 2048, split: str = "train", batch_size: int = 64):
        self.examples = check_positive_int("pruner.importance.examples", examples)
        self.split = check_choice("pruner.importance.split", split, IMPORTANCE_SPLITS)
        self.batch_size = check_positive_int("pruner.importance.batch_size", batch_size)

    def check(self, datamodule) -> None:
        """Raise :class:`PrunerConfigError` if the configured split is empty."""
        if len(datamodule.datasets[self.split]) == 0:
            raise PrunerConfigError(
                f"pruner.importance.split={self.split}, but the {self.split} split is empty; use the other split."
            )

    def batches(self, datamodule, val_order: Sequence[int], seed: int) -> tuple[list[dict], list[int]]:
        """(the importance batches, the validation indices of ``val_order`` left for the proxy).

        ``validation``: the first ``min(examples, len // 2)`` indices of ``val_order``. ``train``:
        ``examples`` training indices drawn by a generator seeded by ``seed + SEED_OFFSET``, so
        the proxy's subset does not depend on their number. Batches are sorted by length.

        Raises:
            PrunerConfigError: the split is empty.
        """
        self.check(datamodule)
        dataset = datamodule.datasets[self.split]
        order = list(val_order)
        if self.split == "validation":
            n = min(self.examples, len(dataset) // 2)
            picked, order = order[:n], order[n:]
        else:
            g = torch.Generator().manual_seed(seed + SEED_OFFSET)
            picked = torch.randperm(len(dataset), generator=g)[: self.examples].tolist()
        return collated(datamodule, dataset, by_length(dataset, picked), self.batch_size), order

    def estimate(self, model: nn.Module, batches: list[dict]) -> UnitImportance:
        """Heads (L, A) and neurons (L, I) importance of ``model`` on ``batches`` (:func:`taylor_importance`).

        Each batch's |dL/dm| is taken on its own, under several ranks by the rank whose share it is
        (:func:`modules.lit.distributed.shared_map`), and they are averaged in batch order: the
        value :func:`taylor_importance` gives on all the batches in one process, bit for bit.

        Raises:
            ValueError: no batches (or a batch without ``input_ids`` or ``labels``).
        """
        if not batches:
            raise ValueError("SwiftPruner's importance got no batches; pruner.importance.examples must select some.")
        per_batch = shared_map(lambda b: taylor_importance(model, [b]), batches)
        heads, neurons = torch.zeros_like(per_batch[0].heads), torch.zeros_like(per_batch[0].neurons)
        for part in per_batch:
            heads += part.heads
            neurons += part.neurons
        return UnitImportance(heads / len(per_batch), neurons / len(per_batch))
