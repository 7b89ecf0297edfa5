"""SwiftPruner's search (arXiv 2209.00625 Sec. 3): importance, lookup table, evolution, direct measurement, picks.

:class:`Search` is the ``pruner.search`` component (the evolution's settings and its
mutator); :func:`run_search` is the whole flow on a dense fine-tuned model:

1. seeded subsets (:func:`subsets`): the proxy's validation examples and the importance's
   examples; the Taylor importance of every head and FFN neuron (:mod:`.importance`);
2. the dense model's latency (:class:`~.latency.DenseReference`), the lookup table (measured and
   refitted, or loaded) and the budget (:class:`~.latency.LatencyMeter`);
3. evolution (:class:`~.evolution.EvolutionarySearch`) on ``(proxy quality, predicted ms)``
   with the reinforced or the random mutator, the reward ``quality * (latency / budget)^w``;
4. every evaluated candidate's physically shrunk model timed directly (checks the predictor);
5. the picks (:func:`pick`): the best candidate by proxy quality whose timing, and median of
   ``verify_rounds`` re-timings, are within the search budget; the same among every uniform
   configuration (the baseline).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from modules.lit.distributed import is_global_zero, on_rank_zero
from modules.nn.structured import UnitImportance, shrink_structured, top_unit_masks
from pruners.base import PrunerConfigError, check_choice, check_positive_int, check_range
from pruners.swiftpruner.evolution import EvolutionarySearch, SearchSpace
from pruners.swiftpruner.importance import Importance
from pruners.swiftpruner.latency import DenseReference, LatencyMeter, relative_errors
from pruners.swiftpruner.latency_table import LatencyTable
from pruners.swiftpruner.mutators import GENERIC_ACTION_FEATURE_NAMES, GENERIC_ACTION_FEATURES, RandomMutator, ReinforcedMutator
from pruners.swiftpruner.proxy import Proxy

log = logging.getLogger(__name__)

MUTATORS = ("reinforced", "random")
#: prior weight against the log excess over the budget after a step (-50 x 0.02 = -1 for 2% over)
EXCESS_WEIGHT = 50.0


def unit_action_features(
    space: SearchSpace, predict_ms: Callable[[list[int], list[int]], float], importance: UnitImportance, budget_ms: float
) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """SwiftPruner's own features of every mutation action, for the reinforced mutator.

    For genes ``g`` and action ``a`` (:meth:`SearchSpace.apply` of ``[a]``), row ``a`` is

    * ``mass``: the Taylor importance mass the step adds (> 0) or removes (< 0): the sum of
      the importance of the units that enter or leave (a candidate keeps each layer's most
      important units) divided by the total importance of that kind (heads or neurons);
    * ``mass / max(|latency change| / budget_ms, 1e-3)``, clipped to [-10, 10]: importance
      gained per budget fraction of latency added (up) or lost per fraction saved (down, < 0),
      the latency change by ``predict_ms``.

    Clamped (no-op) steps get zeros.

    Args:
        space: the search space.
        predict_ms: ``(heads_kept, neurons_kept) -> ms``, e.g. :meth:`LatencyTable.predict_ms`.
        importance: heads (L, A) and neurons (L, I), non-negative (negative values count as 0).
        budget_ms: the latency budget, ms (> 0).

    Returns:
        ``genes -> (4L, 2)`` float32 tensor.

    Raises:
        ValueError: ``budget_ms <= 0``, importance shapes that do not match the space's layers
            or choices, or an all-zero importance of a kind.
    """
    if not budget_ms > 0:
        raise ValueError(f"budget_ms={budget_ms} must be > 0.")
    cumulative = []  # per kind: (L, units + 1) kept mass of the top-k units / total of the kind
    for name, scores, choices in (("heads", importance.heads, space.head_choices), ("neurons", importance.neurons, space.neuron_choices)):
        scores = torch.as_tensor(scores, dtype=torch.float64).clamp_min(0)
        if scores.dim() != 2 or scores.shape[0] != space.num_layers or scores.shape[1] < choices[-1]:
            raise ValueError(f"importance.{name} has shape {tuple(scores.shape)}; expected ({space.num_layers}, >= {choices[-1]}).")
        total = float(scores.sum())
        if total <= 0:
            raise ValueError(f"importance.{name} is all zero; the importance features would be undefined.")
        top = scores.sort(dim=1, descending=True).values.cumsum(dim=1)
        cumulative.append(torch.cat([torch.zeros(space.num_layers, 1, dtype=torch.float64), top], dim=1) / total)
    L = space.num_layers

    def features(genes: tuple[int, ...]) -> torch.Tensor:
        base = predict_ms(*space.decode(genes))
        rows = []
        for a in range(space.num_actions):
            child = space.apply(genes, [a])
            if child == tuple(genes):
                rows.append([0.0, 0.0])  # clamped step
                continue
            g, _ = space.action_gene(a)
            kind, layer = int(g >= L), g % L
            choices = space.neuron_choices if kind else space.head_choices
            mass = cumulative[kind][layer]
            dmass = float(mass[choices[child[g]]] - mass[choices[genes[g]]])
            dlat = (predict_ms(*space.decode(child)) - base) / budget_ms
            rows.append([dmass, max(min(dmass / max(abs(dlat), 1e-3), 10.0), -10.0)])
        return torch.tensor(rows, dtype=torch.float32)

    return features


def policy_prior() -> list[float]:
    """Initial weights of the reinforced mutator's linear scorer over its 12 action features.

    The 10 generic features of :func:`~pruners.swiftpruner.mutators.action_features` then the 2
    of :func:`unit_action_features`: +2 for "the step ends within the budget",
    ``-EXCESS_WEIGHT`` for the log excess over the budget after the step, +1 for the importance
    mass per budget fraction of latency, all others 0. As a rule: over the budget, prefer the
    steps that cut the excess most; within it, those that stay within; among those, the steps
    that add the most importance per millisecond added or lose the least per millisecond
    saved. REINFORCE then adapts all weights from the rewards. Scaled by ``pruner.search.policy_prior``.
    """
    weights = [0.0] * (GENERIC_ACTION_FEATURES + 2)
    weights[GENERIC_ACTION_FEATURE_NAMES.index("within_budget_after")] = 2.0
    weights[GENERIC_ACTION_FEATURE_NAMES.index("excess_after")] = -EXCESS_WEIGHT
    weights[GENERIC_ACTION_FEATURES + 1] = 1.0  # importance per latency
    return weights


class Search:
    """The evolution's settings and mutator (``pruner.search``).

    Args:
        mutator: ``reinforced`` (a policy trained with REINFORCE) or ``random``.
        mutations: actions (layer, heads/FFN, down/up) per child.
        population_size, parents, generations: the evolution's sizes (``parents < population_size``).
        reward_alpha, reward_beta: exponent w of the reward within (<= 0) / over (< 0) the budget.
        policy_lr: Adam learning rate of the reinforced mutator (> 0).
        entropy_weight: its entropy bonus (>= 0).
        policy_prior: scale (>= 0) of its initial scorer, :func:`policy_prior` (0: a uniform start).
        seed: seed of the subsets, the calibration models, the evolution and the mutator's draws.

    Raises:
        PrunerConfigError: a setting out of range (the message names it as ``pruner.search.<key>``).
    """

    def __init__(
        self,
        mutator: str = "reinforced",
        mutations: int = 2,
        population_size: int = 16,
        parents: int = 4,
        generations: int = 10,
        reward_alpha: float = 0.0,
        reward_beta: float = -1.0,
        policy_lr: float = 0.01,
        entropy_weight: float = 0.05,
        policy_prior: float = 1.0,
        seed: int = 0,
    ):
        self.mutator = check_choice("pruner.search.mutator", mutator, MUTATORS)
        self.mutations = check_positive_int("pruner.search.mutations", mutations)
        self.population_size = check_positive_int("pruner.search.population_size", population_size, minimum=2)
        self.parents = check_positive_int("pruner.search.parents", parents)
        if self.parents >= self.population_size:
            raise PrunerConfigError(
                f"pruner.search.parents={parents} must be smaller than pruner.search.population_size={population_size}."
            )
        self.generations = check_positive_int("pruner.search.generations", generations, minimum=0)
        self.reward_alpha = check_range("pruner.search.reward_alpha", reward_alpha, -math.inf, 0.0, high_open=False)
        self.reward_beta = check_range("pruner.search.reward_beta", reward_beta, -math.inf, 0.0)
        self.policy_lr = check_range("pruner.search.policy_lr", policy_lr, 0.0, math.inf, low_open=True)
        self.entropy_weight = check_range("pruner.search.entropy_weight", entropy_weight, 0.0, math.inf)
        self.policy_prior = check_range("pruner.search.policy_prior", policy_prior, 0.0, math.inf)
        self.seed = check_positive_int("pruner.search.seed", seed, minimum=0)

    def build_mutator(self, space: SearchSpace, table: LatencyTable | None = None, importance: UnitImportance | None = None,
                      budget_ms: float | None = None) -> RandomMutator | ReinforcedMutator:
        """The configured mutator for ``space``.

        The reinforced mutator sees the lookup table's latency change of every action
        (``table``) and the importance mass it adds or removes (``importance``,
        :func:`unit_action_features`); its initial scorer is :func:`policy_prior` times
        ``policy_prior``. Without ``table``/``importance``/``budget_ms`` it sees only the generic
        features and starts uniform.
        """
        if self.mutator == "random":
            return RandomMutator(mutations=self.mutations)
        informed = table is not None and importance is not None and budget_ms is not None
        return ReinforcedMutator(
            space,
            lr=self.policy_lr,
            entropy_weight=self.entropy_weight,
            mutations=self.mutations,
            action_feature_fn=unit_action_features(space, table.predict_ms, importance, budget_ms) if informed else None,
            predict_ms=(lambda genes: table.predict_ms(*space.decode(genes))) if table is not None else None,
            initial_weights=[self.policy_prior * w for w in policy_prior()] if informed and self.policy_prior else None,
        )

    def evolve(self, space: SearchSpace, objective: Callable[[tuple[int, ...]], tuple[float, float]], budget_ms: float,
               table: LatencyTable | None = None, importance: UnitImportance | None = None,
               progress: Callable[[dict], None] | None = None, state: dict | None = None,
               on_generation: Callable[[EvolutionarySearch], None] | None = None) -> EvolutionarySearch:
        """Run the evolution on ``objective`` (``genes -> (quality, ms)``) under ``budget_ms``; returns the finished search.

        ``state`` (an :meth:`EvolutionarySearch.state_dict`) continues a search mid-way;
        ``on_generation(evolution)`` runs after every generation (to checkpoint it).
        """
        evolution = EvolutionarySearch(
            space, objective, budget_ms, self.build_mutator(space, table, importance, budget_ms),
            population_size=self.population_size, parents=self.parents, generations=self.generations,
            alpha=self.reward_alpha, beta=self.reward_beta, seed=self.seed, progress=progress,
        )
        if state is not None:
            evolution.load_state_dict(state)
        while not evolution.done:
            evolution.step()
            if on_generation is not None:
                on_generation(evolution)
        return evolution


def subsets(datamodule, importance: Importance, proxy: Proxy, seed: int) -> tuple[list[dict], list[dict]]:
    """(importance batches, proxy batches) from seeded subsets of a set-up text data module.

    A generator seeded by ``seed`` orders the validation split; the importance takes its
    examples first when it uses that split (:meth:`Importance.batches`), the proxy the next
    ``proxy.examples`` (:meth:`Proxy.batches`).

    Raises:
        PrunerConfigError: fewer than 2 validation examples, or an empty importance split.
    """
    proxy.check(datamodule)
    order = torch.randperm(len(datamodule.datasets["validation"]), generator=torch.Generator().manual_seed(seed)).tolist()
    imp_batches, order = importance.batches(datamodule, order, seed)
    return imp_batches, proxy.batches(datamodule, order)


class SearchInputs(NamedTuple):
    """What the evolution needs from the model and the data (:func:`prepare`)."""

    #: heads (L, A) and neurons (L, I) Taylor importance
    importance: UnitImportance
    #: genes -> proxy quality
    quality: Callable[[tuple[int, ...]], float]
    #: examples the importance and the proxy were computed on
    importance_examples: int
    proxy_examples: int


def prepare(model: nn.Module, datamodule, space: SearchSpace, importance: Importance, proxy: Proxy, seed: int,
            scores: UnitImportance | None = None) -> SearchInputs:
    """The unit importance of ``model`` (``scores`` when restored) and its proxy scorer, on the seeded :func:`subsets`."""
    imp_batches, proxy_batches = subsets(datamodule, importance, proxy, seed)
    n_imp = sum(len(b["labels"]) for b in imp_batches)
    if scores is None:
        if is_global_zero():
            log.info("SwiftPruner: Taylor importance on %d %s examples", n_imp, importance.split)
        scores = importance.estimate(model, imp_batches)
    return SearchInputs(scores, proxy.scorer(model, scores, space, proxy_batches), n_imp, sum(len(b["labels"]) for b in proxy_batches))


class CandidateTimer:
    """Direct latency (ms) of a candidate's physically shrunk model, timed against the dense model.

    Args:
        model: the dense model; a scratch copy of it takes each candidate's masks.
        importance: decides which units a candidate keeps (:func:`modules.nn.structured.top_unit_masks`).
        space: the search space the genes belong to.
        reference: times the shrunk copy (:class:`~pruners.swiftpruner.latency.DenseReference`).
    """

    def __init__(self, model: nn.Module, importance: UnitImportance, space: SearchSpace, reference: DenseReference):
        self.work = copy.deepcopy(model).eval()
        self.importance, self.space, self.reference = importance, space, reference

    def __call__(self, genes: Sequence[int]) -> float:
        """ms of the shrunk model of ``genes`` (at the machine speed of the dense model's first timing)."""
        self.work.set_structured_masks(*top_unit_masks(self.importance, *self.space.decode(genes)))
        return self.reference(shrink_structured(self.work))


def pick(candidates: list[dict], timer: Callable[[Sequence[int]], float], budget_ms: float, latency: LatencyMeter) -> tuple[dict | None, list[dict]]:
    """The best of ``candidates`` by proxy quality that stays within ``budget_ms`` when re-timed.

    Candidates (dicts with ``genes``, ``heads``, ``ffn_neurons``, ``quality``, ``measured_ms``)
    are tried in order of quality (ties: lower timing; one per configuration). Each is re-timed
    ``latency.verify_rounds`` times by ``timer`` and passes if the median (``verified_ms``, with
    the rounds in ``verify_rounds_ms``, both stored in the dict) is within ``budget_ms``; with 0
    rounds the first passes as it is.

    Returns:
        (the pick or None, the rejected candidates: genes, heads, FFN neurons, proxy, measured and
        verified ms).
    """
    rejected, seen = [], set()
    for cand in sorted(candidates, key=lambda r: (-r["quality"], r["measured_ms"])):
        genes = tuple(cand["genes"])
        if genes in seen:
            continue
        seen.add(genes)
        verified = latency.verify(lambda genes=genes: timer(genes))
        if verified is None:
            return cand, rejected
        cand["verify_rounds_ms"], cand["verified_ms"] = verified
        if cand["verified_ms"] <= budget_ms:
            return cand, rejected
        log.info("SwiftPruner: heads %s, FFN neurons %s timed %.3f ms in the search but %.3f ms re-measured (search budget "
                 "%.3f ms); trying the next candidate", cand["heads"], cand["ffn_neurons"], cand["measured_ms"],
                 cand["verified_ms"], budget_ms)
        rejected.append({k: cand[k] for k in ("genes", "heads", "ffn_neurons", "quality", "measured_ms", "verified_ms")})
    return None, rejected


def run_search(model: nn.Module, datamodule, space: SearchSpace, importance: Importance, proxy: Proxy, latency: LatencyMeter,
               search: Search, state: dict[str, Any] | None = None,
               save: Callable[[dict[str, Any]], None] | None = None,
               timing_model: nn.Module | None = None) -> tuple[dict[str, Any], EvolutionarySearch]:
    """The whole search on the dense fine-tuned ``model`` (see the module docstring).

    Under several ranks every rank calls it and they go in lockstep: the importance and every
    proxy score are computed in shares and gathered (:func:`modules.lit.distributed.shared_map`), so
    every rank runs the same evolution; rank 0 alone times (the dense model, the lookup table,
    the candidates, the picks) and shares the figures (:func:`modules.lit.distributed.on_rank_zero`),
    so its timings are not contended by the others' work. In one process this is the plain flow.

    Args:
        model: the dense fine-tuned :class:`~modules.nn.bert.PrunableBertForSequenceClassification`
            (unmasked, full size) the importance and the proxy use, on any device; it is not
            modified (copies are masked).
        datamodule: a set-up text data module.
        space, importance, proxy, latency, search: the search space and the components.
        state: a state ``save`` received earlier (the search continues from it: the same
            importance, dense timing, latency tables, and the evolution after its last generation).
        save: called after every generation with the search state (plain values and tensors):
            ``importance`` (heads, neurons), ``dense_ms``, ``lut``, ``anchors``, ``evolution``
            (pass it on rank 0 alone).
        timing_model: the copy of ``model`` whose shrunk copies are timed (on the host, where the
            run times its served models); ``model`` when None. Only rank 0 uses it.

    Returns:
        (the result: budget, dense latency, lookup table, every evaluated candidate (genes,
        heads/neurons per layer, proxy quality, predicted and measured ms, reward), the chosen
        and the uniform candidate, predictor error; the finished evolution).

    Raises:
        PrunerConfigError: the budget is below the smallest achievable latency, or the data is too small.
        RuntimeError: no evaluated candidate's measured latency is within the search budget, or
            none stays within it when re-timed.
    """
    started = time.time()
    timing_model = model if timing_model is None else timing_model
    restored = None if state is None else UnitImportance(state["importance"]["heads"], state["importance"]["neurons"])
    inputs = prepare(model, datamodule, space, importance, proxy, search.seed, scores=restored)
    timing: dict[str, Any] = {}  # rank 0's timer

    def calibrate() -> tuple[float, dict, dict]:
        reference = latency.reference(timing_model) if state is None else DenseReference.restored(latency, timing_model, state["dense_ms"])
        timing["timer"] = timer = CandidateTimer(timing_model, inputs.importance, space, reference)
        if state is None:
            table, anchors = latency.lookup_table(timing_model, space, timer, search.seed)
        else:
            table, anchors = LatencyTable.from_state_dict(state["lut"]), LatencyTable.from_state_dict(state["anchors"])
        return reference.dense_ms, table.state_dict(), anchors.state_dict()

    dense_ms, table_state, anchors_state = on_rank_zero(calibrate)
    table, anchors = LatencyTable.from_state_dict(table_state), LatencyTable.from_state_dict(anchors_state)
    requested, budget = latency.budgets(dense_ms, table.min_ms(), space)
    scores: dict[tuple[int, ...], float] = {}

    def quality(genes: tuple[int, ...]) -> float:
        if genes not in scores:
            scores[genes] = inputs.quality(genes)
        return scores[genes]

    def progress(summary: dict) -> None:
        if is_global_zero():
            log.info("SwiftPruner search (%s mutator) generation %d/%d: %d candidates evaluated, best reward %.4f, best "
                     "proxy %s within budget %.4f", search.mutator, summary["generation"], search.generations,
                     summary["evaluations"], summary["best_reward"], proxy.metric,
                     summary["best_feasible_quality"] or float("nan"))

    def checkpoint(evo: EvolutionarySearch) -> None:
        if save is not None:
            save({"importance": {"heads": inputs.importance.heads, "neurons": inputs.importance.neurons},
                  "dense_ms": dense_ms, "lut": table.state_dict(), "anchors": anchors.state_dict(),
                  "evolution": evo.state_dict()})

    evolution = search.evolve(space, lambda g: (quality(g), table.predict_ms(*space.decode(g))), budget, table,
                              inputs.importance, progress, state=None if state is None else state["evolution"],
                              on_generation=checkpoint)
    search_s = time.time() - started

    def measure() -> tuple[list[dict], dict, list[dict], list[dict]]:
        """Every candidate and uniform configuration timed, and the pick (rank 0)."""
        timer = timing["timer"]
        records = []
        for rec in evolution.history:
            heads, neurons = space.decode(rec["genes"])
            records.append({**rec, "heads": heads, "ffn_neurons": neurons, "predicted_ms": rec["latency_ms"],
                            "two_anchor_predicted_ms": anchors.predict_ms(heads, neurons), "measured_ms": timer(rec["genes"])})
        within = [r for r in records if r["measured_ms"] <= budget]
        if not within:
            raise RuntimeError(
                f"No evaluated candidate's measured latency is within the search budget {budget:.3f} ms ({requested:.3f} ms "
                f"less the margin pruner.latency.margin={latency.margin}; the smallest measured was "
                f"{min(r['measured_ms'] for r in records):.3f} ms). Raise pruner.latency.budget_ms or "
                "pruner.search.generations."
            )
        chosen, rejected = pick(within, timer, budget, latency)
        if chosen is None:
            raise RuntimeError(
                f"None of the {len(within)} candidates timed within the search budget {budget:.3f} ms stayed within it when "
                f"re-measured ({latency.verify_rounds} rounds; the smallest median was "
                f"{min(r['verified_ms'] for r in rejected):.3f} ms). Raise pruner.latency.budget_ms or "
                "pruner.search.generations, or set pruner.latency.verify_rounds=0 to accept single timings."
            )
        uniform = []
        for genes in space.uniform_candidates():
            heads, neurons = space.decode(genes)
            uniform.append({"genes": list(genes), "heads": heads, "ffn_neurons": neurons, "measured_ms": timer(genes),
                            "predicted_ms": table.predict_ms(heads, neurons)})
        return records, chosen, rejected, uniform

    records, chosen, rejected, uniform = on_rank_zero(measure)
    for entry in uniform:  # every rank: the proxy is computed in shares
        if entry["measured_ms"] <= budget:
            entry["quality"] = quality(tuple(entry["genes"]))
    best_uniform, rejected_uniform = on_rank_zero(
        lambda: pick([u for u in uniform if "quality" in u], timing["timer"], budget, latency))
    if best_uniform is None and is_global_zero():
        log.warning("SwiftPruner: no uniform configuration is within the search budget %.3f ms; no baseline.", budget)

    error = relative_errors([r["predicted_ms"] for r in records], [r["measured_ms"] for r in records])
    result = {
        "budget_ms": requested,
        "budget_source": latency.budget_source(),
        "latency_margin": latency.margin,
        "search_budget_ms": budget,
        "dense_ms": dense_ms,
        "min_predicted_ms": table.min_ms(),
        "latency_shape": {"batch_size": latency.batch_size, "seq_len": latency.seq_len},
        "head_choices": list(space.head_choices),
        "neuron_choices": list(space.neuron_choices),
        "mutator": search.mutator,
        "generations": search.generations,
        "evaluations": evolution.evaluations,
        "proxy": {"metric": proxy.metric, "examples": inputs.proxy_examples},
        "importance_examples": {"split": importance.split, "examples": inputs.importance_examples},
        "importance": {"heads": inputs.importance.heads, "neurons": inputs.importance.neurons},
        "lut": table.state_dict(),
        "candidates": records,
        "predictor_error": {
            **error,
            "calibration_models": 0 if latency.table is not None else latency.calibration_models,
            "two_anchor_fit_mean_abs_pct": relative_errors([r["two_anchor_predicted_ms"] for r in records],
                                                           [r["measured_ms"] for r in records])["mean_abs_pct"],
        },
        "best_reward_curve": evolution.best_reward_curve(),
        "verification": {"rounds": latency.verify_rounds, "rejected": rejected, "rejected_uniform": rejected_uniform},
        "chosen": chosen,
        "uniform_candidates": uniform,
        "uniform": best_uniform,
        "search_seconds": search_s,
        "total_seconds": time.time() - started,
    }
    if is_global_zero():
        log.info("SwiftPruner: chose heads %s, FFN neurons %s: predicted %.3f ms, measured %.3f ms, re-measured %s ms "
                 "(search budget %.3f ms, dense %.3f ms), proxy %s %.4f; predictor error mean %.1f%%", chosen["heads"],
                 chosen["ffn_neurons"], chosen["predicted_ms"], chosen["measured_ms"],
                 f"{chosen['verified_ms']:.3f}" if "verified_ms" in chosen else "not", budget, dense_ms,
                 proxy.metric, chosen["quality"], error["mean_abs_pct"])
    return result, evolution
