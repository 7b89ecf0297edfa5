"""Latency-budgeted evolutionary search over layer-wise structured sparsity (SwiftPruner, arXiv 2209.00625 Sec. 3).

Pure torch/python: it searches integer genes and calls an objective
``genes -> (quality, latency_ms)``; it knows nothing about BERT. The mutators that
propose children are in :mod:`pruners.swiftpruner.mutators`.

Search space (:class:`SearchSpace`): ``2L`` genes for ``L`` layers. Gene ``l < L`` is
the index of layer ``l``'s kept-head count in ``head_choices``; gene ``L + l`` is the
index of its kept-FFN-neuron count in ``neuron_choices``.

Reward (:func:`reward`): the MnasNet form (Tan et al. 2019, arXiv 1807.11626, Eq. 2)
``quality * (latency / budget) ** w`` with ``w = alpha`` within the budget and
``w = beta < 0`` over it.

Evolution (:class:`EvolutionarySearch`):

* generation 0: the ``initial`` candidates, then random candidates (drawn from the
  search's generator seeded by ``seed``) until ``population_size`` distinct genes
  are evaluated. The population is the best ``population_size`` of them.
* each later generation (``generations`` of them): the ``parents`` best of the
  population by reward are the parents; ``population_size - parents`` children are
  made, one at a time. A child draws its parent uniformly (seeded generator), asks
  the mutator for actions (:meth:`SearchSpace.apply`: step one gene one choice up or
  down, clamped). A child whose genes equal its parent's or were evaluated before
  is retried, up to ``max_retries`` times; after that the last proposal is accepted
  with its cached evaluation (or as a copy of the parent), costing no evaluation.
  Every unique genes is evaluated at most once in the whole search.
* every proposal, retried ones included, becomes a :class:`Transition` (policy
  input, actions, parent reward, reward of the proposed genes: cached, or the
  parent's own for a no-op), and the mutator learns from the generation's
  transitions (REINFORCE for the reinforced mutator).
* the new population is the best ``population_size`` of old population and children
  (ties: earlier evaluation first).

Everything is seeded: equal seeds and objectives give equal histories, and
:meth:`EvolutionarySearch.state_dict` (plain python and tensors, loadable with
``torch.load(weights_only=True)``) resumes a search bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from pruners.base import check_positive_int

__all__ = ["SearchSpace", "reward", "Evaluation", "Transition", "policy_state", "EvolutionarySearch"]


def _finite(name: str, value: Any) -> float:
    """``value`` as a finite float, else ValueError naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number.") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}={value!r} must be finite.")
    return v


def _kept_counts(name: str, choices: Any) -> tuple[int, ...]:
    """``choices`` as a tuple of ascending, distinct, non-negative ints, else ValueError naming them."""
    values = tuple(choices)
    if not values:
        raise ValueError(f"{name} is empty; give at least one kept count.")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in values):
        raise ValueError(f"{name}={values!r} must hold integers >= 0.")
    if any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"{name}={values!r} must be strictly ascending (each kept count once, in increasing order).")
    return values


