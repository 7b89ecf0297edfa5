"""A composite pruner: a sequence of pruners (stages) run as phases, the model holding every stage's decisions.

Structured pruning (SwiftPruner: heads and FFN neurons, arXiv 2209.00625) makes every token
cheaper; token pruning (ToP, arXiv 2306.14393) makes the upper layers see fewer tokens; the
MACs savings multiply (``../shared/notes/algorithms.md`` section 4). A composite is placed by
Hydra's defaults list, each stage being a pruner's own config::

    # conf/pruner/swiftpruner_top.yaml
    defaults:
      - base_composite
      - swiftpruner@stages.structure
      - top@stages.tokens
      - _self_

and every stage setting is overridable as usual (``pruner.stages.tokens.target_sparsity=0.4``).

Semantics (what :class:`CompositePruner` promises, tested in ``tests/test_composite.py``):

* **one dense teacher**: the run fine-tunes (or loads, or takes from the teacher cache) one
  dense model; the composite's ``teacher_ckpt`` / ``teacher_epochs`` are the stages' (the
  YAML interpolates them into every stage; a stage set otherwise is refused);
* **stages in order, as phases**: stage ``s`` is the phase ``s`` (``checkpoints/<s>/``, its
  own completion record, so a killed run resumes inside any stage); the first starts from
  the dense checkpoint, each later one from the checkpoint the previous stage kept, so it
  starts from the previous stage's model with its decisions (masks, token gates, layers);
* **each stage distils from the dense teacher** (not from the previous stage's model): the
  teacher is the best model available, and a stage's own targets (SwiftPruner's budget, ToP's
  MACs sparsity) are defined against the dense model;
* **the served model carries every stage's decisions**: the module builds it as for any
  pruner (``served_model()``: masked heads and neurons removed, layers dropped, tokens
  gathered out in-graph), so export, parity and predict need nothing new;
* **targets**: each stage keeps its own; ToP's ``target_sparsity`` counts the MACs its
  tokens remove at the layer sizes of the unshrunk model (as ToP alone does; masked units
  still count while training), so the combined model's MACs sparsity is larger; a latency
  budget (SwiftPruner's) is checked once more on the *final* served model
  (:meth:`served_figures`: that model's latency at the budget's shape, in the budget's runtime).

Stages that cannot compose are refused when the composite is built, before any data is
read, with one line naming both: stages for different models (``d2s`` prunes DLRM, ``top``
BERT), two stages deciding the same thing (two token pruners), or a structure stage
(heads, neurons, layers) after a token stage (token gates are placed on the structure
they prune). A composite runs the stages' own baselines not at all (run a stage's pruner
alone for them, e.g. SwiftPruner's uniform model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from pruners.base import Pruner, PrunerConfigError, TeacherPlan, check_positive_int

#: decisions that change the model's structure; a composite places them before token decisions
STRUCTURE = frozenset({"heads", "neurons", "layers"})
#: phase names the pipeline uses itself
RESERVED = ("dense", "pruned")


class CompositePruner(Pruner):
    """A sequence of pruners run as phases, each from the previous one's model (see the module docstring).

    Protocol: :meth:`phases` (one per stage, named after it), :meth:`teacher_plan` /
    :meth:`set_teacher` (the one dense teacher, handed to every distilling stage),
    :meth:`check` (every stage's), :meth:`results` (a section per stage),
    :meth:`write_files` (each stage's files under ``<stage>/``), :meth:`served_figures`
    (each stage's, on the final served model). The composite holds no state of its own:
    each stage is the callback of its phase and checkpoints its own.

    Args:
        stages: stage name -> pruner, in the order they run (the defaults list's order).
        teacher_ckpt: the dense teacher's checkpoint for every stage (None: the run fits one).
        teacher_epochs: most epochs of that dense fit.
        name: metric and result name.

    Raises:
        PrunerConfigError: no stage, a stage that is not a pruner, a reserved stage name, stages
            that cannot compose (the message names both), or a stage whose teacher differs.
    """

    name = "composite"
    config_name = "composite"

    def __init__(
        self,
        stages: dict[str, Any] | None = None,
        teacher_ckpt: str | None = None,
        teacher_epochs: int = 3,
        name: str = "composite",
    ):
        super().__init__()
        self.name = name
        self.teacher_ckpt = teacher_ckpt
        self.teacher_epochs = check_positive_int("pruner.teacher_epochs", teacher_epochs)
        self.stages: dict[str, Pruner] = dict((stages or {}).items())
        if not self.stages:
            raise PrunerConfigError(f"pruner={name} has no stage; place pruners as stages, e.g. `- top@stages.tokens`.")
        for key, stage in self.stages.items():
            if not isinstance(stage, Pruner):
                raise PrunerConfigError(f"pruner.stages.{key} is not a pruner config (it has no pruner _target_).")
            if key in RESERVED:
                raise PrunerConfigError(f"pruner.stages.{key}: the stage names {list(RESERVED)} are the run's own phases; rename it.")
        self._check_composable()
        self._check_teachers()
        self.prunes_model = next((s.prunes_model for s in self.stages.values() if s.prunes_model), None)
        self.decisions = frozenset().union(*(s.decisions for s in self.stages.values()))

    def _label(self, key: str) -> str:
        return f"pruner.stages.{key} ({self.stages[key].name})"

    def _check_composable(self) -> None:
        """Refuse stage pairs for different models, deciding the same kind, or structure after tokens."""
        keys = list(self.stages)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                sa, sb = self.stages[a], self.stages[b]
                if sa.prunes_model and sb.prunes_model and sa.prunes_model != sb.prunes_model:
                    raise PrunerConfigError(
                        f"{self._label(a)} and {self._label(b)} cannot compose: {sa.name} prunes model={sa.prunes_model}, "
                        f"{sb.name} prunes model={sb.prunes_model}; compose pruners of one model."
                    )
                shared = sorted(sa.decisions & sb.decisions)
                if shared:
                    raise PrunerConfigError(
                        f"{self._label(a)} and {self._label(b)} cannot compose: both decide the model's {', '.join(shared)}; "
                        "keep one of them."
                    )
                if "tokens" in sa.decisions and sb.decisions & STRUCTURE:
                    raise PrunerConfigError(
                        f"{self._label(a)} and {self._label(b)} cannot compose in this order: the {b} stage changes the "
                        f"structure ({', '.join(sorted(sb.decisions & STRUCTURE))}) the token gates of {a} were placed on; "
                        f"put {b} first."
                    )

    def _check_teachers(self) -> None:
        """Every distilling stage must use the composite's teacher (one dense teacher)."""
        for key, stage in self.stages.items():
            plan = stage.teacher_plan()
            if plan is not None and (plan.checkpoint, plan.epochs) != (self.teacher_ckpt, self.teacher_epochs):
                raise PrunerConfigError(
                    f"{self._label(key)} distils from teacher_ckpt={plan.checkpoint} (teacher_epochs={plan.epochs}), but the "
                    f"composite's one dense teacher is pruner.teacher_ckpt={self.teacher_ckpt} (pruner.teacher_epochs="
                    f"{self.teacher_epochs}); set pruner.teacher_ckpt / pruner.teacher_epochs, not a stage's."
                )

    # ------------------------------------------------------------------ protocol
    def phases(self) -> list[tuple[str, Pruner]]:
        """One phase per stage, named after it, in order (a nested composite's as ``<stage>_<its stage>``)."""
        out: list[tuple[str, Pruner]] = []
        for key, stage in self.stages.items():
            for phase, pruner in stage.phases():
                out.append((key if phase == "pruned" else f"{key}_{phase}", pruner))
        return out

    def check(self, pl_module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        """Every stage's check on the model to prune, the stage named in the message.

        Raises:
            PrunerConfigError: a stage cannot prune this model or data.
        """
        for key, stage in self.stages.items():
            try:
                stage.check(pl_module, datamodule)
            except PrunerConfigError as err:
                raise PrunerConfigError(f"{self._label(key)}: {err}") from None

    def teacher_plan(self) -> TeacherPlan | None:
        """The one dense teacher (``teacher_ckpt`` or a fit of ``teacher_epochs``), or None when no stage distils."""
        plans = [s.teacher_plan() for s in self.stages.values()]
        if all(p is None for p in plans):
            return None
        return TeacherPlan(self.teacher_ckpt, self.teacher_epochs)

    def set_teacher(self, teacher: nn.Module) -> None:
        """Hand the dense teacher to every stage that distils."""
        for stage in self.stages.values():
            if stage.teacher_plan() is not None:
                stage.set_teacher(teacher)

    def results(self) -> dict[str, Any]:
        """``method``, the stage ``order``, each stage's results under ``stages.<name>``, and ``target_met``
        (every stage's)."""
        stages = {key: stage.results() for key, stage in self.stages.items()}
        return {
            "method": "composite: " + " then ".join(f"{k} ({s.name})" for k, s in self.stages.items()),
            "order": list(self.stages),
            "stages": stages,
            "target_met": all(r.get("target_met", True) is not False for r in stages.values()),
        }

    def write_files(self, out_dir: Path) -> dict[str, str]:
        """Each stage's files in ``out_dir/<stage>/``; returns ``<stage>/<role>`` -> path relative to ``out_dir``."""
        files = {}
        for key, stage in self.stages.items():
            for role, path in stage.write_files(Path(out_dir) / key).items():
                files[f"{key}/{role}"] = f"{key}/{path}"
        return files

    def served_figures(self, served: nn.Module, dense: nn.Module) -> dict[str, Any]:
        """Each stage's figures on the *final* served model (e.g. SwiftPruner's budget against the combined model), by stage."""
        out = {}
        for key, stage in self.stages.items():
            figures = stage.served_figures(served, dense)
            if figures:
                out[key] = figures
        return out
