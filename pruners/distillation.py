"""Knowledge distillation from the frozen dense teacher, shared by the pruners.

* :func:`kd_loss`: KL divergence of temperature-softened logits (Hinton et al. 2015,
  arXiv 1503.02531), used by ToP (arXiv 2306.14393 Sec. 3.5) and by SwiftPruner's
  fine-tuning of the searched model.
* :func:`load_teacher_model`: the frozen dense model from a ``BertClassifier`` checkpoint.
* :class:`TeacherPruner`: the base of pruners that distil from that teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pruners.base import Pruner, PrunerConfigError


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


class TeacherPruner(Pruner):
    """Base class of pruners that distil from the frozen dense teacher (ToP, SwiftPruner).

    Subclasses set ``teacher_ckpt`` in ``__init__``; the pipeline may instead hand over
    the checkpoint of the dense phase it just ran through :meth:`load_teacher`.
    """

    teacher: nn.Module | None = None
    teacher_ckpt: str | None = None

    def load_teacher(self, path: str | Path) -> nn.Module:
        """Load the frozen dense teacher from a ``BertClassifier`` checkpoint.

        Raises:
            FileNotFoundError: no file at ``path``.
        """
        self.teacher = load_teacher_model(path)
        self.teacher_ckpt = str(path)
        return self.teacher

    def ensure_teacher(self) -> nn.Module:
        """The teacher, loaded from ``teacher_ckpt`` if not loaded yet.

        Raises:
            PrunerConfigError: no teacher and no ``teacher_ckpt``.
            FileNotFoundError: ``teacher_ckpt`` does not exist.
        """
        if self.teacher is None:
            if self.teacher_ckpt is None:
                raise PrunerConfigError(
                    f"{self.name} needs a teacher: set pruner.teacher_ckpt or let the pipeline fine-tune one."
                )
            self.load_teacher(self.teacher_ckpt)
        return self.teacher
