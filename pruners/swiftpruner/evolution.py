"""Latency-budgeted evolutionary search over layer-wise structured sparsity, with a reinforced mutator.

SwiftPruner (Zhang et al., CIKM 2022, arXiv 2209.00625) searches a sparsity per layer
with evolution whose mutations are chosen by a learned policy (the *reinforced
mutator*) instead of at random, rewarded by a latency-aware multi-objective reward.
No public code exists; this module is the project's specification of it
(``../shared/notes/algorithms.md`` section 3). It is pure torch/python and knows
nothing about BERT: it searches integer genes and calls an objective
``genes -> (quality, latency_ms)``.

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
  transitions (:meth:`ReinforcedMutator.update`, REINFORCE, Williams 1992).
* the new population is the best ``population_size`` of old population and children
  (ties: earlier evaluation first).

Both mutators draw their actions one at a time with ``torch.multinomial(p, 1)`` from the
search's generator (uniform ``p`` for :class:`RandomMutator`), which consumes the generator
identically whatever ``p`` is: random and reinforced searches with the same seed and
``mutations`` share generation 0 and, when the reinforced policy starts uniform (no
``initial_weights``), generation 1 too, so they compare fairly.

Everything is seeded: equal seeds and objectives give equal histories, and
:meth:`EvolutionarySearch.state_dict` (plain python and tensors, loadable with
``torch.load(weights_only=True)``) resumes a search bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = [
    "SearchSpace",
    "reward",
    "Evaluation",
    "Transition",
    "policy_state",
    "action_features",
    "GENERIC_ACTION_FEATURE_NAMES",
    "RandomMutator",
    "ReinforcedMutator",
    "EvolutionarySearch",
]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")
    return value


def _check_finite(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number.") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}={value!r} must be finite.")
    return v


def _check_choices(name: str, choices: Any) -> tuple[int, ...]:
    try:
        values = tuple(choices)
    except TypeError:
        raise ValueError(f"{name}={choices!r} must be a sequence of integers.") from None
    if not values:
        raise ValueError(f"{name} is empty; give at least one kept count.")
    for c in values:
        if isinstance(c, bool) or not isinstance(c, int):
            raise ValueError(f"{name}={values!r}: {c!r} is not an integer.")
        if c < 0:
            raise ValueError(f"{name}={values!r}: kept counts must be >= 0, got {c}.")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={values!r} has duplicates; each kept count must appear once.")
    if list(values) != sorted(values):
        raise ValueError(f"{name}={values!r} is not ascending; give kept counts in increasing order.")
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
        _check_int("num_layers", self.num_layers, 1)
        object.__setattr__(self, "head_choices", _check_choices("head_choices", self.head_choices))
        object.__setattr__(self, "neuron_choices", _check_choices("neuron_choices", self.neuron_choices))

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

    def _limit(self, gene: int) -> int:
        return len(self.head_choices) if gene < self.num_layers else len(self.neuron_choices)

    def check(self, genes: Sequence[int]) -> tuple[int, ...]:
        """Return ``genes`` as a tuple of ints after checking length ``2L`` and every index's range.

        Raises:
            ValueError: wrong length, a non-integer, or an index outside its choices.
        """
        try:
            values = tuple(genes)
        except TypeError:
            raise ValueError(f"genes={genes!r} must be a sequence of {self.num_genes} integers.") from None
        if len(values) != self.num_genes:
            raise ValueError(f"genes has length {len(values)}; this space has {self.num_genes} genes (2 x {self.num_layers} layers).")
        out = []
        for g, v in enumerate(values):
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self._limit(g):
                raise ValueError(f"gene {g}={v!r} must be an integer in [0, {self._limit(g)}).")
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
        for name, idx, n in (("head_index", head_index, len(self.head_choices)), ("neuron_index", neuron_index, len(self.neuron_choices))):
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n:
                raise ValueError(f"{name}={idx!r} must be an integer in [0, {n}).")
        return (head_index,) * self.num_layers + (neuron_index,) * self.num_layers

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
            out[g] = min(max(out[g] + d, 0), self._limit(g) - 1)
        return tuple(out)

    def features(self, genes: Sequence[int]) -> torch.Tensor:
        """``(2L,)`` float32: each gene index divided by its number of choices minus one (in [0, 1]; 0 for a single choice)."""
        genes = self.check(genes)
        return torch.tensor([v / max(self._limit(g) - 1, 1) for g, v in enumerate(genes)], dtype=torch.float32)


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
    quality = _check_finite("quality", quality)
    latency_ms = _check_finite("latency_ms", latency_ms)
    budget_ms = _check_finite("budget_ms", budget_ms)
    alpha = _check_finite("alpha", alpha)
    beta = _check_finite("beta", beta)
    if quality < 0:
        raise ValueError(f"quality={quality} must be >= 0 (the reward multiplies it by a latency factor).")
    if latency_ms <= 0:
        raise ValueError(f"latency_ms={latency_ms} must be > 0.")
    if budget_ms <= 0:
        raise ValueError(f"budget_ms={budget_ms} must be > 0.")
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
        state: the mutator's input at the parent (its ``observe()``: ``(4L, F)`` action
            features for :class:`ReinforcedMutator`, ``(2L + 2,)`` :func:`policy_state` otherwise).
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
    """The mutator's view of a parent, ``(2L + 2,)`` float32.

    ``concat(space.features(genes), [log(latency_ms / budget_ms)], [quality])``: where the
    parent sits in the space, how far over (> 0) or under (< 0) the budget it is, and how good it is.
    """
    extra = torch.tensor([math.log(evaluation.latency_ms / budget_ms), evaluation.quality], dtype=torch.float32)
    return torch.cat([space.features(genes), extra])


#: names of the generic per-action features of :func:`action_features`, in column order
GENERIC_ACTION_FEATURE_NAMES = (
    "kind",
    "direction",
    "layer_position",
    "level",
    "no_op",
    "over_budget",
    "latency_change",
    "over_budget_after",
    "within_budget_after",
    "excess_after",
)
#: number of generic per-action features of :func:`action_features`
GENERIC_ACTION_FEATURES = len(GENERIC_ACTION_FEATURE_NAMES)


def action_features(
    space: SearchSpace,
    genes: Sequence[int],
    latency_ms: float,
    budget_ms: float,
    extra: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
    predict_ms: Callable[[tuple[int, ...]], float] | None = None,
) -> torch.Tensor:
    """Features of every mutation action at ``genes``, ``(4L, 10 + K)`` float32 (row ``a`` = action ``a``).

    Generic columns (the reinforced mutator's view of an action, arXiv 2209.00625 Sec. 3):
    ``kind`` (0 heads, 1 FFN), ``direction`` (-1 down, +1 up), layer position ``l / (L - 1)``
    (0 for one layer), the gene's level (index / (choices - 1), in [0, 1]), ``no-op`` (1 if
    the step is clamped at the end of its range), ``over = log(latency_ms / budget_ms)`` (> 0:
    over the budget), the latency change of the step ``(predict_ms(after) - predict_ms(genes))
    / budget_ms``, ``over`` after the step, 1 if the step ends within the budget (else 0), and
    the excess after the step, ``max(over after, 0)``.
    Without ``predict_ms`` the change is 0 and the latency after the step is ``latency_ms``.
    The columns' names, in order, are :data:`GENERIC_ACTION_FEATURE_NAMES`.
    Then the ``K`` columns of ``extra(genes)``, the problem's own per-action features (e.g.
    the importance mass a step adds or removes).

    Args:
        space: the search space.
        genes: where the actions start, ``2L`` choice indices.
        latency_ms: the latency of ``genes`` (ms, > 0; measured or predicted).
        budget_ms: the budget (ms, > 0).
        extra: ``genes -> (4L, K)`` problem-specific features, or None.
        predict_ms: ``genes -> ms``, a cheap latency predictor (e.g. a lookup table), or None.

    Raises:
        ValueError: invalid genes, a non-positive latency or budget, or ``extra`` returning a
            tensor that is not ``(4L, K)`` or holds non-finite values.
    """
    genes = space.check(genes)
    if not (latency_ms > 0 and budget_ms > 0):
        raise ValueError(f"latency_ms={latency_ms} and budget_ms={budget_ms} must be > 0.")
    over = math.log(latency_ms / budget_ms)
    base = None if predict_ms is None else predict_ms(genes)
    L = space.num_layers
    rows = []
    for a in range(space.num_actions):
        g, d = space.action_gene(a)
        limit = space._limit(g)
        noop = not 0 <= genes[g] + d < limit
        delta = 0.0 if base is None or noop else predict_ms(space.apply(genes, [a])) - base
        after = max(latency_ms + delta, 1e-6 * latency_ms)
        rows.append([
            float(g >= L), float(d), (g % L) / max(L - 1, 1), genes[g] / max(limit - 1, 1), float(noop),
            over, delta / budget_ms, math.log(after / budget_ms), float(after <= budget_ms), max(math.log(after / budget_ms), 0.0),
        ])
    out = torch.tensor(rows, dtype=torch.float32)
    if extra is not None:
        more = torch.as_tensor(extra(genes), dtype=torch.float32)
        if more.dim() != 2 or more.shape[0] != space.num_actions:
            raise ValueError(f"action features have shape {tuple(more.shape)}; expected ({space.num_actions}, K): one row per action.")
        if not torch.isfinite(more).all():
            raise ValueError(f"action features at genes {genes} are not all finite.")
        out = torch.cat([out, more], dim=1)
    return out


def _check_mutations(mutations: int, space: SearchSpace | None = None) -> int:
    _check_int("mutations", mutations, 1)
    if space is not None and mutations > space.num_actions:
        raise ValueError(f"mutations={mutations} exceeds the space's {space.num_actions} actions.")
    return mutations


def _draw_sequence(step_probs: Callable[[int, list[int]], torch.Tensor], mutations: int, num_actions: int, generator: torch.Generator) -> list[int]:
    """``mutations`` distinct actions, one ``torch.multinomial(p, 1)`` call per action.

    ``step_probs(k, actions_so_far)`` gives the (unnormalised) ``(4L,)`` probabilities of the
    ``k``-th action; actions already drawn get probability 0. Every mutator draws through
    this function, so all of them consume the search's generator identically.
    """
    actions: list[int] = []
    taken = torch.zeros(num_actions, dtype=torch.bool)
    for k in range(mutations):
        p = step_probs(k, actions).masked_fill(taken, 0.0)
        a = int(torch.multinomial(p, 1, generator=generator))
        actions.append(a)
        taken[a] = True
    return actions


class RandomMutator:
    """Baseline mutator: ``mutations`` distinct actions drawn uniformly at random.

    Draws one action at a time with ``torch.multinomial(p, 1, generator)``, ``p`` uniform over
    the actions not drawn yet: the same calls (and generator consumption) as
    :class:`ReinforcedMutator`, whose default ``mutations`` (2) it shares, so the two differ
    only in the learned policy.
    """

    name = "random"

    def __init__(self, mutations: int = 2):
        self.mutations = _check_mutations(mutations)

    def propose(self, parent_genes: Sequence[int], parent_eval: Evaluation, budget_ms: float, space: SearchSpace, generator: torch.Generator) -> list[int]:
        """Return ``mutations`` distinct actions in ``[0, 4L)``."""
        _check_mutations(self.mutations, space)
        return _draw_sequence(lambda k, actions: torch.ones(space.num_actions), self.mutations, space.num_actions, generator)

    def observe(self, parent_genes: Sequence[int], parent_eval: Evaluation, budget_ms: float, space: SearchSpace, actions: Sequence[int] = ()) -> torch.Tensor:
        """The parent's :func:`policy_state` (recorded in transitions; this mutator does not learn)."""
        return policy_state(space, parent_genes, parent_eval, budget_ms)

    def update(self, transitions: list[Transition]) -> dict[str, float]:
        """No learning: returns ``{}``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mutations": self.mutations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state of mutator {state.get('name')!r} cannot be loaded into a {self.name!r} mutator.")
        self.mutations = _check_mutations(state["mutations"])


class _Scorer(nn.Module):
    """Shared action scorer: ``(..., F) -> (..., 1)``, ``linear(x) + mlp(x)`` (mlp only with ``hidden > 0``).

    Both output layers start at zero (a uniform policy) unless the linear weights are set.
    """

    def __init__(self, features: int, hidden: int, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.linear = nn.Linear(features, 1)
            self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1)) if hidden else None
        for layer in (self.linear, self.mlp[-1] if self.mlp is not None else None):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if self.mlp is None else out + self.mlp(x)


class ReinforcedMutator:
    """SwiftPruner's reinforced mutator (arXiv 2209.00625, Sec. 3): a policy over mutation actions trained by REINFORCE.

    Policy: every action ``a`` of the ``4L`` (layer x heads/FFN x down/up) is described by a
    feature vector (:func:`action_features`, ``(4L, F)``), and one scorer with weights shared by
    all actions turns it into a logit: a linear layer, plus ``Linear(F, hidden) - tanh -
    Linear(hidden, 1)`` if ``hidden > 0``. Sharing the weights lets the policy apply one rule to
    every layer ("prefer steps that stay within the budget and buy much importance per
    millisecond") instead of learning each action's logit separately from ~12 proposals per
    generation. The features are generic (kind, direction, layer position, level, clamped
    no-op, log latency / budget before and after the step, whether the step ends within the
    budget and by how much it exceeds it, the step's latency change from ``predict_ms``) plus the problem's own per-action features, ``action_feature_fn``
    (SwiftPruner: the Taylor importance mass a step adds or removes, and that mass per
    budget fraction of latency, :func:`pruners.swiftpruner.unit_action_features`).

    A child's ``mutations`` actions are drawn one at a time (``torch.multinomial(p, 1,
    generator)``, actions already drawn excluded); the ``k``-th from the features at the parent
    with the first ``k - 1`` actions applied (its latency: the parent's plus the predictor's
    difference), so a second step can compensate the first ("one head up, then a cheap FFN
    block down to get back within the budget"). The output layers start at zero (a uniform
    policy, the random mutator's draws) unless ``initial_weights`` sets the linear scorer
    (SwiftPruner's default prior, :func:`pruners.swiftpruner.policy_prior`).

    Update (:meth:`update`, REINFORCE, Williams 1992) on one generation's transitions:
    ``loss = -mean(A_i * log pi(actions_i | states_i)) - entropy_weight * mean(H_i)`` with
    ``A_i = (child reward - parent reward - mean over the generation) / s`` (``centre``; the
    parent's reward is a state-dependent baseline, the generation mean removes the common
    drop of children of the best parents), ``s`` a running root-mean-square of those
    advantages (decay :attr:`advantage_decay`, bias-corrected), so the step size does not
    depend on the reward's scale; ``H_i`` the mean entropy of the draws. ``steps`` Adam
    steps per generation. A repeated (already evaluated) child carries its cached reward.

    Measured on a toy search resembling the MiniLM one (``python benchmarks/swiftpruner_search.py
    --toy``: the real latency table's 6 layers x 7 head x 9 FFN choices, budget 50% of dense,
    population 16, 4 parents, 10 generations, noisy importance estimates; 40 seeds;
    ``benchmarks/results/swiftpruner_search_toy.json``): with SwiftPruner's prior and these
    defaults the mutator reached the random mutator's final best reward sooner on 36 of 40
    seeds (median 54.5 vs 115.5 evaluations). The prior alone, without learning
    (``policy_lr=1e-12``), was sooner on 37 of 40 (median 54.5); seed by seed, learning was
    sooner than no learning on 4 seeds, later on 5, and the final best rewards differed by
    +0.0004 +- 0.0004 (at 30 generations: sooner on 16, later on 15, -0.00001 +- 0.00036): the
    gain comes from the action features and the prior, and REINFORCE's share was not
    detected. From a uniform start REINFORCE was sooner on only 7 of 40 seeds (14 with a
    32-wide MLP branch): ~100 noisy rewards were not enough to learn the rule. On the real
    MiniLM search (50% of each run's dense batch-1 latency, timed against the dense model;
    ``benchmarks/results/swiftpruner_search_dense_ref.json``) it was sooner on 3 of 3 seeds
    0-2 (32 vs 66, 52 vs 109, 77 vs 105 evaluations) and on 6 of 9 seeds in all; its mean
    curve over seeds 0-2 reached the random one's final best after 52 evaluations, against
    109 (56 vs 109 over 9 seeds).

    Args:
        space: the search space (fixes the number of actions).
        hidden: hidden width of the MLP branch (>= 0; 0: linear scorer only).
        lr: Adam learning rate (> 0).
        entropy_weight: weight of the entropy bonus (>= 0).
        mutations: actions per child (1 .. 4L).
        seed: seeds the policy's initial weights (the global RNG is left untouched).
        steps: Adam steps per :meth:`update` (>= 1).
        action_feature_fn: ``genes -> (4L, K)`` float tensor of problem-specific features of
            each action at those genes, finite, the same ``K`` for all genes; None: only the
            generic features. It is called once at construction (on the smallest genes) to
            learn ``K``.
        predict_ms: ``genes -> ms``, a cheap latency predictor (the objective's own, e.g. the
            lookup table): gives each step's latency change and the latency between steps;
            None: both unknown (change 0, the parent's latency).
        centre: subtract the generation's mean advantage (True) or not.
        initial_weights: ``F`` initial weights of the linear scorer (a prior); None: zeros.

    Raises:
        ValueError: an invalid setting, or ``action_feature_fn`` returning a wrong shape or
            non-finite values.
    """

    name = "reinforced"
    #: decay of the running mean square of advantages, per generation
    advantage_decay = 0.9

    def __init__(
        self,
        space: SearchSpace,
        hidden: int = 0,
        lr: float = 0.01,
        entropy_weight: float = 0.05,
        mutations: int = 2,
        seed: int = 0,
        steps: int = 1,
        action_feature_fn: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
        predict_ms: Callable[[tuple[int, ...]], float] | None = None,
        centre: bool = True,
        initial_weights: Sequence[float] | None = None,
    ):
        if not isinstance(space, SearchSpace):
            raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}.")
        self.space = space
        self.hidden = _check_int("hidden", hidden, 0)
        self.lr = _check_finite("lr", lr)
        if self.lr <= 0:
            raise ValueError(f"lr={lr} must be > 0.")
        self.entropy_weight = _check_finite("entropy_weight", entropy_weight)
        if self.entropy_weight < 0:
            raise ValueError(f"entropy_weight={entropy_weight} must be >= 0.")
        self.mutations = _check_mutations(mutations, space)
        self.seed = _check_int("seed", seed, 0)
        self.steps = _check_int("steps", steps, 1)
        self.centre = bool(centre)
        if action_feature_fn is not None and not callable(action_feature_fn):
            raise ValueError("action_feature_fn must be callable: genes -> (4L, K) tensor, or None.")
        self.action_feature_fn = action_feature_fn
        if predict_ms is not None and not callable(predict_ms):
            raise ValueError("predict_ms must be callable: genes -> predicted latency in ms, or None.")
        self.predict_ms = predict_ms
        probe = space.uniform(0, 0)
        self.num_features = action_features(space, probe, 1.0, 1.0, action_feature_fn).shape[1]
        self.policy = _Scorer(self.num_features, hidden, seed)
        if initial_weights is not None:
            w = torch.as_tensor(initial_weights, dtype=torch.float32)
            if w.shape != (self.num_features,) or not torch.isfinite(w).all():
                raise ValueError(
                    f"initial_weights has shape {tuple(w.shape)}; expected ({self.num_features},) finite weights, one per "
                    f"action feature ({GENERIC_ACTION_FEATURES} generic + {self.num_features - GENERIC_ACTION_FEATURES} problem-specific)."
                )
            with torch.no_grad():
                self.policy.linear.weight.copy_(w[None])
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
        self.adv_sq_avg = 0.0  # running mean square of raw advantages (biased)
        self.updates = 0  # number of update() calls that had transitions

    # -- policy ------------------------------------------------------------------------------
    def step_features(self, genes: Sequence[int], latency_ms: float, budget_ms: float) -> torch.Tensor:
        """:func:`action_features` ``(4L, F)`` at ``genes`` whose latency is ``latency_ms`` (quality unused)."""
        return action_features(self.space, genes, latency_ms, budget_ms, self.action_feature_fn, self.predict_ms)

    def _intermediate(self, parent_genes: tuple[int, ...], parent_ms: float, genes: tuple[int, ...]) -> float:
        """Latency of ``genes`` reached from the parent: the parent's plus the predictor's difference."""
        if self.predict_ms is None or genes == parent_genes:
            return parent_ms
        return max(parent_ms + self.predict_ms(genes) - self.predict_ms(parent_genes), 1e-6 * parent_ms)

    def observe(self, parent_genes: Sequence[int], parent_eval: Evaluation, budget_ms: float, space: SearchSpace, actions: Sequence[int] = ()) -> torch.Tensor:
        """The policy's inputs for drawing ``actions`` from a parent: ``(mutations, 4L, F)`` float32.

        Slice ``k`` is :meth:`step_features` at the parent with ``actions[:k]`` applied (its latency
        from ``predict_ms`` when given, else the parent's). Only the first ``mutations`` actions
        count; with fewer actions the remaining slices are at the genes with all of them applied.

        Raises:
            ValueError: another space than the mutator's.
        """
        if space != self.space:
            raise ValueError("the search's space differs from the one this mutator was built for.")
        parent = space.check(parent_genes)
        genes, out = parent, []
        for k in range(self.mutations):
            out.append(self.step_features(genes, self._intermediate(parent, parent_eval.latency_ms, genes), budget_ms))
            if k < len(actions):
                genes = space.apply(genes, [actions[k]])
        return torch.stack(out)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """``(..., 4L, F)`` action features -> ``(..., 4L)`` action logits (one scorer shared by all actions)."""
        if state.shape[-2:] != (self.space.num_actions, self.num_features):
            raise ValueError(
                f"state has shape {tuple(state.shape)}; expected (..., {self.space.num_actions}, {self.num_features}) "
                "action features (observe())."
            )
        return self.policy(state.float()).squeeze(-1)

    def _sequence_log_prob(self, logits: torch.Tensor, actions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, 4L)`` per-step logits -> (log-probability of ``actions``, mean entropy of the masked steps)."""
        mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
        total, entropy = logits.new_zeros(()), logits.new_zeros(())
        for k, a in enumerate(actions):
            self.space.action_gene(a)  # range check
            if mask[a]:
                raise ValueError(f"actions={list(actions)!r} repeat {a}; actions are drawn without replacement.")
            log_pi = torch.log_softmax(logits[k].masked_fill(mask, -math.inf), dim=-1)
            total = total + log_pi[a]
            entropy = entropy - (log_pi.exp() * log_pi.masked_fill(mask, 0.0)).sum()  # 0 * log 0 = 0 for drawn actions
            mask = mask.clone()  # masked_fill saved the old mask for backward
            mask[a] = True
        return total, entropy / max(len(actions), 1)

    def log_prob(self, state: torch.Tensor, actions: Sequence[int]) -> torch.Tensor:
        """Log-probability (scalar tensor, differentiable) of drawing ``actions`` in this order.

        ``state`` is :meth:`observe` for these actions, ``(mutations, 4L, F)``. Sum over steps of
        ``log pi(a_k | state_k, a_1..a_{k-1} removed)``, the law of :meth:`propose`.

        Raises:
            ValueError: an action outside ``[0, 4L)`` or repeated, more actions than states, or a
                state of the wrong shape.
        """
        if len(actions) > state.shape[0]:
            raise ValueError(f"{len(actions)} actions but states for {state.shape[0]} steps.")
        return self._sequence_log_prob(self.logits(state), actions)[0]

    def propose(self, parent_genes: Sequence[int], parent_eval: Evaluation, budget_ms: float, space: SearchSpace, generator: torch.Generator) -> list[int]:
        """Draw ``mutations`` distinct actions one at a time, each from the policy at the parent with
        the actions drawn so far applied (one ``torch.multinomial(p, 1)`` per action)."""
        if space != self.space:
            raise ValueError("the search's space differs from the one this mutator was built for.")
        parent = space.check(parent_genes)

        def step_probs(k: int, actions: list[int]) -> torch.Tensor:
            genes = space.apply(parent, actions)
            feats = self.step_features(genes, self._intermediate(parent, parent_eval.latency_ms, genes), budget_ms)
            with torch.no_grad():
                return torch.softmax(self.logits(feats), dim=-1)

        return _draw_sequence(step_probs, self.mutations, space.num_actions, generator)

    def update(self, transitions: list[Transition]) -> dict[str, float]:
        """``steps`` REINFORCE steps on a generation's transitions.

        Returns:
            ``{"policy_loss", "entropy", "mean_advantage", "advantage_scale"}``: the loss before the
            first step, the mean policy entropy (nats) then, the mean raw advantage (reward units)
            and the running scale ``s``; ``{}`` for no transitions.
        """
        if not transitions:
            return {}
        raw = torch.tensor([t.advantage for t in transitions], dtype=torch.float64)
        centred = raw - raw.mean() if self.centre and len(transitions) > 1 else raw
        self.updates += 1
        self.adv_sq_avg = self.advantage_decay * self.adv_sq_avg + (1 - self.advantage_decay) * float((centred**2).mean())
        scale = math.sqrt(self.adv_sq_avg / (1 - self.advantage_decay**self.updates))
        adv = (centred / max(scale, 1e-12)).float()
        states = torch.stack([t.state.float() for t in transitions])
        first = None
        for _ in range(self.steps):
            logits = self.logits(states)
            pairs = [self._sequence_log_prob(logits[i], t.actions) for i, t in enumerate(transitions)]
            log_probs = torch.stack([lp for lp, _ in pairs])
            entropy = torch.stack([h for _, h in pairs]).mean()
            loss = -(adv * log_probs).mean() - self.entropy_weight * entropy
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            if first is None:
                first = (float(loss.detach()), float(entropy.detach()))
        return {"policy_loss": first[0], "entropy": first[1], "mean_advantage": float(raw.mean()), "advantage_scale": scale}

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Policy weights, Adam state and running advantage statistics (plain values and tensors)."""
        return {
            "name": self.name,
            "mutations": self.mutations,
            "policy": {k: v.clone() for k, v in self.policy.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "adv_sq_avg": self.adv_sq_avg,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (ValueError for another mutator's state; shape errors from torch)."""
        if state.get("name") != self.name:
            raise ValueError(f"state of mutator {state.get('name')!r} cannot be loaded into a {self.name!r} mutator.")
        self.mutations = _check_mutations(state["mutations"], self.space)
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.adv_sq_avg = float(state["adv_sq_avg"])
        self.updates = int(state["updates"])


class EvolutionarySearch:
    """Latency-budgeted evolutionary search (SwiftPruner, arXiv 2209.00625); see the module docstring.

    Args:
        space: the :class:`SearchSpace`.
        objective: ``genes -> (quality, latency_ms)``; called once per unique genes.
        budget_ms: latency budget, ms (> 0).
        mutator: :class:`RandomMutator` or :class:`ReinforcedMutator` (anything with
            ``propose``/``update``/``state_dict``/``load_state_dict``; its ``observe(parent, evaluation,
            budget_ms, space, actions)``, if any, gives the transitions' states).
        population_size: candidates kept per generation (>= 2).
        parents: best candidates that make children (1 .. population_size - 1); each generation
            makes ``population_size - parents`` children.
        generations: generations after generation 0; a full search evaluates at most
            ``max(population_size, len(initial)) + generations * (population_size - parents)`` genes.
        alpha, beta: reward exponents (:func:`reward`).
        seed: seeds the search's generator (random initial candidates, parent draws, actions).
        initial: genes evaluated first in generation 0 (e.g. :meth:`SearchSpace.uniform_candidates`);
            duplicates are evaluated once; more than ``population_size`` is allowed (the best are kept).
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
        if not isinstance(space, SearchSpace):
            raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}.")
        if not callable(objective):
            raise ValueError("objective must be callable: genes -> (quality, latency_ms).")
        for attr in ("propose", "update", "state_dict", "load_state_dict"):
            if not callable(getattr(mutator, attr, None)):
                raise ValueError(f"mutator {mutator!r} has no {attr}(); use RandomMutator or ReinforcedMutator.")
        self.space = space
        self.objective = objective
        self.budget_ms = _check_finite("budget_ms", budget_ms)
        if self.budget_ms <= 0:
            raise ValueError(f"budget_ms={budget_ms} must be > 0.")
        self.mutator = mutator
        self.population_size = _check_int("population_size", population_size, 2)
        self.parents = _check_int("parents", parents, 1)
        if parents >= population_size:
            raise ValueError(f"parents={parents} must be < population_size={population_size} so each generation has children.")
        self.generations = _check_int("generations", generations, 0)
        reward(1.0, 1.0, 1.0, alpha, beta)  # validates alpha, beta
        self.alpha, self.beta = float(alpha), float(beta)
        self.seed = _check_int("seed", seed, 0)
        self.initial = [space.check(g) for g in initial]
        self.max_retries = _check_int("max_retries", max_retries, 0)
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

    @staticmethod
    def _evaluation(rec: dict) -> Evaluation:
        return Evaluation(rec["quality"], rec["latency_ms"], rec["reward"])

    def _evaluate(self, genes: tuple[int, ...], generation: int, parent: tuple[int, ...] | None, actions: list[int] | None) -> dict:
        out = self.objective(genes)
        try:
            quality, latency_ms = out
        except (TypeError, ValueError):
            raise ValueError(f"objective({genes}) returned {out!r}; expected (quality, latency_ms).") from None
        quality = _check_finite(f"objective({genes}) quality", quality)
        latency_ms = _check_finite(f"objective({genes}) latency_ms", latency_ms)
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
            parent_eval = self._evaluation(self.record(parent))
            observe = getattr(self.mutator, "observe", None)
            for attempt in range(self.max_retries + 1):
                actions = [int(a) for a in self.mutator.propose(parent, parent_eval, self.budget_ms, self.space, self.generator)]
                if callable(observe):
                    state = observe(parent, parent_eval, self.budget_ms, self.space, actions)
                else:
                    state = policy_state(self.space, parent, parent_eval, self.budget_ms)
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
