"""SwiftPruner's latency component (``pruner.latency``): the budget, direct timing against the dense model, the lookup table.

* The budget: ``budget_ms`` per batch of ``batch_size`` x ``seq_len`` tokens on this
  machine, or ``budget_fraction`` of the dense model's directly measured latency at that
  shape. The search and the picks use the *search budget* ``budget x (1 - margin)``: the
  pick is the best of many candidates each timed on a noisy machine, so it tends to be one
  whose timing came out low, and the margin holds some of the budget back against that.
* Direct timing (:class:`DenseReference`): every timing of a model comes right after a
  timing of the dense model and is reported as ``model ms / dense ms now * dense ms at the
  start``, the model's latency at the machine speed of the search's start; on a machine
  whose speed drifts, the ratio to a model timed moments apart is steadier than the
  absolute time.
* The lookup table (:class:`~pruners.swiftpruner.latency_table.LatencyTable`, per-layer
  block timings fitted through two whole-model anchors), refitted by least squares to
  ``calibration_models`` random whole models timed directly, or loaded from ``table`` (the
  ``latency_table.json`` of an earlier run on this machine).
* Verification: a pick is re-timed ``verify_rounds`` times and accepted when the median is
  within the search budget (timings independent of the one that made it look best).

Every timing is a median over ``repeats`` forwards after ``warmup`` untimed ones
(:func:`~pruners.swiftpruner.latency_table.measure_model_ms`), in milliseconds.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from modules.core.errors import MissingFileError
from modules.served.latency import measure_latency_ms
from modules.served.onnx_export import export_onnx
from modules.served.served_bert import ExportableBert

from pruners.base import PrunerConfigError, check_choice, check_positive_int, check_range
from pruners.swiftpruner.evolution import SearchSpace
from pruners.swiftpruner.latency_table import LAYER_MODES, LatencyTable, measure_model_ms, synthetic_inputs
from serving.runtime import graph_feeds, make_session

log = logging.getLogger(__name__)

#: where whole models are timed (``pruner.latency.runtime``)
RUNTIMES = ("torch", "onnxruntime")
#: untimed calls of an ONNX Runtime session before its timing, at least (its first calls allocate)
ORT_MIN_WARMUP = 3


class DenseReference:
    """Times models against the dense model, at the machine speed of the dense model's first timing.

    Args:
        meter: the :class:`LatencyMeter` whose shape, warmup and repeats every timing uses.
        dense: the dense model (timed once now: :attr:`dense_ms`, and again before every model).
    """

    def __init__(self, meter: "LatencyMeter", dense: nn.Module):
        self.meter, self.dense = meter, dense
        #: the dense model's ms at the start
        self.dense_ms = meter.time(dense)

    @classmethod
    def restored(cls, meter: "LatencyMeter", dense: nn.Module, dense_ms: float) -> "DenseReference":
        """A reference whose first timing (``dense_ms``, ms) comes from a saved search (nothing is timed now)."""
        ref = cls.__new__(cls)
        ref.meter, ref.dense, ref.dense_ms = meter, dense, float(dense_ms)
        return ref

    def __call__(self, model: nn.Module) -> float:
        """``model ms / dense ms now * dense ms at the start`` (ms); pass a physically shrunk model."""
        dense_now = self.meter.time(self.dense)
        return self.meter.time(model) / dense_now * self.dense_ms


class LatencyMeter:
    """The latency budget and how SwiftPruner times candidates (``pruner.latency``; see the module docstring).

    Args:
        budget_ms: latency budget in ms per batch of ``batch_size`` x ``seq_len`` tokens on this
            machine; None uses ``budget_fraction``.
        budget_fraction: the budget as a fraction of the dense model's directly measured
            latency at that shape, in (0, 1]; used when ``budget_ms`` is None.
        margin: fraction of the budget, in [0, 1), held back against timing noise: the search,
            the feasibility of candidates, the verification and the uniform baseline use
            ``budget x (1 - margin)``.
        batch_size, seq_len: the input shape (B, N) the budget refers to (unpadded random tokens).
        warmup, repeats: untimed / timed forwards per timing (the figure is the median).
        verify_rounds: re-timings of the searched and of the uniform pick; their median must be
            within the search budget, else the next candidate by proxy quality is tried; 0
            accepts the single timing of the search.
        calibration_models: random configurations timed directly before the search to refit
            the lookup table's scale and fixed part (:meth:`LatencyTable.refit`); 0 keeps the
            two-anchor fit.
        lut_layers: ``shared`` (time layer 0's blocks, reused for every layer: all layers have
            the same shapes) or ``each``.
        table: path of a ``latency_table.json`` written by an earlier run on this machine (same
            choices and shape) to use instead of measuring; None measures.
        runtime: where whole models are timed: ``torch`` (eager PyTorch) or ``onnxruntime``
            (the model exported to ONNX as a run exports it, :class:`modules.served.served_bert.ExportableBert`,
            in an ONNX Runtime session with the run's thread count), so the budget holds in the
            runtime the model is served with. The dense reference, the lookup table's calibration
            models, every candidate's direct timing and the verification all use it; the table's
            isolated block timings stay in PyTorch and are refitted to those whole-model timings.

    Raises:
        PrunerConfigError: a setting out of range (the message names it as ``pruner.latency.<key>``).
    """

    def __init__(
        self,
        budget_ms: float | None = None,
        budget_fraction: float = 0.5,
        margin: float = 0.03,
        batch_size: int = 1,
        seq_len: int = 64,
        warmup: int = 5,
        repeats: int = 20,
        verify_rounds: int = 5,
        calibration_models: int = 16,
        lut_layers: str = "shared",
        table: str | None = None,
        runtime: str = "onnxruntime",
    ):
        self.budget_ms = None if budget_ms is None else check_range("pruner.latency.budget_ms", budget_ms, 0.0, math.inf, low_open=True)
        self.budget_fraction = check_range("pruner.latency.budget_fraction", budget_fraction, 0.0, 1.0, low_open=True, high_open=False)
        self.margin = check_range("pruner.latency.margin", margin, 0.0, 1.0)
        self.batch_size = check_positive_int("pruner.latency.batch_size", batch_size)
        self.seq_len = check_positive_int("pruner.latency.seq_len", seq_len)
        self.warmup = check_positive_int("pruner.latency.warmup", warmup, minimum=0)
        self.repeats = check_positive_int("pruner.latency.repeats", repeats)
        self.verify_rounds = check_positive_int("pruner.latency.verify_rounds", verify_rounds, minimum=0)
        self.calibration_models = check_positive_int("pruner.latency.calibration_models", calibration_models, minimum=0)
        self.lut_layers = check_choice("pruner.latency.lut_layers", lut_layers, LAYER_MODES)
        self.table = None if table is None else str(table)
        self.runtime = check_choice("pruner.latency.runtime", runtime, RUNTIMES)
        # ORT sessions of the last few shapes timed, by the model's per-layer (heads, FFN neurons): latency
        # depends on the shapes only, so a shape timed again (the dense model before every candidate, a
        # pick's verification rounds) is not exported again
        self._sessions: dict[tuple[tuple[int, int], ...], object] = {}

    def check(self, model: nn.Module) -> None:
        """Raise :class:`PrunerConfigError` if ``seq_len`` exceeds what ``model`` (a prunable BERT) takes."""
        max_len = model.config.max_position_embeddings
        if self.seq_len > max_len:
            raise PrunerConfigError(f"pruner.latency.seq_len={self.seq_len} is out of range; the model takes at most {max_len} tokens.")

    def check_budget(self, model: nn.Module, space: SearchSpace) -> None:
        """Refuse, before any training, a ``budget_ms`` below the smallest candidate's latency measured now.

        The smallest candidate keeps the fewest heads and FFN neurons of ``space`` in every layer;
        its latency does not depend on the weights, so the untrained ``model`` (a full-size
        prunable BERT, not modified) shows it. The search checks again on its lookup table
        (:meth:`budgets`). A ``budget_fraction`` (a fraction of the dense latency) is checked there only.

        Raises:
            PrunerConfigError: the budget less its margin is below that latency (the message gives the budget to set).
        """
        if self.budget_ms is None:
            return
        from modules.nn.structured import shrink_structured

        heads, neurons = model.layer_structure()[0]
        head_mask, neuron_mask = torch.zeros(space.num_layers, heads), torch.zeros(space.num_layers, neurons)
        head_mask[:, : space.head_choices[0]] = 1.0
        neuron_mask[:, : space.neuron_choices[0]] = 1.0
        work = copy.deepcopy(model).eval()
        work.set_structured_masks(head_mask, neuron_mask)
        smallest = self.time(shrink_structured(work))
        if self.budget_ms * (1.0 - self.margin) < smallest:
            raise PrunerConfigError(
                f"The latency budget {self.budget_ms} ms (pruner.latency.budget_ms) less its margin pruner.latency.margin="
                f"{self.margin} is below the latency of the smallest candidate ({space.head_choices[0]} heads and "
                f"{space.neuron_choices[0]} FFN neurons in every layer), {smallest:.3f} ms at batch {self.batch_size} x "
                f"{self.seq_len} tokens on this machine. Set pruner.latency.budget_ms to at least "
                f"{smallest / (1.0 - self.margin):.3f}, or use pruner.latency.budget_fraction."
            )

    # ------------------------------------------------------------------ timing
    def time(self, model: nn.Module) -> float:
        """Median ms of one forward of ``model`` at the budget's shape (absolute, no reference), in :attr:`runtime`."""
        if self.runtime == "torch":
            return measure_model_ms(model, self.batch_size, self.seq_len, warmup=self.warmup, repeats=self.repeats)
        session = self._session(model)
        inputs = synthetic_inputs(self.batch_size, self.seq_len, model.config.vocab_size)
        feeds = graph_feeds(session, {k: v.numpy() for k, v in inputs.items()})
        # a new session's first calls allocate and plan: never time them
        warmup = max(self.warmup, ORT_MIN_WARMUP)
        return measure_latency_ms({"model": lambda: session.run(None, feeds)}, warmup=warmup, repeats=self.repeats)["model"]

    def _session(self, model: nn.Module):
        """An ONNX Runtime session of ``model`` exported as served, or of an earlier model of the same per-layer
        shapes (the last few are kept, most recently used last)."""
        shape = tuple(model.layer_structure())
        session = self._sessions.pop(shape, None)
        if session is not None:
            self._sessions[shape] = session
            return session
        exportable = ExportableBert(copy.deepcopy(model).cpu().eval())
        example = synthetic_inputs(2, self.seq_len, model.config.vocab_size)
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(exportable, exportable.feeds(example), Path(tmp) / "model.onnx", exportable.dynamic_axes(), ["logits"])
            session = make_session(path, torch.get_num_threads())
        if len(self._sessions) >= 3:
            self._sessions.pop(next(iter(self._sessions)))
        self._sessions[shape] = session
        return session

    def time_served(self, served: nn.Module) -> float:
        """Median ms of one forward of a *served* LightningModule (``served_model()``: heads, neurons and layers
        removed, token gates in-graph) at the budget's shape, in :attr:`runtime`; in ONNX Runtime the model is
        exported as a run exports it (``served.exportable()``), token selection included."""
        inputs = synthetic_inputs(self.batch_size, self.seq_len, served.model.config.vocab_size)
        if self.runtime == "torch":
            with torch.no_grad():
                return measure_latency_ms({"model": lambda: served(inputs)}, warmup=self.warmup, repeats=self.repeats)["model"]
        exportable = served.exportable()
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(exportable, exportable.feeds(inputs), Path(tmp) / "model.onnx", exportable.dynamic_axes(), ["logits"])
            session = make_session(path, torch.get_num_threads())
        feeds = graph_feeds(session, {k: v.numpy() for k, v in exportable.feeds(inputs).items()})
        warmup = max(self.warmup, ORT_MIN_WARMUP)
        return measure_latency_ms({"model": lambda: session.run(None, feeds)}, warmup=warmup, repeats=self.repeats)["model"]

    def served_budget(self, served: nn.Module, dense: nn.Module, budget_ms: float | None) -> dict[str, float | bool | str]:
        """The final served model's latency against the budget: both models timed by :meth:`time_served`
        alternately, ``max(verify_rounds, 1)`` times, medians.

        Args:
            served, dense: served LightningModules (the pruned and the dense model).
            budget_ms: the budget in ms (the search's, at its start); None: ``budget_fraction`` of the dense
                model measured now.

        Returns:
            ``runtime``, ``shape`` ("B x N"), ``budget_ms``, ``dense_ms``, ``served_ms``,
            ``fraction_of_dense`` (served / dense), ``within_budget`` (served ms <= budget ms).
        """
        rounds = [(self.time_served(dense), self.time_served(served)) for _ in range(max(self.verify_rounds, 1))]
        dense_ms = statistics.median(d for d, _ in rounds)
        served_ms = statistics.median(m for _, m in rounds)
        budget = float(budget_ms) if budget_ms is not None else self.budget_fraction * dense_ms
        return {"runtime": self.runtime, "shape": f"{self.batch_size} x {self.seq_len}", "budget_ms": budget,
                "dense_ms": dense_ms, "served_ms": served_ms, "fraction_of_dense": served_ms / dense_ms,
                "within_budget": served_ms <= budget}

    def reference(self, dense: nn.Module) -> DenseReference:
        """A :class:`DenseReference` timer against ``dense`` (timed once now)."""
        return DenseReference(self, dense)

    def verify(self, time_once: Callable[[], float]) -> tuple[list[float], float] | None:
        """``verify_rounds`` timings by ``time_once`` (ms) and their median; None when ``verify_rounds`` is 0."""
        if not self.verify_rounds:
            return None
        rounds = [time_once() for _ in range(self.verify_rounds)]
        return rounds, statistics.median(rounds)

    # ------------------------------------------------------------------ budget
    def budget_source(self) -> str:
        """Where the budget comes from, for the results (``pruner.latency.budget_ms`` or ``<fraction> x dense``, and the runtime)."""
        source = "pruner.latency.budget_ms" if self.budget_ms is not None else f"{self.budget_fraction} x dense"
        return f"{source}, timed in {self.runtime}"

    def budgets(self, dense_ms: float, smallest_ms: float, space: SearchSpace) -> tuple[float, float]:
        """(the budget, the search budget ``budget x (1 - margin)``), ms.

        Args:
            dense_ms: the dense model's directly measured ms at the budget's shape.
            smallest_ms: the smallest achievable predicted ms (every layer at its smallest choices).
            space: the search space (named in the error).

        Raises:
            PrunerConfigError: the search budget is below ``smallest_ms`` (the message gives the
                budget to set).
        """
        requested = self.budget_ms if self.budget_ms is not None else self.budget_fraction * dense_ms
        budget = requested * (1.0 - self.margin)
        if budget < smallest_ms:
            raise PrunerConfigError(
                f"The latency budget {requested:.3f} ms ({self.budget_source()}) less its margin pruner.latency.margin="
                f"{self.margin} ({budget:.3f} ms) is below the smallest achievable latency, {smallest_ms:.3f} ms (every layer "
                f"at {space.head_choices[0]} heads and {space.neuron_choices[0]} FFN neurons; batch {self.batch_size} x "
                f"{self.seq_len} tokens, measured on this machine; the dense model takes {dense_ms:.3f} ms). Set "
                f"pruner.latency.budget_ms (or pruner.latency.budget_fraction) to at least "
                f"{smallest_ms / (1.0 - self.margin):.3f} ms, or lower pruner.latency.margin."
            )
        return requested, budget

    # ------------------------------------------------------------------ lookup table
    def lookup_table(
        self, model: nn.Module, space: SearchSpace, time_genes: Callable[[tuple[int, ...]], float], seed: int
    ) -> tuple[LatencyTable, LatencyTable]:
        """(the table the search predicts with, its two-anchor fit before the refit).

        With ``table`` set, the loaded table (both). Else the table is measured on ``model``
        and refitted to ``calibration_models`` configurations drawn uniformly from ``space``
        (a generator seeded by ``seed + 1``), each timed by ``time_genes`` (ms); when
        :attr:`runtime` is not ``torch``, also to the smallest and the largest configuration
        timed that way (the table's own timings are PyTorch's).

        Raises:
            FileNotFoundError, PrunerConfigError: see :meth:`load_table`.
        """
        if self.table is not None:
            table = self.load_table(space)
            return table, table
        log.info("SwiftPruner: measuring the latency lookup table (%d head x %d FFN choices)",
                 len(space.head_choices), len(space.neuron_choices))
        anchors = LatencyTable.measure(
            model, list(space.head_choices), list(space.neuron_choices), batch_size=self.batch_size,
            seq_len=self.seq_len, warmup=self.warmup, repeats=self.repeats, layers=self.lut_layers,
        )
        sizes = [len(space.head_choices)] * space.num_layers + [len(space.neuron_choices)] * space.num_layers
        samples = []
        if self.runtime != "torch":
            # The table's blocks and anchors are timed in PyTorch: its scale and fixed part are refitted to
            # whole models timed in the runtime, the two anchors (every layer smallest / largest) first.
            for genes in ((0,) * len(sizes), tuple(n - 1 for n in sizes)):
                samples.append((*space.decode(genes), time_genes(genes)))
        if not self.calibration_models and not samples:
            return anchors, anchors
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(self.calibration_models):
            genes = tuple(int(torch.randint(n, (1,), generator=g)) for n in sizes)
            samples.append((*space.decode(genes), time_genes(genes)))
        refit = anchors.refit(samples)
        log.info("SwiftPruner: latency table refitted to %d measured models: scale %.3f -> %.3f, fixed %.3f -> %.3f ms",
                 refit.calibration_points, anchors.scale, refit.scale, anchors.fixed_ms, refit.fixed_ms)
        return refit, anchors

    def load_table(self, space: SearchSpace) -> LatencyTable:
        """The table of ``table`` (a ``latency_table.json``), checked against ``space`` and the budget's shape.

        Raises:
            FileNotFoundError: the file does not exist.
            PrunerConfigError: the file is not a table, or its choices, layers or shape differ.
        """
        path = Path(self.table)
        if not path.is_file():
            raise MissingFileError(
                f"pruner.latency.table={path} does not exist; give the latency_table.json of an earlier SwiftPruner "
                "run, or null to measure the table."
            )
        try:
            table = LatencyTable.from_state_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as err:
            raise PrunerConfigError(f"pruner.latency.table={path} is not a latency table: {err}") from None
        expected = (list(space.head_choices), list(space.neuron_choices), space.num_layers, self.batch_size, self.seq_len)
        found = (table.head_choices, table.neuron_choices, table.num_layers, table.batch_size, table.seq_len)
        if found != expected:
            raise PrunerConfigError(
                f"pruner.latency.table={path} holds (head choices, FFN choices, layers, batch size, seq len) {found}, "
                f"but this search needs {expected}; measure a new table (pruner.latency.table=null)."
            )
        log.info("SwiftPruner: latency table loaded from %s", path)
        return table


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Mean and max of ``|predicted - measured| / measured`` in percent, and how many pairs."""
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    return {"mean_abs_pct": 100.0 * sum(errors) / len(errors), "max_abs_pct": 100.0 * max(errors), "candidates": len(errors)}