@dataclass(frozen=True)
class SearchSpace:
    """Per-layer choices of kept heads and kept FFN neurons.

    Genes are a tuple of ``2L`` choice indices: gene ``g < L`` is layer ``g``'s index into
    ``head_choices``, gene ``g >= L`` is layer ``g - L``'s index into ``neuron_choices``.

    Args:
        num_layers: ``L >= 1``.
        head_choices: ascending, distinct, non-negative kept-head counts.
        neuron_choices: ascending, distinct, non-negative kept-neuron counts.

    Raises:
        ValueError: ``num_layers < 1``, or choices empty, unsorted, duplicated or negative.
    """

    num_layers: int
    head_choices: tuple[int, ...]
    neuron_choices: tuple[int, ...]

    def __post_init__(self) -> None:
        check_positive_int("num_layers", self.num_layers)
        object.__setattr__(self, "head_choices", _kept_counts("head_choices", self.head_choices))
        object.__setattr__(self, "neuron_choices", _kept_counts("neuron_choices", self.neuron_choices))

    # -- genes -----------------------------------------------------------------------------
    @property
    def num_genes(self) -> int:
        """``2L``."""
        return 2 * self.num_layers

    @property
    def num_actions(self) -> int:
        """``4L`` actions: ``a // 4`` is the layer, ``(a // 2) % 2`` the kind (0 heads, 1 FFN),
        and ``a % 2`` the direction (0: one choice down, 1: one choice up)."""
        return 4 * self.num_layers

    @property
    def size(self) -> int:
        """Number of distinct genes: ``(len(head_choices) * len(neuron_choices)) ** L``."""
        return (len(self.head_choices) * len(self.neuron_choices)) ** self.num_layers

    def limit(self, gene: int) -> int:
        """Number of choices of gene ``gene`` (its indices are ``0 .. limit - 1``)."""
        return len(self.head_choices) if gene < self.num_layers else len(self.neuron_choices)

    def check(self, genes: Sequence[int]) -> tuple[int, ...]:
        """Return ``genes`` as a tuple of ints after checking length ``2L`` and every index's range.

        Raises:
            ValueError: wrong length, a non-integer, or an index outside its choices.
        """
        values = tuple(genes)
        if len(values) != self.num_genes:
            raise ValueError(f"genes has length {len(values)}; this space has {self.num_genes} genes (2 x {self.num_layers} layers).")
        out = []
        for g, v in enumerate(values):
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.limit(g):
                raise ValueError(f"gene {g}={v!r} must be an integer in [0, {self.limit(g)}).")
            out.append(int(v))
        return tuple(out)

    def decode(self, genes: Sequence[int]) -> tuple[list[int], list[int]]:
        """Genes -> ``(heads_kept, neurons_kept)``, two lists of length ``L`` (kept counts)."""
        genes = self.check(genes)
        heads = [self.head_choices[i] for i in genes[: self.num_layers]]
        neurons = [self.neuron_choices[i] for i in genes[self.num_layers :]]
        return heads, neurons

    def uniform(self, head_index: int, neuron_index: int) -> tuple[int, ...]:
        """Genes with every layer at ``head_choices[head_index]`` and ``neuron_choices[neuron_index]``.

        Raises:
            ValueError: an index outside its choices (negative indices are not accepted).
        """
        return self.check((head_index,) * self.num_layers + (neuron_index,) * self.num_layers)

    def uniform_candidates(self) -> list[tuple[int, ...]]:
        """Every uniform setting, ``len(head_choices) * len(neuron_choices)`` genes, heads index major."""
        return [self.uniform(h, n) for h in range(len(self.head_choices)) for n in range(len(self.neuron_choices))]

    def random(self, generator: torch.Generator) -> tuple[int, ...]:
        """Genes drawn uniformly (each gene independently) from ``generator``."""
        heads = torch.randint(len(self.head_choices), (self.num_layers,), generator=generator)
        neurons = torch.randint(len(self.neuron_choices), (self.num_layers,), generator=generator)
        return tuple(int(v) for v in torch.cat([heads, neurons]))

    def action_gene(self, action: int) -> tuple[int, int]:
        """Action -> ``(gene index, direction)``, direction -1 or +1.

        Raises:
            ValueError: ``action`` not in ``[0, 4L)``.
        """
        if isinstance(action, torch.Tensor) and action.numel() == 1:
            action = action.item()
        if isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < self.num_actions:
            raise ValueError(f"action={action!r} must be an integer in [0, {self.num_actions}).")
        layer, kind = action // 4, (action // 2) % 2
        return layer + kind * self.num_layers, (-1 if action % 2 == 0 else 1)

    def apply(self, genes: Sequence[int], actions: Sequence[int]) -> tuple[int, ...]:
        """Apply ``actions`` in order: each steps its gene one choice in its direction, clamped to the range."""
        out = list(self.check(genes))
        for a in actions:
            g, d = self.action_gene(a)
            out[g] = min(max(out[g] + d, 0), self.limit(g) - 1)
        return tuple(out)

    def features(self, genes: Sequence[int]) -> torch.Tensor:
        """``(2L,)`` float32: each gene index divided by its number of choices minus one (in [0, 1]; 0 for a single choice)."""
        genes = self.check(genes)
        return torch.tensor([v / max(self.limit(g) - 1, 1) for g, v in enumerate(genes)], dtype=torch.float32)


