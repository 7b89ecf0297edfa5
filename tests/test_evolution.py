"""Evolutionary search with a reinforced mutator: reward, search space, REINFORCE, toy optimum, determinism, resume."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pruners.swiftpruner.evolution import EvolutionarySearch, Evaluation, SearchSpace, Transition, policy_state, reward
from pruners.swiftpruner.mutators import (
    GENERIC_ACTION_FEATURE_NAMES,
    GENERIC_ACTION_FEATURES,
    RandomMutator,
    ReinforcedMutator,
    action_features,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # set per test and restored (tests/conftest.py)

# Toy problem: 3 layers, 4 head and 4 neuron choices (4^6 = 4096 genes); quality and latency are
# weighted sums of the gene indices, so the best feasible reward is found by brute force.
SPACE = SearchSpace(3, (0, 1, 2, 3), (0, 1, 2, 3))
W_QUALITY = (3, 1, 2, 2, 3, 1)
W_LATENCY = (2, 3, 1, 1, 2, 3)
BUDGET = 15.0


def toy_objective(genes):
    return 1.0 + sum(w * g for w, g in zip(W_QUALITY, genes)), 1.0 + sum(w * g for w, g in zip(W_LATENCY, genes))


def brute_force_best_feasible() -> float:
    best = -math.inf
    for genes in itertools.product(range(4), repeat=6):
        q, lat = toy_objective(genes)
        if lat <= BUDGET:
            best = max(best, reward(q, lat, BUDGET))
    return best


def make_search(mutator="reinforced", seed=0, generations=4, **kw):
    if mutator == "informed":  # action features, latency predictor and a prior, as SwiftPruner builds it
        prior = [0.0] * GENERIC_ACTION_FEATURES + [1.0]
        prior[8] = 2.0
        m = ReinforcedMutator(SPACE, action_feature_fn=toy_extra, predict_ms=toy_predict, initial_weights=prior)
    else:
        m = ReinforcedMutator(SPACE) if mutator == "reinforced" else RandomMutator()
    return EvolutionarySearch(SPACE, toy_objective, BUDGET, m, generations=generations, seed=seed, **kw)


# -- reward ---------------------------------------------------------------------------------
def test_reward_known_values_and_errors():
    assert reward(0.8, 5.0, 10.0) == pytest.approx(0.8)  # under budget, alpha = 0: the quality
    assert reward(0.8, 10.0, 10.0, beta=-2.0) == pytest.approx(0.8)  # at the budget: w = alpha
    assert reward(0.8, 5.0, 10.0, alpha=-0.07) == pytest.approx(0.8 * 0.5**-0.07)
    assert reward(0.8, 20.0, 10.0) == pytest.approx(0.4)  # over budget, beta = -1: halved
    assert reward(0.8, 20.0, 10.0, beta=-2.0) == pytest.approx(0.2)
    for bad in (dict(budget_ms=0.0), dict(latency_ms=0.0), dict(beta=0.0), dict(alpha=0.1), dict(quality=-0.1), dict(quality=math.nan)):
        args = dict(quality=0.8, latency_ms=5.0, budget_ms=10.0) | bad
        with pytest.raises(ValueError):
            reward(**args)


# -- search space ---------------------------------------------------------------------------
def test_search_space_apply_clamp_decode_uniform():
    space = SearchSpace(2, (0, 2, 4), (0, 64, 128, 256))
    assert space.num_actions == 8 and space.num_genes == 4 and space.size == 12**2
    genes = (0, 2, 3, 1)  # heads idx (0, 2), neurons idx (3, 1)
    assert space.decode(genes) == ([0, 4], [256, 64])
    assert space.uniform(1, 2) == (1, 1, 2, 2)
    assert len(space.uniform_candidates()) == 12 and space.uniform_candidates()[0] == (0, 0, 0, 0)
    # action a: layer a // 4, kind (a // 2) % 2, direction -1 for even a
    assert space.apply(genes, [1]) == (1, 2, 3, 1)  # layer 0 heads +1
    assert space.apply(genes, [0]) == (0, 2, 3, 1)  # layer 0 heads -1: clamped at 0
    assert space.apply(genes, [3]) == (0, 2, 3, 1)  # layer 0 FFN +1: clamped at the top
    assert space.apply(genes, [2]) == (0, 2, 2, 1)  # layer 0 FFN -1
    assert space.apply(genes, [5, 7]) == (0, 2, 3, 2)  # layer 1 heads +1 (clamped), FFN +1
    assert space.apply(genes, [4, 6]) == (0, 1, 3, 0)
    f = space.features(genes)
    assert f.shape == (4,) and torch.allclose(f, torch.tensor([0.0, 1.0, 1.0, 1 / 3]))
    g = torch.Generator().manual_seed(0)
    draws = [space.random(g) for _ in range(20)]
    assert all(space.check(d) == d for d in draws) and len(set(draws)) > 1  # in range (check raises otherwise), varied
    s = policy_state(space, genes, Evaluation(0.7, 20.0, 0.7), budget_ms=10.0)
    assert s.shape == (6,) and s[-2].item() == pytest.approx(math.log(2.0)) and s[-1].item() == pytest.approx(0.7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_layers=0, head_choices=(1, 2), neuron_choices=(1, 2)),
        dict(num_layers=2, head_choices=(), neuron_choices=(1, 2)),
        dict(num_layers=2, head_choices=(2, 1), neuron_choices=(1, 2)),
        dict(num_layers=2, head_choices=(1, 1, 2), neuron_choices=(1, 2)),
        dict(num_layers=2, head_choices=(1, 2), neuron_choices=(-1, 2)),
    ],
)
def test_search_space_rejects_bad_choices(kwargs):
    with pytest.raises(ValueError):
        SearchSpace(**kwargs)


def test_search_space_rejects_bad_genes_and_actions():
    with pytest.raises(ValueError, match="length"):
        SPACE.decode((0, 0, 0))
    with pytest.raises(ValueError, match="gene 5"):
        SPACE.decode((0, 0, 0, 0, 0, 4))
    with pytest.raises(ValueError, match="action"):
        SPACE.apply((0,) * 6, [12])
    with pytest.raises(ValueError):
        SPACE.uniform(4, 0)


# -- REINFORCE ------------------------------------------------------------------------------
def toy_predict(genes):
    return toy_objective(genes)[1]


def toy_extra(genes):
    """(4L, 1): the toy quality each action adds (the objective's own weights, a perfect importance)."""
    rows = []
    for a in range(SPACE.num_actions):
        child = SPACE.apply(genes, [a])
        rows.append([toy_objective(child)[0] - toy_objective(genes)[0]])
    return torch.tensor(rows)


def test_action_features_columns():
    genes = (0, 3, 1, 0, 3, 2)
    f = action_features(SPACE, genes, 20.0, BUDGET, toy_extra, toy_predict)
    assert f.shape == (SPACE.num_actions, GENERIC_ACTION_FEATURES + 1) and f.dtype == torch.float32
    for a in range(SPACE.num_actions):
        g, d = SPACE.action_gene(a)
        child = SPACE.apply(genes, [a])
        kind, direction, position, level, noop, over, dlat, over_after, within_after, excess, extra = f[a].tolist()
        assert (kind, direction) == (float(g >= 3), float(d))
        assert position == pytest.approx((g % 3) / 2) and level == pytest.approx(genes[g] / 3)
        assert noop == float(child == genes)  # gene 0 cannot step down, gene 1 cannot step up
        assert over == pytest.approx(math.log(20.0 / BUDGET))
        assert dlat == pytest.approx((toy_predict(child) - toy_predict(genes)) / BUDGET)
        assert over_after == pytest.approx(math.log((20.0 + toy_predict(child) - toy_predict(genes)) / BUDGET))
        assert within_after == float(20.0 + toy_predict(child) - toy_predict(genes) <= BUDGET)
        assert excess == pytest.approx(max(over_after, 0.0))
        assert extra == pytest.approx(toy_objective(child)[0] - toy_objective(genes)[0])
    plain = action_features(SPACE, genes, 20.0, BUDGET)
    assert plain.shape == (SPACE.num_actions, GENERIC_ACTION_FEATURES) and (plain[:, GENERIC_ACTION_FEATURE_NAMES.index("latency_change")] == 0).all()
    with pytest.raises(ValueError, match="one row per action"):
        action_features(SPACE, genes, 20.0, BUDGET, lambda g: torch.zeros(3, 1))
    with pytest.raises(ValueError, match="finite"):
        action_features(SPACE, genes, 20.0, BUDGET, lambda g: torch.full((SPACE.num_actions, 1), math.nan))


def test_reinforce_raises_rewarded_and_lowers_penalised_action():
    mutator = ReinforcedMutator(SPACE, lr=0.05, entropy_weight=0.0, mutations=1)
    parent, ev = (1, 2, 1, 0, 3, 2), Evaluation(5.0, 20.0, 3.75)
    good, bad = 3, 8  # layer 0 FFN up, layer 2 heads down: different features, so the shared scorer can tell them apart
    s_good, s_bad = (mutator.observe(parent, ev, BUDGET, SPACE, [a]) for a in (good, bad))
    before_good, before_bad = mutator.log_prob(s_good, [good]).item(), mutator.log_prob(s_bad, [bad]).item()
    assert before_good == pytest.approx(-math.log(SPACE.num_actions))  # uniform initial policy
    for _ in range(5):
        stats = mutator.update([Transition(s_good, [good], 3.75, 4.75), Transition(s_bad, [bad], 3.75, 2.75)])
    assert set(stats) >= {"policy_loss", "entropy", "mean_advantage"}
    assert stats["mean_advantage"] == pytest.approx(0.0)
    assert mutator.log_prob(s_good, [good]).item() > before_good + 0.1
    assert mutator.log_prob(s_bad, [bad]).item() < before_bad - 0.1
    assert mutator.update([]) == {}


def test_building_a_mutator_leaves_the_global_generator_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ReinforcedMutator(SPACE, action_feature_fn=toy_extra, predict_ms=toy_predict)
    assert torch.equal(torch.rand(3), expected)


def test_log_prob_matches_sequential_sampling_without_replacement():
    space = SearchSpace(1, (0, 1, 2), (0, 1, 2))  # 4 actions
    mutator = ReinforcedMutator(space, mutations=2, initial_weights=[0.5, 1.0, 0.0, 2.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    parent, ev = (1, 0), Evaluation(0.5, 1.0, 0.5)
    pairs = list(itertools.permutations(range(4), 2))
    probs = {p: mutator.log_prob(mutator.observe(parent, ev, 1.0, space, p), p).exp().item() for p in pairs}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert len({round(v, 6) for v in probs.values()}) > 1  # not uniform
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = dict.fromkeys(pairs, 0)
    for _ in range(n):
        counts[tuple(mutator.propose(parent, ev, 1.0, space, g))] += 1
    for p in pairs:
        assert counts[p] / n == pytest.approx(probs[p], abs=0.03)
    with pytest.raises(ValueError, match="repeat"):
        mutator.log_prob(mutator.observe(parent, ev, 1.0, space, [1, 1]), [1, 1])
    with pytest.raises(ValueError, match="initial_weights"):
        ReinforcedMutator(space, initial_weights=[1.0, 2.0])


def test_prior_weights_steer_proposals_within_the_budget():
    # weight +5 on "the step ends within the budget": from a parent at the budget, proposals keep it
    parent = (1, 1, 1, 1, 1, 1)
    q, lat = toy_objective(parent)
    budget = lat + 0.5
    ev = Evaluation(q, lat, reward(q, lat, budget))
    weights = [0.0] * GENERIC_ACTION_FEATURES
    weights[GENERIC_ACTION_FEATURE_NAMES.index("within_budget_after")] = 5.0
    g = torch.Generator().manual_seed(0)
    counts = {}
    for name, w in (("prior", weights), ("uniform", None)):
        mutator = ReinforcedMutator(SPACE, mutations=1, predict_ms=toy_predict, initial_weights=w)
        within = sum(toy_predict(SPACE.apply(parent, mutator.propose(parent, ev, budget, SPACE, g))) <= budget for _ in range(300))
        counts[name] = within / 300
    assert counts["prior"] > 0.9 and counts["uniform"] < 0.7


# -- evolution ------------------------------------------------------------------------------
@pytest.mark.parametrize("mutator", ["random", "reinforced", "informed"])
def test_evolution_finds_the_brute_force_optimum(mutator):
    best = brute_force_best_feasible()
    search = make_search(mutator, seed=0, generations=12).run()
    gen0 = [r for r in search.history if r["generation"] == 0]
    assert len(gen0) == 16
    assert max(r["reward"] for r in gen0 if r["feasible"]) < best  # generation 0 alone does not hold it
    found = search.best(feasible_only=True)
    assert found["reward"] == pytest.approx(best) and found["latency_ms"] <= BUDGET
    # every genes evaluated once, evaluation indices 1..n, children record their parent and actions
    assert len({tuple(r["genes"]) for r in search.history}) == search.evaluations
    assert [r["evaluation"] for r in search.history] == list(range(1, search.evaluations + 1))
    for r in search.history:
        assert (r["parent"] is None) == (r["generation"] == 0) == (r["actions"] is None)
        if r["parent"] is not None:
            assert tuple(r["genes"]) == SPACE.apply(r["parent"], r["actions"])
        assert r["feasible"] == (r["latency_ms"] <= BUDGET)


def test_generation_zero_is_shared_by_both_mutators_and_includes_initial():
    initial = SPACE.uniform_candidates()[:5]
    a = make_search("random", generations=0, initial=initial).run()
    b = make_search("reinforced", generations=0, initial=initial).run()
    assert a.history == b.history
    assert [tuple(r["genes"]) for r in a.history[:5]] == initial and a.evaluations == 16
    # with the uniform initial policy the first generation draws the same actions too
    a.generations = b.generations = 1
    assert a.run().history == b.run().history


def test_cached_children_cost_no_evaluation():
    space = SearchSpace(1, (0, 1), (0, 1))  # only 4 genes
    calls = []

    def objective(genes):
        calls.append(genes)
        return 1.0 + sum(genes), 1.0 + genes[0]

    summaries = []
    search = EvolutionarySearch(space, objective, 1.5, RandomMutator(), population_size=4, parents=1, generations=2, max_retries=2, progress=summaries.append)
    search.run()
    assert len(calls) == search.evaluations == 4 and len(set(calls)) == 4
    assert [s["generation"] for s in summaries] == [0, 1, 2]
    assert summaries[1]["cached_children"] == 3 and summaries[1]["new_evaluations"] == 0
    assert summaries[1]["proposals"] == 3 * 3
    assert search.best()["genes"] == [0, 1] and search.best(feasible_only=False)["genes"] == [1, 1]


@pytest.mark.parametrize("mutator", ["reinforced", "informed"])
def test_same_seed_same_history_and_other_seed_differs(mutator):
    a = make_search(mutator, seed=3).run()
    b = make_search(mutator, seed=3).run()
    c = make_search(mutator, seed=4).run()
    assert a.history == b.history and a.population == b.population
    assert a.history != c.history


@pytest.mark.parametrize("mutator", ["reinforced", "informed"])
def test_state_round_trip_resumes_bit_for_bit(tmp_path, mutator):
    full = make_search(mutator, generations=4).run()
    first = make_search(mutator, generations=4)
    for _ in range(3):  # generation 0 and two more
        first.step()
    path = tmp_path / "search.pt"
    torch.save(first.state_dict(), path)
    resumed = make_search(mutator, generations=4)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.completed_generations == 3
    resumed.run()
    assert resumed.history == full.history and resumed.population == full.population
    assert resumed.completed_generations == full.completed_generations == 5
    assert resumed.run() is resumed and resumed.evaluations == full.evaluations  # done: nothing more runs
    # the state only loads into a search with the same settings and mutator kind
    with pytest.raises(ValueError, match="budget_ms"):
        EvolutionarySearch(SPACE, toy_objective, 20.0, ReinforcedMutator(SPACE), generations=4).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="mutator"):
        make_search("random", generations=4).load_state_dict(first.state_dict())


def test_best_reward_curve_is_non_decreasing_one_entry_per_evaluation():
    search = make_search(generations=3).run()
    curve = search.best_reward_curve()
    assert len(curve) == search.evaluations == len(search.history)
    assert all(b >= a for a, b in zip(curve, curve[1:]))
    assert curve[-1] == search.best(feasible_only=False)["reward"]


def test_search_rejects_bad_settings():
    for bad in (dict(population_size=1), dict(parents=16), dict(parents=0), dict(generations=-1), dict(max_retries=-1), dict(beta=0.5), dict(initial=[(0, 0)])):
        with pytest.raises(ValueError):
            make_search(**bad)
    with pytest.raises(ValueError, match="budget_ms"):
        EvolutionarySearch(SPACE, toy_objective, 0.0, RandomMutator())
    with pytest.raises(ValueError, match="mutations"):
        ReinforcedMutator(SPACE, mutations=13)
