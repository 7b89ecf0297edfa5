"""Did the dense model learn anything? When its training may stop, and its accuracy against the majority class.

When the dense phase stops (issue 35): :class:`EarlyStoppingAfterMinimum`, the dense phase's
``callbacks.early_stopping``, is Lightning's ``EarlyStopping`` that counts no validation
before a minimum of training: ``callbacks.early_stopping.min_steps`` (300) optimizer steps,
``min_epochs`` (1) epochs and the module's learning-rate warm-up, whichever is longest, set as
the fit loop's ``min_steps``. From there it stops the phase once the validation metric has not
improved for ``patience`` validations, at most ``pruner.teacher_epochs`` epochs. Patience
counted from the first validation can end a phase on small data during its warm-up, at the
majority-class rate; small data is where a teacher needs every step and where steps are
cheap, so with 300 steps a 3-epoch teacher at batch 32 on fewer than 3,200 examples trains
all its epochs (benchmarks/top.md has the measurements).

A dense model that ends at the rate of always answering the most frequent class (too few
epochs, too little data, bad labels) is a useless teacher: a pruned model distilled from it
then "beats" it. :func:`teacher_check` compares its validation accuracy with the
majority-class rate; :func:`act_on_teacher_check` stops a run that would prune such a model
(:class:`MajorityClassTeacherError`, before the pruning phase) unless
``allow_majority_class_teacher=true``, and otherwise warns (``pruner=none``: the dense model
is the result). results.json says it (``dense.beats_majority_class``), and so does the printed table.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Optional, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig

from modules.core.errors import ConfigError, UserError
from pipelines.common import build_trainer

log = logging.getLogger(__name__)

#: the accuracy must exceed the majority-class rate by this many standard errors of that rate
STANDARD_ERRORS = 2.0


class MajorityClassTeacherError(UserError):
    """The dense model does not beat the majority-class rate, and a pruning phase would start from it."""


@runtime_checkable
class WarmupSchedule(Protocol):
    """A LightningModule whose learning rate warms up (``modules.lit.bert_classifier.BertClassifier``)."""

    def warmup_steps(self) -> int:
        """Optimizer steps of the warm-up of the fit the module is attached to."""


class EarlyStoppingAfterMinimum(EarlyStopping):
    """Lightning's ``EarlyStopping`` that counts only validations after a minimum of training.

    When a fit starts (a resumed one too, from the same settings and data, so the same value):

        minimum = max(min_steps, trainer.min_steps, the module's warm-up steps, ceil(min_epochs * optimizer steps per epoch))

    where the warm-up is the module's ``warmup_steps()`` (:class:`WarmupSchedule`; 0 for a module
    without one) and an epoch's optimizer steps are
    ``ceil(trainer.num_training_batches / accumulate_grad_batches)``.
    It becomes the fit loop's ``min_steps`` (Lightning then never ends the fit before it), and a
    check before it is skipped: it neither sets the best score nor counts towards ``patience``.
    So with a constant metric the fit ends at the ``patience``-th validation after the first one
    at or past the minimum (that first one sets the best score), or at ``max_epochs``. Its
    counters (``wait_count``, ``best_score``) resume with the checkpoint, as Lightning's do.

    Args:
        min_epochs: epochs of training (a fraction allowed) before any check counts; >= 0.
        min_steps: optimizer steps of training before any check counts; >= 0.
        monitor, min_delta, patience, verbose, mode, strict, check_finite, stopping_threshold,
            divergence_threshold, check_on_train_epoch_end, log_rank_zero_only: as
            ``lightning.pytorch.callbacks.EarlyStopping``; ``patience`` counts validations.

    Raises:
        modules.core.errors.ConfigError: ``min_epochs`` or ``min_steps`` below 0.
    """

    def __init__(
        self,
        monitor: str,
        min_epochs: float = 1.0,
        min_steps: int = 300,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: Optional[float] = None,
        divergence_threshold: Optional[float] = None,
        check_on_train_epoch_end: Optional[bool] = None,
        log_rank_zero_only: bool = False,
    ):
        for key, value in (("min_epochs", min_epochs), ("min_steps", min_steps)):
            if value is None or value < 0:
                raise ConfigError(f"callbacks.early_stopping.{key}={value} must be >= 0 (training before early stopping counts).")
        super().__init__(
            monitor=monitor, min_delta=min_delta, patience=patience, verbose=verbose, mode=mode, strict=strict,
            check_finite=check_finite, stopping_threshold=stopping_threshold, divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end, log_rank_zero_only=log_rank_zero_only,
        )
        self.min_epochs, self.min_steps = float(min_epochs), int(min_steps)
        #: the minimum of this fit in optimizer steps (None until its training starts)
        self.minimum: int | None = None

    def minimum_steps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """The minimum of this fit in optimizer steps (see the class docstring), from the trainer's data and the module's warm-up."""
        warmup = pl_module.warmup_steps() if isinstance(pl_module, WarmupSchedule) else 0
        batches = trainer.num_training_batches
        per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches)) if math.isfinite(batches) else 0
        return max(self.min_steps, int(trainer.fit_loop.min_steps or 0), int(warmup), math.ceil(self.min_epochs * per_epoch))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compute the minimum and make it the fit loop's ``min_steps``."""
        self.minimum = self.minimum_steps(trainer, pl_module)
        trainer.fit_loop.epoch_loop.min_steps = self.minimum
        if self.verbose:
            self._log_info(trainer, f"early stopping counts validations from global step {self.minimum}", self.log_rank_zero_only)

    def _before_minimum(self, trainer: L.Trainer) -> bool:
        return self.minimum is None or trainer.global_step < self.minimum

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's check, skipped before the minimum."""
        if not self._before_minimum(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's check (with ``check_on_train_epoch_end``), skipped before the minimum."""
        if not self._before_minimum(trainer):
            super().on_train_epoch_end(trainer, pl_module)


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
        score: the dense phase's best ``monitor`` value, or None (a given or cached teacher).
        monitor: the metric ``score`` is; when it is not ``val/accuracy``, a validation pass measures it.

    Returns:
        ``val_accuracy``, ``majority_class_rate``, ``majority_margin`` (the standard-error margin,
        :func:`majority_margin`), ``validation_examples`` and ``beats_majority_class``
        (accuracy > rate + margin). It logs nothing: :func:`act_on_teacher_check` does.
    """
    labels = list(datamodule.datasets["validation"].labels)
    rate = max(Counter(labels).values()) / len(labels)
    accuracy = score if (score is not None and monitor == "val/accuracy") else validation_accuracy(cfg, module, datamodule)
    margin = majority_margin(rate, len(labels))
    return {"val_accuracy": accuracy, "majority_class_rate": rate, "majority_margin": margin,
            "validation_examples": len(labels), "beats_majority_class": accuracy > rate + margin}


def below_majority(check: dict[str, Any]) -> str:
    """What :func:`teacher_check` found, as a sentence (for a check that did not beat the majority class)."""
    return (
        f"The dense model's validation accuracy {check['val_accuracy']:.4f} does not beat the majority-class rate "
        f"{check['majority_class_rate']:.4f} (by more than {STANDARD_ERRORS:.0f} standard errors, {check['majority_margin']:.4f}, "
        f"on {check['validation_examples']} examples): it has learned little"
    )


#: what to change when the dense model does not beat the majority class
FIXES = ("train it longer (pruner.teacher_epochs, callbacks.early_stopping.min_steps, .min_epochs or .patience), "
         "give it more data, or check the labels")


def act_on_teacher_check(check: dict[str, Any], prunes: bool, allowed: bool, run_dir: str) -> None:
    """Refuse or flag a dense model that does not beat the majority class (nothing when it does).

    Args:
        check: :func:`teacher_check`'s result.
        prunes: a pruning phase would start from the dense model (and distil from it).
        allowed: ``allow_majority_class_teacher`` (prune it anyway, with a warning).
        run_dir: the run dir (the message says how to continue it).

    Raises:
        MajorityClassTeacherError: ``prunes`` and not ``allowed``: one line saying so and what to change.
    """
    if check["beats_majority_class"]:
        return
    if prunes and not allowed:
        raise MajorityClassTeacherError(
            f"{below_majority(check)}, so the run stops before the pruning phase (a model pruned and distilled from it "
            f"would mean nothing). To fix it, {FIXES}; to prune it anyway, set allow_majority_class_teacher=true "
            f"(`python run.py resume={run_dir} allow_majority_class_teacher=true` continues this run from its dense checkpoint)."
        )
    log.warning("%s, and a model distilled from it means little. To fix it, %s.", below_majority(check), FIXES)