def reward(quality: float, latency_ms: float, budget_ms: float, alpha: float = 0.0, beta: float = -1.0) -> float:
    """Latency-aware reward in the MnasNet form (Tan et al. 2019, arXiv 1807.11626, Eq. 2).

    ``quality * (latency_ms / budget_ms) ** w`` with ``w = alpha`` if ``latency_ms <= budget_ms``
    else ``w = beta``. ``alpha = 0`` (default) scores every in-budget candidate by its quality;
    ``beta < 0`` shrinks the reward of over-budget ones (``beta = -1``: by ``budget / latency``).

    Args:
        quality: non-negative quality (e.g. a proxy accuracy / AUC), unitless.
        latency_ms: measured or predicted latency, > 0, in ms.
        budget_ms: latency budget, > 0, in ms.
        alpha: exponent within budget, <= 0.
        beta: exponent over budget, < 0.

    Raises:
        ValueError: non-finite inputs, ``quality < 0``, ``latency_ms <= 0``, ``budget_ms <= 0``,
            ``alpha > 0`` or ``beta >= 0``.
    """
    quality, latency_ms, budget_ms = _finite("quality", quality), _finite("latency_ms", latency_ms), _finite("budget_ms", budget_ms)
    alpha, beta = _finite("alpha", alpha), _finite("beta", beta)
    if quality < 0:
        raise ValueError(f"quality={quality} must be >= 0 (the reward multiplies it by a latency factor).")
    if latency_ms <= 0 or budget_ms <= 0:
        raise ValueError(f"latency_ms={latency_ms} and budget_ms={budget_ms} must be > 0.")
    if alpha > 0:
        raise ValueError(f"alpha={alpha} must be <= 0 (0: no reward for being faster than the budget).")
    if beta >= 0:
        raise ValueError(f"beta={beta} must be < 0 (it penalises going over the budget).")
    w = alpha if latency_ms <= budget_ms else beta
    return quality * (latency_ms / budget_ms) ** w


@dataclass
class Evaluation:
    """One candidate's figures: ``quality`` (unitless), ``latency_ms`` (ms) and its :func:`reward`."""

    quality: float
    latency_ms: float
    reward: float


@dataclass
class Transition:
    """One mutator proposal and its outcome, for the REINFORCE update.

    Attributes:
        state: the mutator's input at the parent (its ``observe()``: ``(mutations, 4L, F)``
            action features for the reinforced mutator, ``(2L + 2,)`` :func:`policy_state` otherwise).
        actions: the proposed actions, in sampling order.
        parent_reward: the parent's reward (the state-dependent baseline).
        child_reward: the proposed genes' reward (cached if evaluated before; the parent's
            own if the actions changed nothing).
    """

    state: torch.Tensor
    actions: list[int]
    parent_reward: float
    child_reward: float

    @property
    def advantage(self) -> float:
        """``child_reward - parent_reward``."""
        return self.child_reward - self.parent_reward


def policy_state(space: SearchSpace, genes: Sequence[int], evaluation: Evaluation, budget_ms: float) -> torch.Tensor:
    """A parent as ``(2L + 2,)`` float32: ``concat(space.features(genes), [log(latency_ms / budget_ms)], [quality])``.

    Where the parent sits in the space, how far over (> 0) or under (< 0) the budget it is,
    and how good it is.
    """
    extra = torch.tensor([math.log(evaluation.latency_ms / budget_ms), evaluation.quality], dtype=torch.float32)
    return torch.cat([space.features(genes), extra])


