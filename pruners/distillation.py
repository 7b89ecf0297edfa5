"""Knowledge distillation from the frozen dense teacher, shared by the pruners.

* :func:`kd_loss`: KL divergence of temperature-softened logits (Hinton et al. 2015,
  arXiv 1503.02531), used by ToP (arXiv 2306.14393 Sec. 3.5) and by SwiftPruner's
  fine-tuning of the searched model.
* :func:`load_teacher_model`: the frozen dense model from a ``BertClassifier`` checkpoint.
* :class:`TeacherPruner`: the base of pruners that distil from that teacher (its part of
  the pruner protocol: :meth:`~TeacherPruner.teacher_plan`, :meth:`~TeacherPruner.set_teacher`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modules.lit.bert_classifier import BertClassifier
from modules.core.errors import MissingFileError
from pruners.base import Pruner, PrunerConfigError, TeacherPlan


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
        the checkpoint's :class:`~modules.nn.bert.PrunableBertForSequenceClassification`.

    Raises:
        FileNotFoundError: no file at ``path`` (the message says how to fix it).
    """
    check_teacher_checkpoint(path)
    teacher = BertClassifier.load_from_checkpoint(path, map_location="cpu").model
    return freeze(teacher)


def check_teacher_checkpoint(path: str | Path) -> None:
    """Raise FileNotFoundError (saying how to fix it) unless ``path`` is a file."""
    if not Path(path).is_file():
        raise MissingFileError(
            f"pruner.teacher_ckpt={path} does not exist; point it at a checkpoint of a `pruner=none` run "
            "or leave it unset to fine-tune the teacher in this run."
        )


#: BertConfig keys that must agree between the teacher checkpoint and the model to prune
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def check_teacher_matches(path: str | Path, pl_module: BertClassifier) -> None:
    """Check that ``path`` holds a finished *dense* ``BertClassifier`` of ``pl_module``'s architecture.

    A checkpoint of a pruning run (token gates, or a head/FFN mask with a zero) is not a
    dense teacher, nor is one of another size or label count.

    Raises:
        FileNotFoundError: no file at ``path``.
        PrunerConfigError: not a BertClassifier checkpoint, a pruned one, or another architecture (named).
    """
    import torch

    check_teacher_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unreadable file is the same user error)
        raise PrunerConfigError(
            f"pruner.teacher_ckpt={path} is not a readable checkpoint (torch.load: {type(err).__name__}); give the "
            ".ckpt file of a pruner=none run (checkpoints/dense/ of a run dir)."
        ) from None
    hparams = ckpt.get("hyper_parameters") or {}
    theirs, ours = hparams.get("bert_config"), pl_module.hparams.get("bert_config") or {}
    if not isinstance(theirs, dict) or "state_dict" not in ckpt:
        raise PrunerConfigError(f"pruner.teacher_ckpt={path} is not a checkpoint of a BertClassifier (model=bert) run.")
    masks = [k for k, v in ckpt["state_dict"].items() if k.endswith(("head_mask", "neuron_mask")) and bool((v == 0).any())]
    if "encoder_layers" in ckpt:
        masks.append(f"{ckpt['encoder_layers']} encoder layers kept")
    if "token_gates_config" in ckpt or masks:
        raise PrunerConfigError(
            f"pruner.teacher_ckpt={path} is a pruned model ({'token gates' if 'token_gates_config' in ckpt else masks[0]}), "
            "not a dense teacher; give the dense checkpoint of a pruner=none run (or its checkpoints/dense/ file)."
        )
    differ = {k: (theirs.get(k), ours.get(k)) for k in ARCHITECTURE_KEYS if theirs.get(k) != ours.get(k)}
    if hparams.get("num_labels") != pl_module.hparams.get("num_labels"):
        differ["num_labels"] = (hparams.get("num_labels"), pl_module.hparams.get("num_labels"))
    if differ:
        raise PrunerConfigError(
            f"pruner.teacher_ckpt={path} is a model of another architecture than model.pretrained's "
            f"(checkpoint, this run): {differ}; use a teacher trained from the same model and data."
        )


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring grad (in place; returned for chaining)."""
    model.eval()
    model.requires_grad_(False)
    return model


class TeacherPruner(Pruner):
    """Base class of pruners that distil from the frozen dense BERT teacher (ToP, SwiftPruner).

    Protocol: :meth:`teacher_plan` asks the pipeline for the teacher of ``teacher_ckpt`` (or
    for a dense fit of ``teacher_epochs`` when it is None); :meth:`set_teacher` receives it.
    Used outside a pipeline, :meth:`ensure_teacher` loads ``teacher_ckpt`` itself.
    """

    teacher: nn.Module | None = None
    teacher_ckpt: str | None = None
    teacher_epochs: int = 3
    prunes_model = "bert"

    def check(self, pl_module, datamodule) -> None:
        """The model must be a :class:`~modules.lit.bert_classifier.BertClassifier`, and ``teacher_ckpt``, if set,
        a finished dense model of the same architecture (:func:`check_teacher_matches`).

        Raises:
            PrunerConfigError: another model (e.g. ``model=dlrm``), or an unusable teacher checkpoint.
            FileNotFoundError: ``teacher_ckpt`` does not exist.
        """
        if not isinstance(pl_module, BertClassifier):
            raise PrunerConfigError(
                f"pruner={self.name} prunes a BERT classifier (model=bert), not a {type(pl_module).__name__}; "
                "with model=dlrm use pruner=d2s or pruner=none."
            )
        if self.teacher_ckpt is not None:
            check_teacher_matches(self.teacher_ckpt, pl_module)

    def teacher_plan(self) -> TeacherPlan:
        """The checkpoint ``teacher_ckpt``, or a dense fit of ``teacher_epochs`` when it is None.

        Raises:
            FileNotFoundError: ``teacher_ckpt`` is set but is not a file.
        """
        if self.teacher_ckpt is not None:
            check_teacher_checkpoint(self.teacher_ckpt)
        return TeacherPlan(self.teacher_ckpt, self.teacher_epochs)

    def set_teacher(self, teacher: nn.Module) -> None:
        """Keep ``teacher`` (a :class:`~modules.nn.bert.PrunableBertForSequenceClassification`), frozen."""
        self.teacher = freeze(teacher)

    def on_fit_start(self, trainer, pl_module) -> None:
        """Lend the teacher to the module's device for the fit (back on the host in :meth:`on_fit_end`)."""
        if self.teacher is not None:
            self.teacher.to(pl_module.device)

    def on_fit_end(self, trainer, pl_module) -> None:
        """Return the teacher to the host (the pipeline also serves and times it as the dense model there)."""
        if self.teacher is not None:
            self.teacher.to("cpu")

    def ensure_teacher(self) -> nn.Module:
        """The teacher, loaded from ``teacher_ckpt`` if none was set.

        Raises:
            PrunerConfigError: no teacher and no ``teacher_ckpt``.
            FileNotFoundError: ``teacher_ckpt`` does not exist.
        """
        if self.teacher is None:
            if self.teacher_ckpt is None:
                raise PrunerConfigError(
                    f"{self.name} needs a teacher: set pruner.teacher_ckpt or let the pipeline fine-tune one."
                )
            self.teacher = load_teacher_model(self.teacher_ckpt)
        return self.teacher
