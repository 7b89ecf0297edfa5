"""SwiftPruner's proxy (``pruner.proxy``): a fast quality score of a candidate before any fine-tuning.

A candidate's masks (each layer's most important heads and FFN neurons,
:func:`modules.nn.structured.top_unit_masks`) are applied to a copy of the dense fine-tuned
model, the copy is physically shrunk (:func:`modules.nn.structured.shrink_structured`) and
scored on a seeded subset of the validation split: accuracy, or ROC AUC (threshold-free:
it ignores the shift of the decision threshold that pruning causes and fine-tuning undoes).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from modules.lit.distributed import shared_map
from modules.nn.structured import UnitImportance, shrink_structured, top_unit_masks
from pruners.base import PrunerConfigError, check_choice, check_positive_int
from pruners.swiftpruner.evolution import SearchSpace

PROXY_METRICS = ("accuracy", "auroc")


def collated(datamodule, dataset, indices: Sequence[int], batch_size: int) -> list[dict]:
    """``dataset[indices]`` in order, cut into batches of ``batch_size`` and collated by the text
    data module (``datamodule.collate``: dicts of (B, N) padded tensors and (B,) ``labels``)."""
    return [datamodule.collate([dataset[i] for i in indices[s : s + batch_size]]) for s in range(0, len(indices), batch_size)]


def by_length(dataset, indices: Sequence[int]) -> list[int]:
    """``indices`` sorted by the examples' token counts (batches of similar lengths: little padding)."""
    return sorted(indices, key=lambda i: len(dataset[i]["input_ids"]))


def proxy_score(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """Proxy quality of a candidate from its held-out logits.

    Args:
        logits: (B, C) float.
        labels: (B,) int class indices.
        metric: ``accuracy`` (fraction correct) or ``auroc`` (ROC AUC of the class-1
            probability for C = 2, macro one-vs-rest AUC otherwise; torchmetrics).

    Returns:
        the score in [0, 1].

    Raises:
        ValueError: an unknown metric.
    """
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    if metric == "accuracy":
        return float((logits.argmax(dim=-1) == labels).float().mean())
    if metric == "auroc":
        probs = logits.float().softmax(dim=-1)
        if probs.shape[1] == 2:
            return float(binary_auroc(probs[:, 1], labels))
        return float(multiclass_auroc(probs, labels, num_classes=probs.shape[1]))
    raise ValueError(f"proxy metric {metric!r} is not supported; choose one of {list(PROXY_METRICS)}.")


def logits_of(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """``model``'s (B, C) logits on ``batches`` (host tensors, moved to the model's device), concatenated, on the host,
    under ``torch.inference_mode``."""
    device = next(model.parameters()).device
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    with torch.inference_mode():
        return torch.cat([model(to(b["input_ids"]), to(b["attention_mask"]), to(b.get("token_type_ids"))).logits.cpu()
                          for b in batches])


class Proxy:
    """How candidates are scored during the search (``pruner.proxy``; see the module docstring).

    Args:
        metric: ``auroc`` or ``accuracy`` (:func:`proxy_score`).
        examples: held-out validation examples scoring each candidate (a seeded subset).
        batch_size: batch size of the scoring.

    Raises:
        PrunerConfigError: a setting out of range (the message names it as ``pruner.proxy.<key>``).
    """

    def __init__(self, metric: str = "auroc", examples: int = 512, batch_size: int = 64):
        self.metric = check_choice("pruner.proxy.metric", metric, PROXY_METRICS)
        self.examples = check_positive_int("pruner.proxy.examples", examples)
        self.batch_size = check_positive_int("pruner.proxy.batch_size", batch_size)

    def check(self, datamodule) -> None:
        """Raise :class:`PrunerConfigError` unless the validation split has at least 2 examples."""
        if len(datamodule.datasets["validation"]) < 2:
            raise PrunerConfigError("SwiftPruner needs at least 2 validation examples for the proxy (pruner.proxy).")

    def batches(self, datamodule, order: Sequence[int]) -> list[dict]:
        """The proxy's batches: the first ``examples`` validation indices of ``order``, sorted by length, collated."""
        val = datamodule.datasets["validation"]
        return collated(datamodule, val, by_length(val, order[: self.examples]), self.batch_size)

    def scorer(self, model: nn.Module, importance: UnitImportance, space: SearchSpace, batches: list[dict]) -> Callable[[tuple[int, ...]], float]:
        """``genes -> score``: the candidate's shrunk copy of ``model`` scored on ``batches`` (``model`` is not modified).

        Under several ranks every rank scores its share of the batches (:func:`modules.lit.distributed.shared_map`)
        and the logits are gathered in batch order, so every rank gets the score one process gets;
        every rank must call the scorer with the same genes.

        Args:
            model: the dense fine-tuned :class:`~modules.nn.bert.PrunableBertForSequenceClassification`.
            importance: the unit importance that decides which units a candidate keeps.
            space: the search space the genes belong to.
            batches: :meth:`batches`.
        """
        work = copy.deepcopy(model).eval()
        labels = torch.cat([b["labels"] for b in batches])

        def score(genes: tuple[int, ...]) -> float:
            work.set_structured_masks(*top_unit_masks(importance, *space.decode(genes)))
            shrunk = shrink_structured(work)
            return proxy_score(torch.cat(shared_map(lambda b: logits_of(shrunk, [b]), batches)), labels, self.metric)

        return score