class EvolutionarySearch:
    """Latency-budgeted evolutionary search (SwiftPruner, arXiv 2209.00625); see the module docstring.

    Args:
        space: the :class:`SearchSpace`.
        objective: ``genes -> (quality, latency_ms)``; called once per unique genes.
        budget_ms: latency budget, ms (> 0).
        mutator: a :class:`~pruners.swiftpruner.mutators.RandomMutator` or
            :class:`~pruners.swiftpruner.mutators.ReinforcedMutator` (anything with
            ``propose``/``observe``/``update``/``state_dict``/``load_state_dict``).
        population_size: candidates kept per generation (>= 2).
        parents: best candidates that make children (1 .. population_size - 1); each generation
            makes ``population_size - parents`` children.
        generations: generations after generation 0; a full search evaluates at most
            ``max(population_size, len(initial)) + generations * (population_size - parents)`` genes.
        alpha, beta: reward exponents (:func:`reward`).
        seed: seeds the search's generator (random initial candidates, parent draws, actions).
        initial: genes evaluated first in generation 0; duplicates are evaluated once; more than
            ``population_size`` is allowed (the best are kept).
        max_retries: extra proposals for a child whose genes are its parent's or already evaluated.
        progress: called with each generation's summary (:meth:`step`).

    Attributes:
        history: one record per evaluated genes, in evaluation order: ``genes`` (list),
            ``quality``, ``latency_ms``, ``reward``, ``generation``, ``evaluation`` (1-based),
            ``parent`` (list or None), ``actions`` (list or None), ``feasible`` (latency <= budget).
        population: the current population (genes tuples), best first.

    Raises:
        ValueError: an invalid setting or initial genes, or an objective returning invalid figures.
    """

    def __init__(
        self,
        space: SearchSpace,
        objective: Callable[[tuple[int, ...]], tuple[float, float]],
        budget_ms: float,
        mutator: Any,
        population_size: int = 16,
        parents: int = 4,
        generations: int = 10,
        alpha: float = 0.0,
        beta: float = -1.0,
        seed: int = 0,
        initial: Sequence[Sequence[int]] = (),
        max_retries: int = 10,
        progress: Callable[[dict], None] | None = None,
    ):
        self.space = space
        self.objective = objective
        self.budget_ms = _finite("budget_ms", budget_ms)
        if self.budget_ms <= 0:
            raise ValueError(f"budget_ms={budget_ms} must be > 0.")
        self.mutator = mutator
        self.population_size = check_positive_int("population_size", population_size, minimum=2)
        self.parents = check_positive_int("parents", parents)
        if parents >= population_size:
            raise ValueError(f"parents={parents} must be < population_size={population_size} so each generation has children.")
        self.generations = check_positive_int("generations", generations, minimum=0)
        reward(1.0, 1.0, 1.0, alpha, beta)  # validates alpha, beta
        self.alpha, self.beta = float(alpha), float(beta)
        self.seed = check_positive_int("seed", seed, minimum=0)
        self.initial = [space.check(g) for g in initial]
        self.max_retries = check_positive_int("max_retries", max_retries, minimum=0)
        self.progress = progress

        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[dict] = []
        self.population: list[tuple[int, ...]] = []
        self.completed_generations = 0  # generation 0 included
        self._index: dict[tuple[int, ...], int] = {}  # genes -> position in history

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def evaluations(self) -> int:
        """Number of objective calls so far (= ``len(history)``)."""
        return len(self.history)

    @property
    def done(self) -> bool:
        """True once generation 0 and ``generations`` later generations have run."""
        return self.completed_generations > self.generations

    def record(self, genes: Sequence[int]) -> dict | None:
        """The history record of ``genes``, or None if never evaluated."""
        i = self._index.get(tuple(genes))
        return None if i is None else self.history[i]

    def _evaluate(self, genes: tuple[int, ...], generation: int, parent: tuple[int, ...] | None, actions: list[int] | None) -> dict:
        out = self.objective(genes)
        try:
            quality, latency_ms = out
        except (TypeError, ValueError):
            raise ValueError(f"objective({genes}) returned {out!r}; expected (quality, latency_ms).") from None
        quality = _finite(f"objective({genes}) quality", quality)
        latency_ms = _finite(f"objective({genes}) latency_ms", latency_ms)
        rec = {
            "genes": list(genes),
            "quality": quality,
            "latency_ms": latency_ms,
            "reward": reward(quality, latency_ms, self.budget_ms, self.alpha, self.beta),
            "generation": generation,
            "evaluation": len(self.history) + 1,
            "parent": None if parent is None else list(parent),
            "actions": None if actions is None else list(actions),
            "feasible": latency_ms <= self.budget_ms,
        }
        self._index[genes] = len(self.history)
        self.history.append(rec)
        return rec

    def _ranked(self, candidates: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Distinct ``candidates`` by reward, best first; ties by earlier evaluation."""
        unique = list(dict.fromkeys(candidates))
        return sorted(unique, key=lambda g: (-self.record(g)["reward"], self.record(g)["evaluation"]))

    # -- search ----------------------------------------------------------------------------
    def _generation_zero(self) -> dict:
        for genes in self.initial:
            if genes not in self._index:
                self._evaluate(genes, 0, None, None)
        target = min(self.population_size, self.space.size)
        attempts = 0
        while len(self._index) < target and attempts < 100 * self.population_size:
            attempts += 1
            genes = self.space.random(self.generator)
            if genes not in self._index:
                self._evaluate(genes, 0, None, None)
        self.population = self._ranked([tuple(r["genes"]) for r in self.history])[: self.population_size]
        return {"new_evaluations": len(self.history), "cached_children": 0}

    def _generation(self, generation: int) -> dict:
        parents = self.population[: self.parents]
        transitions: list[Transition] = []
        children: list[tuple[int, ...]] = []
        new, cached = 0, 0
        for _ in range(self.population_size - self.parents):
            parent = parents[int(torch.randint(len(parents), (1,), generator=self.generator))]
            rec = self.record(parent)
            parent_eval = Evaluation(rec["quality"], rec["latency_ms"], rec["reward"])
            for _attempt in range(self.max_retries + 1):
                actions = [int(a) for a in self.mutator.propose(parent, parent_eval, self.budget_ms, self.space, self.generator)]
                state = self.mutator.observe(parent, parent_eval, self.budget_ms, self.space, actions)
                genes = self.space.apply(parent, actions)
                if genes == parent:
                    child_reward = parent_eval.reward
                elif genes in self._index:
                    child_reward = self.record(genes)["reward"]
                else:
                    child_reward = self._evaluate(genes, generation, parent, actions)["reward"]
                    new += 1
                    transitions.append(Transition(state, actions, parent_eval.reward, child_reward))
                    break
                transitions.append(Transition(state, actions, parent_eval.reward, child_reward))
            else:
                cached += 1
            children.append(genes)
        stats = self.mutator.update(transitions)
        self.population = self._ranked(self.population + children)[: self.population_size]
        return {"new_evaluations": new, "cached_children": cached, "proposals": len(transitions), **stats}

    def step(self) -> dict:
        """Run the next generation (generation 0 first) and return its summary.

        Returns:
            ``generation``, ``evaluations`` (total so far), ``new_evaluations``, ``cached_children``
            (children accepted without evaluation after ``max_retries``), ``proposals`` (mutator
            calls), ``best_reward``, ``best_feasible_quality`` / ``best_feasible_reward`` /
            ``best_feasible_latency_ms`` (None if nothing is feasible yet), ``population_mean_reward``,
            and the mutator's update statistics (e.g. ``policy_loss``, ``entropy``, ``mean_advantage``).
            Also passed to ``progress``.
        """
        generation = self.completed_generations
        summary = self._generation_zero() if generation == 0 else self._generation(generation)
        self.completed_generations += 1
        best, feasible = self.best(False), self.best(True)
        summary = {
            "generation": generation,
            "evaluations": self.evaluations,
            "best_reward": None if best is None else best["reward"],
            "best_feasible_quality": None if feasible is None else feasible["quality"],
            "best_feasible_reward": None if feasible is None else feasible["reward"],
            "best_feasible_latency_ms": None if feasible is None else feasible["latency_ms"],
            "population_mean_reward": sum(self.record(g)["reward"] for g in self.population) / len(self.population),
            **summary,
        }
        if self.progress is not None:
            self.progress(summary)
        return summary

    def run(self) -> "EvolutionarySearch":
        """Run the remaining generations (all of them for a new search; the rest after a resume)."""
        while not self.done:
            self.step()
        return self

    # -- results ---------------------------------------------------------------------------
    def best(self, feasible_only: bool = True) -> dict | None:
        """The highest-reward history record (earliest on ties); with ``feasible_only`` only
        those within the budget. None if there is none."""
        best = None
        for rec in self.history:
            if feasible_only and not rec["feasible"]:
                continue
            if best is None or rec["reward"] > best["reward"]:
                best = rec
        return best

    def best_reward_curve(self) -> list[float]:
        """Best reward (feasible or not) after each evaluation; length ``evaluations``, non-decreasing."""
        curve, best = [], -math.inf
        for rec in self.history:
            best = max(best, rec["reward"])
            curve.append(best)
        return curve

    # -- state ------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "num_layers": self.space.num_layers,
            "head_choices": list(self.space.head_choices),
            "neuron_choices": list(self.space.neuron_choices),
            "budget_ms": self.budget_ms,
            "population_size": self.population_size,
            "parents": self.parents,
            "alpha": self.alpha,
            "beta": self.beta,
            "seed": self.seed,
            "mutator": getattr(self.mutator, "name", type(self.mutator).__name__),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: config (checked on load), generation counter, population,
        history, generator state and the mutator's state. Plain python and tensors only, so
        ``torch.load(weights_only=True)`` accepts it."""
        return {
            "config": self._config(),
            "completed_generations": self.completed_generations,
            "population": [list(g) for g in self.population],
            "history": [dict(r) for r in self.history],
            "generator": self.generator.get_state(),
            "mutator": self.mutator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``generations`` may differ (to extend a search).

        Raises:
            ValueError: the state was saved by a search with another space, budget, population,
                parents, reward exponents, seed or mutator kind.
        """
        mine = self._config()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if v != mine.get(k)}
        if diff:
            raise ValueError(f"search state does not match this search (saved, current): {diff}")
        self.mutator.load_state_dict(state["mutator"])
        self.completed_generations = int(state["completed_generations"])
        self.history = [dict(r) for r in state["history"]]
        self._index = {tuple(r["genes"]): i for i, r in enumerate(self.history)}
        self.population = [tuple(int(v) for v in g) for g in state["population"]]
        self.generator.set_state(state["generator"])
