"""The mutators of the evolutionary search: random, and SwiftPruner's reinforced mutator (arXiv 2209.00625 Sec. 3).

A mutator proposes a child's actions at a parent (:meth:`propose`), describes what it saw
(:meth:`observe`, stored in the :class:`~pruners.swiftpruner.evolution.Transition`) and
learns from a generation's transitions (:meth:`update`).

Both mutators draw their actions one at a time with ``torch.multinomial(p, 1)`` from the
search's generator (uniform ``p`` for :class:`RandomMutator`), which consumes the generator
identically whatever ``p`` is: random and reinforced searches with the same seed and
``mutations`` share generation 0 and, when the reinforced policy starts uniform (no
``initial_weights``), generation 1 too, so they compare fairly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pruners.base import check_positive_int, check_range
from pruners.swiftpruner.evolution import Evaluation, SearchSpace, Transition, policy_state

__all__ = ["GENERIC_ACTION_FEATURE_NAMES", "GENERIC_ACTION_FEATURES", "action_features", "RandomMutator", "ReinforcedMutator"]

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

    Generic columns (names in order: :data:`GENERIC_ACTION_FEATURE_NAMES`): ``kind`` (0 heads,
    1 FFN), ``direction`` (-1 down, +1 up), layer position ``l / (L - 1)`` (0 for one layer), the
    gene's level (index / (choices - 1), in [0, 1]), ``no-op`` (1 if the step is clamped at the
    end of its range), ``over = log(latency_ms / budget_ms)`` (> 0: over the budget), the
    latency change of the step ``(predict_ms(after) - predict_ms(genes)) / budget_ms``, ``over``
    after the step, 1 if the step ends within the budget (else 0), and the excess after the
    step, ``max(over after, 0)``. Without ``predict_ms`` the change is 0 and the latency after
    the step is ``latency_ms``. Then the ``K`` columns of ``extra(genes)``, the problem's own
    per-action features.

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
        limit = space.limit(g)
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
    check_positive_int("mutations", mutations)
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


def _check_state_name(state: dict[str, Any], name: str) -> None:
    if state.get("name") != name:
        raise ValueError(f"state of mutator {state.get('name')!r} cannot be loaded into a {name!r} mutator.")


class RandomMutator:
    """Baseline mutator: ``mutations`` distinct actions drawn uniformly at random.

    Draws one action at a time with ``torch.multinomial(p, 1, generator)``, ``p`` uniform over
    the actions not drawn yet: the same calls (and generator consumption) as
    :class:`ReinforcedMutator`, so the two differ only in the learned policy.
    """

    name = "random"

    def __init__(self, mutations: int = 2):
        self.mutations = _check_mutations(mutations)

    def propose(self, parent_genes: Sequence[int], parent_eval: Evaluation, budget_ms: float, space: SearchSpace, generator: torch.Generator) -> list[int]:
        """Return ``mutations`` distinct actions in ``[0, 4L)``."""
        _check_mutations(self.mutations, space)
        return _draw_sequence(lambda k, actions: torch.ones(space.num_actions), self.mutations, space.num_actions, generator)

    def observe(self, parent_genes: Sequence[int], parent_eval: Evaluation, budget_ms: float, space: SearchSpace, actions: Sequence[int] = ()) -> torch.Tensor:
        """The parent's :func:`~pruners.swiftpruner.evolution.policy_state` (recorded; this mutator does not learn)."""
        return policy_state(space, parent_genes, parent_eval, budget_ms)

    def update(self, transitions: list[Transition]) -> dict[str, float]:
        """No learning: returns ``{}``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mutations": self.mutations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state_name(state, self.name)
        self.mutations = _check_mutations(state["mutations"])


class ReinforcedMutator:
    """SwiftPruner's reinforced mutator (arXiv 2209.00625, Sec. 3): a policy over mutation actions trained by REINFORCE.

    Policy: every action ``a`` of the ``4L`` (layer x heads/FFN x down/up) is described by a
    feature vector (:func:`action_features`, ``(4L, F)``), and one linear scorer with weights
    shared by all actions turns it into a logit, so the policy applies one rule to every
    layer instead of learning each action's logit separately. The features are the generic
    ones plus the problem's own per-action features, ``action_feature_fn`` (SwiftPruner: the
    Taylor importance mass a step adds or removes, and that mass per budget fraction of
    latency, :func:`pruners.swiftpruner.search.unit_action_features`).

    A child's ``mutations`` actions are drawn one at a time (``torch.multinomial(p, 1,
    generator)``, actions already drawn excluded); the ``k``-th from the features at the parent
    with the first ``k - 1`` actions applied (its latency: the parent's plus the predictor's
    difference), so a second step can compensate the first. The scorer starts at zero (a
    uniform policy, the random mutator's draws) unless ``initial_weights`` sets it
    (SwiftPruner's prior, :func:`pruners.swiftpruner.search.policy_prior`).

    Update (:meth:`update`, REINFORCE, Williams 1992) on one generation's transitions, one Adam
    step: ``loss = -mean(A_i * log pi(actions_i | states_i)) - entropy_weight * mean(H_i)`` with
    ``A_i = (child reward - parent reward - mean over the generation) / s`` (the parent's reward
    is a state-dependent baseline; the generation mean removes the common drop of children of
    the best parents), ``s`` a running root-mean-square of those advantages (decay
    :attr:`advantage_decay`, bias-corrected), so the step size does not depend on the reward's
    scale; ``H_i`` the mean entropy of the draws. A repeated (already evaluated) child carries
    its cached reward.

    Args:
        space: the search space (fixes the number of actions).
        lr: Adam learning rate (> 0).
        entropy_weight: weight of the entropy bonus (>= 0).
        mutations: actions per child (1 .. 4L).
        action_feature_fn: ``genes -> (4L, K)`` float tensor of problem-specific features of
            each action at those genes, finite, the same ``K`` for all genes; None: only the
            generic features. Called once at construction (on the smallest genes) to learn ``K``.
        predict_ms: ``genes -> ms``, a cheap latency predictor (e.g. the lookup table): gives
            each step's latency change and the latency between steps; None: both unknown
            (change 0, the parent's latency).
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
        lr: float = 0.01,
        entropy_weight: float = 0.05,
        mutations: int = 2,
        action_feature_fn: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
        predict_ms: Callable[[tuple[int, ...]], float] | None = None,
        initial_weights: Sequence[float] | None = None,
    ):
        self.space = space
        self.lr = check_range("lr", lr, 0.0, math.inf, low_open=True)
        self.entropy_weight = check_range("entropy_weight", entropy_weight, 0.0, math.inf)
        self.mutations = _check_mutations(mutations, space)
        self.action_feature_fn = action_feature_fn
        self.predict_ms = predict_ms
        self.num_features = action_features(space, space.uniform(0, 0), 1.0, 1.0, action_feature_fn).shape[1]
        with torch.random.fork_rng(devices=[]):  # the weights are set below; leave the global generator as it was
            self.policy = nn.Linear(self.num_features, 1)
        weights = torch.zeros(self.num_features) if initial_weights is None else torch.as_tensor(initial_weights, dtype=torch.float32)
        if weights.shape != (self.num_features,) or not torch.isfinite(weights).all():
            raise ValueError(
                f"initial_weights has shape {tuple(weights.shape)}; expected ({self.num_features},) finite weights, one per "
                f"action feature ({GENERIC_ACTION_FEATURES} generic + {self.num_features - GENERIC_ACTION_FEATURES} problem-specific)."
            )
        with torch.no_grad():
            self.policy.weight.copy_(weights[None])
            self.policy.bias.zero_()
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
        self.adv_sq_avg = 0.0  # running mean square of centred advantages (biased)
        self.updates = 0  # number of update() calls that had transitions

    # -- policy ------------------------------------------------------------------------------
    def step_features(self, genes: Sequence[int], latency_ms: float, budget_ms: float) -> torch.Tensor:
        """:func:`action_features` ``(4L, F)`` at ``genes`` whose latency is ``latency_ms``."""
        return action_features(self.space, genes, latency_ms, budget_ms, self.action_feature_fn, self.predict_ms)

    def _intermediate(self, parent_genes: tuple[int, ...], parent_ms: float, genes: tuple[int, ...]) -> float:
        """Latency of ``genes`` reached from the parent: the parent's plus the predictor's difference."""
        if self.predict_ms is None or genes == parent_genes:
            return parent_ms
        return max(parent_ms + self.predict_ms(genes) - self.predict_ms(parent_genes), 1e-6 * parent_ms)

    def _same_space(self, space: SearchSpace) -> None:
        if space != self.space:
            raise ValueError("the search's space differs from the one this mutator was built for.")

    def observe(self, parent_genes: Sequence[int], parent_eval: Evaluation, budget_ms: float, space: SearchSpace, actions: Sequence[int] = ()) -> torch.Tensor:
        """The policy's inputs for drawing ``actions`` from a parent: ``(mutations, 4L, F)`` float32.

        Slice ``k`` is :meth:`step_features` at the parent with ``actions[:k]`` applied (its latency
        from ``predict_ms`` when given, else the parent's). Only the first ``mutations`` actions
        count; with fewer actions the remaining slices are at the genes with all of them applied.

        Raises:
            ValueError: another space than the mutator's.
        """
        self._same_space(space)
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
        self._same_space(space)
        parent = space.check(parent_genes)

        def step_probs(k: int, actions: list[int]) -> torch.Tensor:
            genes = space.apply(parent, actions)
            feats = self.step_features(genes, self._intermediate(parent, parent_eval.latency_ms, genes), budget_ms)
            with torch.no_grad():
                return torch.softmax(self.logits(feats), dim=-1)

        return _draw_sequence(step_probs, self.mutations, space.num_actions, generator)

    def update(self, transitions: list[Transition]) -> dict[str, float]:
        """One REINFORCE step (Adam) on a generation's transitions.

        Returns:
            ``{"policy_loss", "entropy", "mean_advantage", "advantage_scale"}``: the loss before the
            step, the mean policy entropy (nats), the mean raw advantage (reward units) and the
            running scale ``s``; ``{}`` for no transitions.
        """
        if not transitions:
            return {}
        raw = torch.tensor([t.advantage for t in transitions], dtype=torch.float64)
        centred = raw - raw.mean() if len(transitions) > 1 else raw
        self.updates += 1
        self.adv_sq_avg = self.advantage_decay * self.adv_sq_avg + (1 - self.advantage_decay) * float((centred**2).mean())
        scale = math.sqrt(self.adv_sq_avg / (1 - self.advantage_decay**self.updates))
        adv = (centred / max(scale, 1e-12)).float()
        logits = self.logits(torch.stack([t.state.float() for t in transitions]))
        pairs = [self._sequence_log_prob(logits[i], t.actions) for i, t in enumerate(transitions)]
        log_probs = torch.stack([lp for lp, _ in pairs])
        entropy = torch.stack([h for _, h in pairs]).mean()
        loss = -(adv * log_probs).mean() - self.entropy_weight * entropy
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"policy_loss": float(loss.detach()), "entropy": float(entropy.detach()), "mean_advantage": float(raw.mean()),
                "advantage_scale": scale}

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
        _check_state_name(state, self.name)
        self.mutations = _check_mutations(state["mutations"], self.space)
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.adv_sq_avg = float(state["adv_sq_avg"])
        self.updates = int(state["updates"])
