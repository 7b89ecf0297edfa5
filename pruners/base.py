"""The base class every pruner shares: a Lightning callback with validated arguments and saved state.

A pruner is a ``lightning.Callback`` that

* validates its arguments in ``__init__`` and raises :class:`PrunerConfigError`
  naming the setting, the bad value and the allowed values;
* keeps the state that must survive a restart in :meth:`state_dict` /
  :meth:`load_state_dict` as plain values and tensors only (torch >= 2.6 loads
  checkpoints with ``weights_only=True``);
* may change the training objective through :meth:`training_loss`, which the
  LightningModules call for every pruner in ``trainer.callbacks``;
* logs its own metrics under ``pruner/...``.
"""

from __future__ import annotations

from typing import Any, Iterable

import lightning as L
import torch


class PrunerConfigError(ValueError):
    """A pruner setting is invalid; the message names the setting, the value and what is allowed."""


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = True) -> float:
    """Return ``value`` as float if it lies in the interval, else raise :class:`PrunerConfigError`.

    Args:
        name: the setting's name as the user writes it (e.g. ``pruner.target_sparsity``).
        low, high: interval bounds; ``low_open`` / ``high_open`` exclude them.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PrunerConfigError(f"{name}={value!r} is not a number.") from None
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise PrunerConfigError(f"{name}={value!r} is out of range; it must be in {interval}.")
    return v


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise :class:`PrunerConfigError` listing them."""
    choices = list(choices)
    if value not in choices:
        raise PrunerConfigError(f"{name}={value!r} is not supported; choose one of {choices}.")
    return value


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer >= ``minimum``, else raise :class:`PrunerConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PrunerConfigError(f"{name}={value!r} must be an integer >= {minimum}.")
    return value


class Pruner(L.Callback):
    """Base class of litprune pruners (a Lightning callback).

    Subclasses set :attr:`name` and override the hooks they need. The pipeline
    calls :meth:`summary` after training to put the pruner's figures into
    ``results.json``.
    """

    #: short name used in configs and in metric names
    name: str = "pruner"

    @property
    def state_key(self) -> str:
        """Unique key of this pruner's state in a checkpoint (one per pruner class and name)."""
        return f"{type(self).__name__}[{self.name}]"

    def training_loss(
        self, pl_module: L.LightningModule, batch: dict, outputs: Any, task_loss: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Turn the task loss into the pruning objective.

        Args:
            pl_module: the module being trained.
            batch: the training batch.
            outputs: the module's forward output for the batch.
            task_loss: scalar task loss.

        Returns:
            the scalar loss to minimise and a dict of scalars to log as ``pruner/<key>``.
        """
        return task_loss, {}

    def param_groups(self, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups (own learning rates, ``maximize`` for multipliers).

        The module's ``configure_optimizers`` appends them after its own groups and keeps
        their learning rate constant. Called after :meth:`setup`, so parameters created
        there (and restored from a checkpoint) are the ones optimised.
        """
        return []

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable figures of the finished pruning (written to results.json)."""
        return {}

    def log_metrics(self, pl_module: L.LightningModule, metrics: dict[str, torch.Tensor | float], **kwargs) -> None:
        """Log ``metrics`` under ``pruner/<key>`` through the module (rank-zero safe via sync_dist=False)."""
        for key, value in metrics.items():
            pl_module.log(f"pruner/{key}", value, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors that must survive a restart; subclasses extend it."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""


def pruners_of(trainer: L.Trainer | None) -> list[Pruner]:
    """The :class:`Pruner` callbacks attached to ``trainer`` (empty when there is none)."""
    if trainer is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, Pruner)]
