"""The pruner protocol: everything a pipeline may ask of a pruner, and nothing else.

A pruner is a ``lightning.Callback`` (through :class:`modules.lit.objective.TrainingObjective`,
so the LightningModules call its :meth:`~modules.lit.objective.TrainingObjective.training_loss`
and :meth:`~modules.lit.objective.TrainingObjective.param_groups`). A pipeline runs it in
phases and asks it, only through the methods below:

* :meth:`Pruner.check`: can it prune this model on this data? Run before any training.
* :meth:`Pruner.teacher_plan`: does it distil from a dense teacher, and where does that
  teacher come from (a checkpoint, or a dense fit of some epochs)?
  :meth:`Pruner.set_teacher` hands the teacher over.
* :meth:`Pruner.fit_plan`: how its fit phase runs (epochs, checkpoint metric, learning rate).
* :meth:`Pruner.phases`: its fit phases in order, each starting from the previous one's
  model (one, ``pruned``, for a plain pruner; one per stage for a composite,
  :class:`pruners.composite.CompositePruner`).
* :meth:`Pruner.baselines`: further pruners the pipeline runs the same way after it
  (SwiftPruner's uniform model), by result name.
* :meth:`Pruner.served_figures`: figures of the final served model that its own criterion is
  about (SwiftPruner: that model's latency against the budget), measured after training.
* :meth:`Pruner.results` and :meth:`Pruner.write_files`: what it adds to results.json and
  which files it writes into the run dir.
* ``state_dict`` / ``load_state_dict`` (Lightning's callback state): plain values and
  tensors only (torch >= 2.6 loads checkpoints with ``weights_only=True``).
* :attr:`Pruner.prunes_model` and :attr:`Pruner.decisions`: which model it prunes and which kinds
  of decision it leaves in it, so that a composite can refuse stages that cannot compose.

The served model is not the pruner's business: the pruner leaves its decisions in the
model's state (token gates, head/neuron masks, weight masks) and the LightningModule builds
the served copy from them (``served_model()``).

A new pruner is a file in ``pruners/`` (a subclass setting :attr:`Pruner.config_name`), a
YAML in ``conf/pruner/`` and tests; no pipeline changes. Settings are validated in ``__init__`` with :class:`PrunerConfigError`, which names
the setting, the bad value and the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import lightning as L
import torch
from torch import nn

from modules.core.errors import UserError
from modules.lit.objective import TrainingObjective, log_objective_metrics


class PrunerConfigError(UserError, ValueError):
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


@dataclass(frozen=True)
class TeacherPlan:
    """Where the dense teacher of a distilling pruner comes from.

    Attributes:
        checkpoint: a checkpoint of a finished dense model (a ``pruner=none`` run) to load;
            None: the pipeline fits the dense model first.
        epochs: most epochs of that dense fit (when ``checkpoint`` is None); the pipeline stops it
            earlier once the validation metric has converged (``callbacks.early_stopping``).
    """

    checkpoint: str | None
    epochs: int


@dataclass(frozen=True)
class FitPlan:
    """How the pipeline runs a pruner's fit phase.

    Attributes:
        max_epochs: epochs of the fit; None keeps ``trainer.max_epochs``.
        monitor: metric that picks the checkpoint kept from the fit; None keeps the last.
            A best score below 0 means no checkpoint met the pruner's criterion (e.g. its
            sparsity target), and the pipeline then keeps the last one.
        mode: ``max`` or ``min`` for ``monitor``.
        model_lr: peak learning rate of the model's weights during the fit; None keeps
            the model's own ``lr``.
    """

    max_epochs: int | None = None
    monitor: str | None = None
    mode: str = "max"
    model_lr: float | None = None


class Pruner(TrainingObjective):
    """Base class of litprune pruners: a Lightning callback implementing the pruner protocol.

    Subclasses set :attr:`name`, validate their settings in ``__init__`` and override the
    protocol methods and Lightning hooks they need. Defaults describe a pruner that needs no
    teacher, fits with the trainer's settings, has no baseline and adds nothing to the results.
    """

    #: short name used in configs, metric names and checkpoint state keys
    name: str = "pruner"
    #: the pruner's config in ``conf/pruner/<config_name>.yaml``, which extends the schema
    #: ``base_<config_name>`` built from this class's constructor (``pipelines.configs``
    #: finds every Pruner subclass in ``pruners/`` that sets it); None: not selectable
    config_name: str | None = None
    #: constructor arguments that are components, configured by nested ``_target_`` nodes:
    #: argument name -> the component's class (its constructor is the node's schema)
    components: dict[str, type] = {}
    #: the model config this pruner prunes (``bert``, ``dlrm``), as ``model=<name>``; None: any
    prunes_model: str | None = None
    #: kinds of decision the pruner leaves in the model's state (``heads``, ``neurons``, ``tokens``,
    #: ``layers``, ``weights``); a composite refuses two stages deciding the same kind
    decisions: frozenset[str] = frozenset()

    @property
    def state_key(self) -> str:
        """Unique key of this pruner's state in a checkpoint (one per pruner class and name)."""
        return f"{type(self).__name__}[{self.name}]"

    # ------------------------------------------------------------------ protocol
    def check(self, pl_module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        """Check the settings against the model and the (set-up) data, before any training.

        Raises:
            PrunerConfigError: this pruner cannot prune this model or data; the message
                says what to change.
        """

    def teacher_plan(self) -> TeacherPlan | None:
        """Where the dense teacher comes from, or None when the pruner distils from none."""
        return None

    def set_teacher(self, teacher: nn.Module) -> None:
        """Receive the dense teacher (frozen by the receiver). Called when :meth:`teacher_plan` is not None.

        Raises:
            PrunerConfigError: the pruner takes no teacher.
        """
        raise PrunerConfigError(f"pruner={self.name} distils from no teacher.")

    def fit_plan(self) -> FitPlan:
        """How the pipeline runs this pruner's fit (epochs, checkpoint metric, learning rate)."""
        return FitPlan()

    def phases(self) -> list[tuple[str, "Pruner"]]:
        """The fit phases, in order, as (phase name, the pruner attached in it): ``[("pruned", self)]``.

        The pipeline runs them one after the other, each from the previous phase's kept
        checkpoint (the first from the dense model); the last phase's model is the pruned model.
        """
        return [("pruned", self)]

    def served_figures(self, served: nn.Module, dense: nn.Module) -> dict[str, Any]:
        """Figures of the final served model that this pruner's criterion is about, measured after training.

        Args:
            served: the final pruned model's served copy (a LightningModule in eval mode).
            dense: the dense model's served copy.

        Returns:
            JSON-serialisable figures added to the pruner's results (none by default).
        """
        return {}

    def baselines(self) -> dict[str, "Pruner"]:
        """Further pruners to run the same way after this one's fit, by result name (e.g. ``uniform``)."""
        return {}

    def results(self) -> dict[str, Any]:
        """JSON-serialisable settings and figures of the finished pruning, for results.json."""
        return {}

    def write_files(self, out_dir: Path) -> dict[str, str]:
        """Write the pruner's own files (histories, plots) into ``out_dir``.

        Returns:
            file role -> path relative to ``out_dir``, recorded in results.json.
        """
        return {}

    # ------------------------------------------------------------------ helpers
    def log_metrics(self, pl_module: L.LightningModule, metrics: dict[str, torch.Tensor | float], **kwargs) -> None:
        """Log ``metrics`` under ``pruner/<key>`` through the module (``LightningModule.log`` keywords)."""
        log_objective_metrics(pl_module, metrics, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors that must survive a restart; subclasses extend it."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
