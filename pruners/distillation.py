"""Knowledge distillation from the frozen dense teacher, shared by the pruners.

* :func:`kd_loss`: KL divergence of temperature-softened logits (Hinton et al. 2015,
  arXiv 1503.02531), used by ToP (arXiv 2306.14393 Sec. 3.5) and by SwiftPruner's
  fine-tuning of the searched model.
* :func:`load_teacher_model`: the frozen dense model from a ``BertClassifier`` checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits times T^2 (Hinton et al. 2015). (B, C) -> scalar."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=-1), F.softmax(teacher_logits.detach() / t, dim=-1), reduction="batchmean"
    ) * (t * t)


def load_teacher_model(path: str | Path) -> nn.Module:
    """The frozen (eval mode, no gradients) BERT of a ``BertClassifier`` checkpoint.

    Args:
        path: checkpoint of a fine-tuned dense model (a ``pruner=none`` run or the
            run's own dense phase).

    Returns:
        the checkpoint's :class:`~modules.bert.PrunableBertForSequenceClassification`.

    Raises:
        FileNotFoundError: no file at ``path`` (the message says how to fix it).
    """
    from modules.bert_classifier import BertClassifier

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"pruner.teacher_ckpt={path} does not exist; point it at a checkpoint of a `pruner=none` run "
            "or leave it unset to fine-tune the teacher in this run."
        )
    teacher = BertClassifier.load_from_checkpoint(path, map_location="cpu").model.eval()
    teacher.requires_grad_(False)
    return teacher
