"""SwiftPruner as a Lightning callback: search per-layer kept heads and FFN neurons under a latency budget, then fine-tune.

SwiftPruner (Zhang et al., CIKM 2022, arXiv 2209.00625; facts in
``../shared/notes/algorithms.md`` section 3) searches a sparsity per layer of BERT with an
evolutionary algorithm whose mutations come from a *reinforced mutator*, rewarded by a
latency-aware reward, with latency predicted by a lookup table. No code is public; this
package implements the project's specification:

* units that really lower CPU latency: attention heads and FFN neurons per layer (masks
  while training, physically removed for timing and serving, :mod:`modules.nn.structured`);
* a candidate = per layer, the number of heads and of FFN neurons kept, from
  ``head_choices`` and ``ffn_fractions``; it keeps the layer's most important units
  (``pruner.importance``, :mod:`.importance`);
* latency predicted by a per-layer lookup table measured on this machine and checked by
  timing every evaluated candidate's shrunk model against the dense model
  (``pruner.latency``, :mod:`.latency`);
* quality from a fast proxy (``pruner.proxy``, :mod:`.proxy`);
* the MnasNet reward and evolution with the reinforced or the random mutator
  (``pruner.search``, :mod:`.search`, :mod:`.evolution`, :mod:`.mutators`);
* the best candidate within the budget is fine-tuned with task loss + distillation
  (:class:`~.finetune.MaskedDistillation`), and so is the best uniform configuration within
  the same budget (the baseline, :meth:`SwiftPruner.baselines`).

The search runs in ``on_fit_start`` of the fine-tuning fit (the module holds the dense
fine-tuned weights then); its result and the evolution's state are saved in checkpoints,
and a resumed fit does not search again.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch

from modules.core.files import atomic_path
from modules.lit.distributed import broadcast, is_global_zero, on_rank_zero
from modules.nn.structured import UnitImportance, top_unit_masks
from pruners.base import PrunerConfigError, check_positive_int, check_range
from pruners.swiftpruner.evolution import EvolutionarySearch, SearchSpace
from pruners.swiftpruner.finetune import MaskedDistillation
from pruners.swiftpruner.importance import Importance
from pruners.swiftpruner.latency import LatencyMeter
from pruners.swiftpruner.plot import plot_pareto
from pruners.swiftpruner.proxy import Proxy
from pruners.swiftpruner.search import Search, run_search

log = logging.getLogger(__name__)

#: default kept fractions of a layer's FFN neurons
FFN_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
#: file role -> name of the files :meth:`SwiftPruner.write_files` writes
#: the search state, saved after every generation in the fit's checkpoint folder
SEARCH_STATE_FILE = "search_state.pt"
FILES = {"history": "search_history.json", "latency_table": "latency_table.json", "pareto_plot": "search_pareto.png"}
#: result keys left out of :meth:`SwiftPruner.results` (the per-candidate records and tensors go to the files)
DETAIL_KEYS = ("importance", "lut", "candidates", "uniform_candidates")


class SwiftPruner(MaskedDistillation):
    """SwiftPruner (arXiv 2209.00625): search at fit start, then fine-tune the chosen model (see the module docstring).

    Protocol: :meth:`teacher_plan` / :meth:`set_teacher` (the dense teacher), :meth:`fit_plan`
    (``finetune_epochs`` at ``model_lr``, checkpoint by ``val/accuracy``), :meth:`baselines`
    (``uniform``), :meth:`results` (the search summary), :meth:`write_files` (history, lookup
    table, Pareto plot).

    Args:
        latency: the budget and the timing (``pruner.latency``); None: :class:`LatencyMeter` defaults.
        proxy: the candidates' quality score (``pruner.proxy``); None: :class:`Proxy` defaults.
        importance: which units a candidate keeps (``pruner.importance``); None: :class:`Importance` defaults.
        search: the evolution (``pruner.search``); None: :class:`Search` defaults.
        head_choices: kept-head counts a layer may take; None = 0, 2, 4, ..., heads per layer.
        ffn_fractions: kept fractions of a layer's FFN neurons a layer may take, each in [0, 1]
            (rounded to whole neurons).
        Other arguments: see :class:`~pruners.swiftpruner.finetune.MaskedDistillation`.

    Raises:
        PrunerConfigError: a setting out of range (at construction; the message names it), or a
            budget below the smallest achievable latency (at search time; the message gives it).
    """

    name = "swiftpruner"
    config_name = "swiftpruner"
    components = {"latency": LatencyMeter, "proxy": Proxy, "importance": Importance, "search": Search}
    method = "swiftpruner"

    def __init__(
        self,
        latency: LatencyMeter | None = None,
        proxy: Proxy | None = None,
        importance: Importance | None = None,
        search: Search | None = None,
        head_choices: list[int] | None = None,
        ffn_fractions: list[float] = FFN_FRACTIONS,  # type: ignore[assignment]  (a tuple: immutable default)
        teacher_ckpt: str | None = None,
        teacher_epochs: int = 3,
        finetune_epochs: int = 1,
        kd_weight: float = 1.0,
        task_weight: float = 1.0,
        kd_temperature: float = 2.0,
        model_lr: float | None = 5e-5,
        name: str = "swiftpruner",
    ):
        super().__init__(teacher_ckpt=teacher_ckpt, teacher_epochs=teacher_epochs, finetune_epochs=finetune_epochs,
                         kd_weight=kd_weight, task_weight=task_weight, kd_temperature=kd_temperature, model_lr=model_lr,
                         name=name)
        self.latency = latency if latency is not None else LatencyMeter()
        self.proxy = proxy if proxy is not None else Proxy()
        self.importance = importance if importance is not None else Importance()
        self.search = search if search is not None else Search()
        if head_choices is not None:
            head_choices = sorted({check_positive_int("pruner.head_choices[...]", h, minimum=0) for h in head_choices})
            if not head_choices:
                raise PrunerConfigError("pruner.head_choices is empty; give kept-head counts, e.g. [0, 4, 8, 12].")
        self.head_choices = head_choices
        self.ffn_fractions = sorted({check_range("pruner.ffn_fractions[...]", f, 0.0, 1.0, high_open=False) for f in ffn_fractions})
        if not self.ffn_fractions:
            raise PrunerConfigError("pruner.ffn_fractions is empty; give kept fractions, e.g. [0, 0.25, 0.5, 1].")
        #: everything the search found (None until it ran); saved in checkpoints
        self.result: dict[str, Any] | None = None
        #: the finished evolution (None until the search ran here)
        self.evolution: EvolutionarySearch | None = None
        #: the evolution's state restored from a checkpoint (kept so that a later save keeps it)
        self._evolution_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the search
    def space(self, model) -> SearchSpace:
        """The search space of ``model`` (a full-size prunable BERT).

        Raises:
            PrunerConfigError: a head choice above the model's heads per layer.
        """
        heads, neurons = model.layer_structure()[0]
        head_choices = self.head_choices if self.head_choices is not None else list(range(0, heads + 1, 2))
        if head_choices[-1] > heads:
            raise PrunerConfigError(f"pruner.head_choices={head_choices}: a layer has only {heads} heads.")
        neuron_choices = sorted({round(f * neurons) for f in self.ffn_fractions})
        return SearchSpace(len(model.layer_structure()), tuple(head_choices), tuple(neuron_choices))

    def run_search(self, model, datamodule, state_file: Path | None = None, timing_model=None) -> dict[str, Any]:
        """Search on the dense fine-tuned ``model`` (not modified) and keep the chosen masks (:func:`.search.run_search`).

        With ``state_file``, the search saves its state there after every generation (atomically:
        temp file, fsync, rename; rank 0 writes) and, when the file exists, continues from it (a
        killed search resumes; rank 0 reads it and shares it). Under several ranks every rank calls
        this; ``timing_model`` (default ``model``) is the copy rank 0 times.
        """
        state, save = None, None
        if state_file is not None:
            state_file = Path(state_file)

            def load() -> dict[str, Any] | None:
                if not state_file.is_file():
                    return None
                loaded = torch.load(state_file, map_location="cpu", weights_only=True)
                log.info("SwiftPruner: continuing the search from %s (generation %d)", state_file,
                         loaded["evolution"]["completed_generations"])
                return loaded

            state = on_rank_zero(load)

            def save(search_state: dict[str, Any]) -> None:
                """Write the search state atomically next to the phase's checkpoints."""
                with atomic_path(state_file, fsync=True) as tmp:
                    torch.save(search_state, tmp)

        self.result, self.evolution = run_search(model, datamodule, self.space(model), self.importance, self.proxy,
                                                 self.latency, self.search, state=state,
                                                 save=save if is_global_zero() else None, timing_model=timing_model)
        self.head_masks, self.neuron_masks = self.masks_of(self.result["chosen"]["genes"])
        return self.result

    def masks_of(self, genes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, A) head and (L, I) neuron masks of a candidate's genes (after the search).

        Raises:
            RuntimeError: the search has not run.
        """
        if self.result is None:
            raise RuntimeError("SwiftPruner.masks_of needs the search's importance; run the search first.")
        r = self.result
        space = SearchSpace(len(r["importance"]["heads"]), tuple(r["head_choices"]), tuple(r["neuron_choices"]))
        return top_unit_masks(UnitImportance(r["importance"]["heads"], r["importance"]["neurons"]), *space.decode(genes))

    # ------------------------------------------------------------------ protocol
    def check(self, pl_module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        """A BERT classifier whose heads and length fit the settings, and data enough for the subsets.

        Raises:
            PrunerConfigError: another model, a head choice or ``pruner.latency.seq_len`` beyond the
                model, fewer than 2 validation examples or an empty importance split.
        """
        super().check(pl_module, datamodule)
        space = self.space(pl_module.model)
        self.latency.check(pl_module.model)
        self.latency.check_budget(pl_module.model, space)
        if self.latency.table is not None:  # a given lookup table must exist and fit this search
            self.latency.load_table(space)
        self.proxy.check(datamodule)
        self.importance.check(datamodule)

    def baselines(self) -> dict[str, MaskedDistillation]:
        """``{"uniform": the best uniform masks' fine-tuning}`` (same teacher and settings), or ``{}``
        when the search has not run or no uniform configuration is within the budget."""
        if self.result is None or self.result["uniform"] is None:
            return {}
        uniform = MaskedDistillation(
            *self.masks_of(self.result["uniform"]["genes"]), teacher_ckpt=self.teacher_ckpt,
            teacher_epochs=self.teacher_epochs, finetune_epochs=self.finetune_epochs, kd_weight=self.kd_weight,
            task_weight=self.task_weight, kd_temperature=self.kd_temperature, model_lr=self.model_lr,
            info={"search": self.result["uniform"]}, name="uniform",
        )
        uniform.teacher = self.teacher
        return {"uniform": uniform}

    def results(self) -> dict[str, Any]:
        """``method``, the kept units per layer and the search's figures (no per-candidate records,
        no importance tensors; the table's calibrated rows only)."""
        out = super().results()
        if self.result is None:
            return out
        out.update({k: v for k, v in self.result.items() if k not in DETAIL_KEYS})
        out["lut"] = {k: self.result["lut"][k] for k in ("attention_ms", "ffn_ms", "fixed_ms", "head_choices", "neuron_choices")}
        return out

    def served_figures(self, served, dense) -> dict[str, Any]:
        """The final served model's latency against the search's budget, at the budget's shape and runtime
        (:meth:`LatencyMeter.served_budget`); in a composite, the model after every stage. ``{}`` before the search."""
        if self.result is None:
            return {}
        return {"final_model_latency": self.latency.served_budget(served, dense, self.result["budget_ms"])}

    def write_files(self, out_dir: Path) -> dict[str, str]:
        """Write ``search_history.json`` (every evaluated candidate and uniform configuration, the
        picks), ``latency_table.json`` (reusable as ``pruner.latency.table``) and ``search_pareto.png``.

        Returns:
            ``{"history", "latency_table", "pareto_plot"}`` -> file name in ``out_dir``; ``{}``
            before the search.
        """
        if self.result is None:
            return {}
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        keys = ("budget_ms", "search_budget_ms", "candidates", "uniform_candidates", "chosen", "uniform")
        (out_dir / FILES["history"]).write_text(json.dumps({k: self.result[k] for k in keys}, indent=1))
        (out_dir / FILES["latency_table"]).write_text(json.dumps(self.result["lut"], indent=1))
        plot_pareto(self.result, out_dir / FILES["pareto_plot"])
        return dict(FILES)

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Search (unless restored from a checkpoint), log the history table, apply the chosen masks.

        The search runs on the module's model (importance and proxy on its device) and times
        candidates on the host (a CPU copy when the module is on a GPU), as the pipeline times the
        served models. Under several ranks every rank searches in lockstep: each scores its share of
        the importance and proxy batches and the results are gathered, while rank 0 alone times
        (its latency timings are then uncontended by the others' work) and shares its figures
        (:func:`.search.run_search`), so every rank ends with the same population, policy, choice
        and masks; rank 0's result (its wall-clock seconds) is then broadcast. The search
        checkpoints itself after every generation into the fit's checkpoint folder
        (``search_state.pt``) and continues from that file when it exists (a resumed run).
        """
        super().on_fit_start(trainer, pl_module)  # the teacher to the module's device
        if self.result is None:
            datamodule = trainer.datamodule
            if datamodule is None or not getattr(datamodule, "datasets", None):
                raise RuntimeError("SwiftPruner searches on the fit's datamodule; call trainer.fit(module, datamodule=...).")
            model = pl_module.model
            # Timed on the host, like every latency figure of the run (the served models are timed there too).
            host = model if pl_module.device.type == "cpu" or not is_global_zero() else copy.deepcopy(model).cpu()
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)
            self.run_search(model, datamodule, Path(folder) / SEARCH_STATE_FILE if folder else None, timing_model=host)
            self.result = broadcast(self.result)
            self.log_history_table(trainer)
        self.apply_masks(pl_module)

    def history_table(self) -> tuple[list[str], list[list[Any]]]:
        """(columns, rows) of every evaluated candidate, for a W&B table."""
        columns = ["evaluation", "generation", "heads", "ffn_neurons", "quality", "predicted_ms", "measured_ms", "reward", "feasible"]
        if self.result is None:
            return columns, []
        budget = self.result["search_budget_ms"]
        rows = [[r["evaluation"], r["generation"], str(r["heads"]), str(r["ffn_neurons"]), r["quality"], r["predicted_ms"],
                 r["measured_ms"], r["reward"], r["measured_ms"] <= budget] for r in self.result["candidates"]]
        return columns, rows

    def log_history_table(self, trainer: L.Trainer) -> None:
        """Log the search history as a W&B table ``search/history`` (when a W&B logger is attached)."""
        from lightning.pytorch.loggers import WandbLogger

        columns, rows = self.history_table()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="search/history", columns=columns, data=rows)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks, the search result and the evolution's state (population, policy, history, generator)."""
        state = super().state_dict()
        state["result"] = self.result
        state["evolution"] = self.evolution.state_dict() if self.evolution is not None else self._evolution_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; a restored pruner does not search again."""
        super().load_state_dict(state_dict)
        self.result = state_dict.get("result")
        self._evolution_state = state_dict.get("evolution")
