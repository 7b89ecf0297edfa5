"""The task protocol: everything :mod:`pipelines.flow` asks of a kind of model, and nothing else.

A task is chosen by ``_target_`` in the model config (``model.task``; e.g.
``conf/model/bert.yaml`` names :class:`pipelines.tasks.text_classification.TextClassificationTask`).
A new model is a task (a subclass of :class:`Task`), a LightningModule with ``served_model()``
and ``exportable()``, and a config in ``conf/model/``: no edit in ``run.py`` or the flow.

Terms used below:

* *module*: the model's LightningModule (what is fitted and checkpointed);
* *served model*: ``module.served_model()``, a copy of the module in eval mode whose ``.model`` is the
  physically pruned network (a plain ``nn.Module``) that is tested, timed and exported;
* *batch*: one input of the served model in the task's own form (a dict of tensors, a tuple, ...),
  passed back to the task's :meth:`Task.logits` and :meth:`Task.feeds` only;
* *exportable*: the ONNX-exportable wrapper of a served model (:meth:`Task.exportable`), with
  ``io_meta()``, ``summary()`` and ``dynamic_axes()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig


@dataclass
class DenseCheck:
    """What a task found about the dense model before any pruner starts from it.

    Attributes:
        figures: entries added to ``results["dense"]`` (e.g. ``beats_majority_class``).
        usable: whether a pruner may start (and distil) from it; the teacher cache stores and
            serves only usable teachers.
    """

    figures: dict[str, Any] = field(default_factory=dict)
    usable: bool = True


class Task:
    """What differs between kinds of model; the defaults suit a model that needs nothing more.

    Class attributes:
        data_needs: what ``cfg.data`` must build, for the error message (e.g. ``"a stream (data=movielens, ...)"``).
        data_base: the data module class ``cfg.data`` must build (None: any).
        checkpoint_every_batch: the resumable checkpoint is written after every training batch
            (a stream's window), not only after every validation and epoch.
        latency_aa_control: time the dense model twice in the same rounds (``dense_again``) and
            record ``latency_aa_ratio`` (near 1: the machine was quiet enough for speedups to mean something).
        timed_on: what the timing inputs are, for the latency protocol (``batches``, ``rows``).
    """

    data_needs: str = "its data"
    data_base: type | None = None
    checkpoint_every_batch: bool = False
    latency_aa_control: bool = False
    timed_on: str = "batches"

    # ------------------------------------------------------------------ building
    def build_data(self, cfg: DictConfig) -> L.LightningDataModule:
        """The data module of ``cfg.data``, set up for fitting (``setup("fit")`` called)."""
        raise NotImplementedError

    def build_module(self, cfg: DictConfig, datamodule) -> L.LightningModule:
        """A new module of ``cfg.model.module`` for ``datamodule`` (the dense phase's, or a phase's fresh start)."""
        raise NotImplementedError

    def start_module(self, cfg: DictConfig, datamodule, checkpoint: str) -> L.LightningModule:
        """The module a pruner phase fits, given the checkpoint it starts from (the dense one, or the previous
        stage's). Default: a copy of that checkpoint."""
        from hydra.utils import get_class

        return get_class(cfg.model.module._target_).load_from_checkpoint(checkpoint, map_location="cpu")

    def kept_module(self, cfg: DictConfig, datamodule, phase: str, module: L.LightningModule, checkpoint: str,
                    fitted: bool) -> L.LightningModule:
        """The module a finished phase keeps (what is served and tested). Default: reloaded from ``checkpoint``
        (the phase's kept checkpoint, which rank 0 wrote).

        Args:
            module: the module fitted in this process (``fitted``), or the unfitted one (the phase was
                restored from elsewhere: the teacher cache, ``pruner.teacher_ckpt``).
        """
        from hydra.utils import get_class

        return get_class(cfg.model.module._target_).load_from_checkpoint(checkpoint, map_location="cpu")

    def teacher(self, dense_served: L.LightningModule) -> torch.nn.Module:
        """The network handed to a pruner that distils (:meth:`pruners.base.Pruner.set_teacher`): the dense
        model's served network (``.model``)."""
        return dense_served.model

    # ------------------------------------------------------------------ results
    def describe(self, cfg: DictConfig, datamodule) -> dict[str, Any]:
        """Top-level results entries that describe the run's data and evaluation (after ``task``)."""
        return {}

    def dense_check(self, cfg: DictConfig, datamodule, checkpoint: str, score: float | None) -> DenseCheck | None:
        """A check of the dense model in ``checkpoint`` (``score``: its monitored value when fitted here);
        None: the task has none."""
        return None

    def act_on_dense_check(self, cfg: DictConfig, check: DenseCheck, prunes: bool, run_dir: Path) -> None:
        """Refuse (raise a :class:`modules.core.errors.UserError`) or flag the dense model the check found unusable."""

    def evaluate(self, cfg: DictConfig, datamodule, phase: str, module: L.LightningModule,
                 served: torch.nn.Module) -> dict[str, Any]:
        """A final model's test entries: at least ``metrics`` (name -> float), from its kept module and served model.

        Args:
            phase: the phase whose model it is (its logger runs may get the test metrics).
        """
        raise NotImplementedError

    def figures(self, cfg: DictConfig, datamodule, results: dict[str, Any], modules: dict[str, L.LightningModule],
                served: dict[str, torch.nn.Module]) -> None:
        """Before timing (rank 0): fill each model's ``macs_per_sample``, ``params`` and the task's own figures
        into ``results`` (per model and top-level)."""

    def finish(self, cfg: DictConfig, datamodule, out_dir: Path, results: dict[str, Any],
               served: dict[str, torch.nn.Module]) -> dict[str, str]:
        """After timing (rank 0): last figures and plots; returns the files written (role -> path relative to ``out_dir``)."""
        return {}

    # ------------------------------------------------------------------ serving
    def exportable(self, served: torch.nn.Module) -> torch.nn.Module:
        """The ONNX-exportable wrapper of a served model."""
        raise NotImplementedError

    def served_meta(self, name: str, exportable: torch.nn.Module, results: dict[str, Any]) -> dict[str, Any]:
        """litprune.json's content for ``served/<name>/`` (``kind``, inputs and outputs, ``pruning``)."""
        raise NotImplementedError

    def logits(self, served: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The served model's output on one batch (what is timed and what ONNX Runtime must match)."""
        raise NotImplementedError

    def feeds(self, exportable: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """One batch as the exported graph's inputs, by input name (arrays of them feed ONNX Runtime)."""
        raise NotImplementedError

    def latency_batches(self, cfg: DictConfig, datamodule, batch_size: int) -> list[Any]:
        """The batches one timed call runs at ``batch_size`` (latency is per batch: their mean)."""
        raise NotImplementedError

    def latency_what(self, cfg: DictConfig) -> str:
        """What is timed, for the latency protocol."""
        raise NotImplementedError

    def parity_batches(self, cfg: DictConfig, datamodule) -> list[Any]:
        """The batches ONNX Runtime is checked on against PyTorch (``export.parity_examples``)."""
        raise NotImplementedError

    def export_example(self, cfg: DictConfig, datamodule) -> Any:
        """The batch the ONNX graph is traced with."""
        return self.parity_batches(cfg, datamodule)[0]

    def calibration(self, cfg: DictConfig, datamodule, exportable: torch.nn.Module) -> tuple[list[dict[str, np.ndarray]], str]:
        """Static quantization's calibration feeds (``export.calibration_examples``) and which examples they are."""
        raise NotImplementedError

    def onnx_test_split(self, datamodule) -> tuple[list[Any], list[torch.Tensor], str]:
        """What an int8 copy is scored on: (batches, their labels, the split's name for ``agreement.with``)."""
        raise NotImplementedError

    def onnx_logits(self, output: np.ndarray) -> np.ndarray:
        """An ONNX Runtime output batch as logits: ``(B, C)`` class logits or ``(B,)`` click logits."""
        return output

    def onnx_scores(self, datamodule, fp32: list[np.ndarray], int8: list[np.ndarray],
                    labels: list[torch.Tensor]) -> dict[str, Any]:
        """An int8 copy's results entries from its logits and its fp32 source's on :meth:`onnx_test_split`
        (per batch, :meth:`onnx_logits` applied): at least ``metrics``."""
        raise NotImplementedError
