"""What a LightningModule asks of the callbacks that change its training objective.

The modules here never import ``pruners/`` (dependencies point one way: pipelines ->
pruners -> modules). Instead they define the small interface they call, and pruners
implement it: :class:`TrainingObjective` is a ``lightning.Callback`` whose
:meth:`~TrainingObjective.training_loss` turns the task loss into the training loss and
whose :meth:`~TrainingObjective.param_groups` adds optimizer groups (gates, Lagrange
multipliers). :func:`objectives_of` finds them among a trainer's callbacks.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class TrainingObjective(L.Callback):
    """A callback that may change the loss and add optimizer parameter groups (base of every pruner)."""

    def training_loss(
        self, pl_module: L.LightningModule, batch: dict, outputs: Any, task_loss: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Turn the task loss into the loss to minimise.

        Args:
            pl_module: the module being trained.
            batch: the training batch (or, for the stream DLRM, the minibatch).
            outputs: the module's forward output for the batch.
            task_loss: scalar task loss.

        Returns:
            the scalar loss and a dict of scalars the module logs as ``pruner/<key>``.
        """
        return task_loss, {}

    def param_groups(self, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups (own learning rates, ``maximize`` for multipliers).

        The module's ``configure_optimizers`` appends them after its own groups and keeps
        their learning rate constant. Called after ``setup``, so parameters created there
        (and restored from a checkpoint) are the ones optimised.
        """
        return []


def objectives_of(trainer: L.Trainer | None) -> list[TrainingObjective]:
    """The :class:`TrainingObjective` callbacks attached to ``trainer`` (empty without a trainer)."""
    if trainer is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, TrainingObjective)]


def log_objective_metrics(pl_module: L.LightningModule, metrics: dict[str, Any], **kwargs) -> None:
    """Log an objective's scalars under ``pruner/<key>`` through the module (``self.log`` semantics)."""
    for key, value in metrics.items():
        pl_module.log(f"pruner/{key}", value, **kwargs)
