"""Did the dense model learn anything? Its validation accuracy against the majority-class rate.

A dense model that ends at the rate of always answering the most frequent class (too few
epochs, too little data, bad labels) is a useless teacher: a pruned model distilled from it
then "beats" it. The dense phase trains until its validation metric converges
(``callbacks.early_stopping``, at most ``pruner.teacher_epochs`` epochs); :func:`teacher_check`
then compares its validation accuracy with the majority-class rate and the run says so,
in the log, in results.json (``dense.beats_majority_class``) and in the printed table.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import lightning as L
from omegaconf import DictConfig

from pipelines.common import build_trainer

log = logging.getLogger(__name__)

#: the accuracy must exceed the majority-class rate by this many standard errors of that rate
STANDARD_ERRORS = 2.0


def majority_margin(rate: float, n: int) -> float:
    """``STANDARD_ERRORS * sqrt(rate (1 - rate) / n)``: how far above ``rate`` an accuracy on ``n`` examples must be."""
    return STANDARD_ERRORS * math.sqrt(rate * (1.0 - rate) / max(1, n))


def validation_accuracy(cfg: DictConfig, module: L.LightningModule, datamodule) -> float:
    """``val/accuracy`` of ``module`` over the validation split (one pass, no checkpoint, no logger)."""
    trainer = build_trainer(cfg, "validate", [], [], enable_checkpointing=False, enable_progress_bar=False)
    (raw,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(raw["val/accuracy"])


def teacher_check(cfg: DictConfig, module: L.LightningModule, datamodule, score: float | None, monitor: str | None) -> dict[str, Any]:
    """Validation accuracy of the dense model against the majority-class rate of the validation split.

    Args:
        cfg: the run's config (the trainer of a validation pass, when one is needed).
        module: the dense model (its best checkpoint).
        datamodule: a set-up text data module.
        score: the dense phase's best ``monitor`` value, or None (a given teacher checkpoint).
        monitor: the metric ``score`` is; when it is not ``val/accuracy``, a validation pass measures it.

    Returns:
        ``val_accuracy``, ``majority_class_rate``, ``majority_margin`` (the standard-error margin,
        :func:`majority_margin`) and ``beats_majority_class`` (accuracy > rate + margin); a warning
        is logged when it does not.
    """
    labels = list(datamodule.datasets["validation"].labels)
    rate = max(Counter(labels).values()) / len(labels)
    accuracy = score if (score is not None and monitor == "val/accuracy") else validation_accuracy(cfg, module, datamodule)
    margin = majority_margin(rate, len(labels))
    beats = accuracy > rate + margin
    if not beats:
        log.warning(
            "The dense model's validation accuracy %.4f does not beat the majority-class rate %.4f (by more than %.1f "
            "standard errors, %.4f, on %d examples): it has learned little, and a model distilled from it means little. "
            "Train it longer (pruner.teacher_epochs, callbacks.early_stopping.patience), give it more data, or check the labels.",
            accuracy, rate, STANDARD_ERRORS, margin, len(labels),
        )
    return {"val_accuracy": accuracy, "majority_class_rate": rate, "majority_margin": margin, "beats_majority_class": beats}
