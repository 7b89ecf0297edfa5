"""Layer dropping: keep the lowest k encoder layers of the fine-tuned BERT and fine-tune them with distillation.

The simplest structured baseline users try first (Sajjad et al., "On the effect of dropping
layers of pre-trained transformer models", arXiv 2004.03844, Sec. 3: top-layer dropping;
``../shared/notes/algorithms.md`` section 4). The layers above the lowest ``k`` are removed
from the module's model at the start of the fit (:func:`modules.nn.structured.keep_lowest_layers`),
so the model trained, checkpointed (the module records the layers present), served and
exported really has ``k`` layers. The fine-tuning is SwiftPruner's
(:class:`~pruners.swiftpruner.finetune.MaskedDistillation`: task loss + logits distillation from
the frozen dense teacher, checkpoint by ``val/accuracy``), so the two compare on equal terms.

``k`` is set directly (``pruner.layers``) or chosen for a latency budget: the largest ``k``
whose model, timed as SwiftPruner times candidates (``pruner.latency``: against the dense
model, at the budget's shape, in its runtime), is within ``budget x (1 - margin)``. The
choice is written to the phase's checkpoint folder (``layerdrop_choice.json``) and read back
by a resumed fit, so every restart keeps the same ``k``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from modules.core.files import write_json
from modules.lit.distributed import on_rank_zero
from modules.nn.structured import keep_lowest_layers
from pruners.base import PrunerConfigError, check_positive_int
from pruners.swiftpruner.finetune import MaskedDistillation
from pruners.swiftpruner.latency import LatencyMeter

#: the chosen layer count and its timings, in the fit's checkpoint folder
CHOICE_FILE = "layerdrop_choice.json"


class LayerDrop(MaskedDistillation):
    """Keep the lowest ``layers`` encoder layers (or as many as the latency budget allows), fine-tune with distillation.

    Protocol: as :class:`~pruners.swiftpruner.finetune.MaskedDistillation` (teacher, fit plan),
    plus :meth:`results` (layers kept and how they were chosen) and :meth:`served_figures`
    (the final served model against the budget, when one chose ``k``).

    Args:
        layers: encoder layers to keep, from the bottom; None chooses them for ``latency``'s budget.
        latency: the budget and how models are timed (``pruner.latency``, SwiftPruner's
            :class:`~pruners.swiftpruner.latency.LatencyMeter`); used when ``layers`` is None.
        Other arguments: see :class:`~pruners.swiftpruner.finetune.MaskedDistillation`.

    Raises:
        PrunerConfigError: ``layers`` below 1 (at construction) or above the model's layers
            (:meth:`check`), or a budget no layer count meets (at the fit's start; the message
            gives the one-layer model's latency).
    """

    name = "layerdrop"
    config_name = "layerdrop"
    components = {"latency": LatencyMeter}
    decisions = frozenset({"layers"})
    method = "layerdrop"

    def __init__(
        self,
        layers: int | None = None,
        latency: LatencyMeter | None = None,
        teacher_ckpt: str | None = None,
        teacher_epochs: int = 3,
        finetune_epochs: int = 1,
        kd_weight: float = 1.0,
        task_weight: float = 1.0,
        kd_temperature: float = 2.0,
        model_lr: float | None = 5e-5,
        name: str = "layerdrop",
    ):
        super().__init__(teacher_ckpt=teacher_ckpt, teacher_epochs=teacher_epochs, finetune_epochs=finetune_epochs,
                         kd_weight=kd_weight, task_weight=task_weight, kd_temperature=kd_temperature, model_lr=model_lr,
                         name=name)
        self.layers = None if layers is None else check_positive_int("pruner.layers", layers)
        self.latency = latency if latency is not None else LatencyMeter()
        #: the chosen k and, when timed, the timings (None until the fit starts)
        self.choice: dict[str, Any] | None = None

    def check(self, pl_module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        """A BERT classifier with at least ``layers`` encoder layers.

        Raises:
            PrunerConfigError: another model, or ``layers`` above the model's layer count.
        """
        super().check(pl_module, datamodule)
        total = len(pl_module.model.bert.encoder.layer)
        if self.layers is not None and self.layers > total:
            raise PrunerConfigError(f"pruner.layers={self.layers}: the model has {total} encoder layers; keep 1 to {total}.")
        if self.layers is None:
            self.latency.check(pl_module.model)

    def choose(self, model: torch.nn.Module) -> dict[str, Any]:
        """The layer count to keep: ``layers``, or the largest k whose model is within the search budget.

        Args:
            model: the fine-tuned dense model (not modified; copies are timed on the host).

        Returns:
            ``layers_kept``, ``layers_total`` and, when timed, ``budget_ms``, ``search_budget_ms``,
            ``dense_ms`` and ``timed_ms`` (k -> ms, relative to the dense model's first timing).

        Raises:
            PrunerConfigError: even one layer is over the search budget.
        """
        total = len(model.bert.encoder.layer)
        if self.layers is not None:
            return {"layers_kept": self.layers, "layers_total": total, "chosen_by": "pruner.layers"}
        host = copy.deepcopy(model).cpu().eval()
        reference = self.latency.reference(host)
        budget = self.latency.budget_ms if self.latency.budget_ms is not None else self.latency.budget_fraction * reference.dense_ms
        search_budget = budget * (1.0 - self.latency.margin)
        timed: dict[str, float] = {}
        for k in range(total, 0, -1):
            candidate = copy.deepcopy(host)
            keep_lowest_layers(candidate, k)
            timed[str(k)] = reference(candidate)
            if timed[str(k)] <= search_budget:
                return {"layers_kept": k, "layers_total": total, "chosen_by": self.latency.budget_source(),
                        "budget_ms": budget, "search_budget_ms": search_budget, "dense_ms": reference.dense_ms, "timed_ms": timed}
        raise PrunerConfigError(
            f"The latency budget {budget:.3f} ms ({self.latency.budget_source()}) less its margin is below the one-layer "
            f"model's {timed['1']:.3f} ms; raise the budget or set pruner.layers."
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Choose k (or read the choice a killed fit wrote) and drop the layers above it, before the optimizer is built.

        Rank 0 times; every rank gets its choice. A resumed fit's checkpoint then loads into the
        k-layer model.
        """
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        path = Path(folder) / CHOICE_FILE if folder else None
        if self.choice is None and path is not None and path.is_file():
            self.choice = json.loads(path.read_text())
        if self.choice is None and len(pl_module.model.bert.encoder.layer) < pl_module.model.config.num_hidden_layers:
            return  # a finished phase restored: the k-layer model and this pruner's state come from its checkpoint
        if self.choice is None:

            def decide() -> dict[str, Any]:
                choice = self.choose(pl_module.model)
                if path is not None:
                    write_json(path, choice, indent=1)
                return choice

            self.choice = on_rank_zero(decide)
        keep_lowest_layers(pl_module.model, int(self.choice["layers_kept"]))

    def results(self) -> dict[str, Any]:
        """``method``, ``layers_kept``, ``layers_total``, how k was chosen (and the timings)."""
        return {"method": "layerdrop (keep the lowest k encoder layers, arXiv 2004.03844)", **(self.choice or {})}

    def served_figures(self, served, dense) -> dict[str, Any]:
        """The final served model's latency against the budget k was chosen for (``{}`` when ``layers`` was set)."""
        if not self.choice or "budget_ms" not in self.choice:
            return {}
        return {"final_model_latency": self.latency.served_budget(served, dense, self.choice["budget_ms"])}

    def state_dict(self) -> dict[str, Any]:
        """The distillation's state and the choice (plain values)."""
        return {**super().state_dict(), "choice": self.choice}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        super().load_state_dict(state_dict)
        self.choice = state_dict.get("choice") or self.choice
