"""Fine-tuning under fixed head/neuron masks with task loss + distillation: SwiftPruner's searched model and uniform baseline."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from pruners.base import FitPlan, check_positive_int, check_range
from pruners.distillation import Distillation, TeacherPruner


def kept_per_layer(masks: torch.Tensor | None) -> list[int] | None:
    """Units kept per layer of (L, U) 0/1 masks (None for None)."""
    return None if masks is None else [int(row.sum()) for row in masks]


class MaskedDistillation(TeacherPruner):
    """Fine-tune a BERT under fixed head/neuron masks with task loss + logits distillation.

    The masks (from a search, or a uniform baseline) are set on the module's model at the
    start of fit; parameter shapes stay put (the served model removes the masked units). The
    loss is ``distillation``'s, ``task_weight * CE + kd_weight * KL(teacher || student)``
    (Hinton et al. 2015, arXiv 1503.02531), the teacher being the frozen dense model. Checkpoints are picked by ``val/accuracy`` (the masks, hence the MACs, are fixed).

    Args:
        head_masks: (L, A) float 0/1 per layer and head; None keeps the model's masks.
        neuron_masks: (L, I) float 0/1 per layer and FFN neuron; None keeps them.
        teacher_ckpt: checkpoint of the fine-tuned dense ``BertClassifier``; None lets the
            pipeline fine-tune one first (``teacher_epochs``).
        teacher_epochs: most epochs of that in-run dense fine-tuning (it stops earlier once the
            validation metric has converged: ``callbacks.early_stopping``).
        finetune_epochs: epochs of fine-tuning under the masks.
        distillation: the loss against the teacher (``pruner.distillation``,
            :class:`~pruners.distillation.Distillation`); None: its defaults.
        model_lr: peak learning rate of the model while fine-tuning; None keeps the model's ``lr``.
        info: JSON-serialisable facts added to :meth:`results` (e.g. the uniform candidate's search record).
        name: metric and state name.

    Raises:
        PrunerConfigError: a setting out of range (the message names it).
    """

    name = "masked_kd"
    decisions = frozenset({"heads", "neurons"})
    #: the ``method`` entry of :meth:`results`
    method = "masked_distillation"
    monitor = "val/accuracy"

    def __init__(
        self,
        head_masks: torch.Tensor | None = None,
        neuron_masks: torch.Tensor | None = None,
        teacher_ckpt: str | None = None,
        teacher_epochs: int = 3,
        finetune_epochs: int = 1,
        distillation: Distillation | None = None,
        model_lr: float | None = 5e-5,
        info: dict[str, Any] | None = None,
        name: str = "masked_kd",
    ):
        super().__init__()
        self.head_masks = None if head_masks is None else torch.as_tensor(head_masks, dtype=torch.float32)
        self.neuron_masks = None if neuron_masks is None else torch.as_tensor(neuron_masks, dtype=torch.float32)
        self.teacher_ckpt = teacher_ckpt
        self.teacher_epochs = check_positive_int("pruner.teacher_epochs", teacher_epochs)
        self.finetune_epochs = check_positive_int("pruner.finetune_epochs", finetune_epochs)
        self.distillation = distillation if distillation is not None else Distillation()
        self.model_lr = None if model_lr is None else check_range("pruner.model_lr", model_lr, 0.0, math.inf, low_open=True)
        self.info = dict(info or {})
        self.name = name
        self.teacher = None

    # ------------------------------------------------------------------ protocol
    def fit_plan(self) -> FitPlan:
        """``finetune_epochs`` epochs, the checkpoint with the best ``val/accuracy``, at ``model_lr``."""
        return FitPlan(max_epochs=self.finetune_epochs, monitor=self.monitor, mode="max", model_lr=self.model_lr,
                       epochs_setting="pruner.finetune_epochs")

    def results(self) -> dict[str, Any]:
        """``method``, heads and FFN neurons kept per layer (None: the model's own masks) and :attr:`info`."""
        return {"method": self.method, "heads_kept": kept_per_layer(self.head_masks),
                "ffn_neurons_kept": kept_per_layer(self.neuron_masks), **self.info}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Load the teacher if none was set (fit only)."""
        if stage != "fit":
            return
        self.ensure_teacher()

    def apply_masks(self, pl_module: L.LightningModule) -> None:
        """Set this pruner's masks on ``pl_module.model`` (nothing to do when it holds none)."""
        if self.head_masks is not None or self.neuron_masks is not None:
            pl_module.model.set_structured_masks(self.head_masks, self.neuron_masks)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Put the teacher on the module's device; apply the masks before the first step."""
        super().on_fit_start(trainer, pl_module)
        self.apply_masks(pl_module)

    def training_loss(self, pl_module, batch, outputs, task_loss):
        """``distillation``'s loss, ``task_weight * task + kd_weight * KL``, against the frozen dense teacher's logits."""
        with torch.no_grad():
            teacher_logits = self.teacher(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")).logits
        loss, kd = self.distillation.loss(task_loss, outputs.logits, teacher_logits)
        return loss, {"kd_loss": kd.detach()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The masks (tensors), the teacher checkpoint path and :attr:`info`."""
        return {"head_masks": self.head_masks, "neuron_masks": self.neuron_masks, "teacher_ckpt": self.teacher_ckpt,
                "info": self.info}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.head_masks = state_dict.get("head_masks")
        self.neuron_masks = state_dict.get("neuron_masks")
        self.teacher_ckpt = state_dict.get("teacher_ckpt") or self.teacher_ckpt
        self.info = dict(state_dict.get("info") or self.info)
