"""Evolutionary search with a reinforced mutator: reward, search space, REINFORCE, toy optimum, determinism, resume."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pruners.evolution import (
    EvolutionarySearch,
    Evaluation,
    RandomMutator,
    ReinforcedMutator,
    SearchSpace,
    Transition,
    policy_state,
    reward,
)

torch.set_num_threads(1)

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
    m = ReinforcedMutator(SPACE, seed=seed) if mutator == "reinforced" else RandomMutator()
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
    for _ in range(20):
        assert space.check(space.random(g)) is not None
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
def test_reinforce_raises_rewarded_and_lowers_penalised_action():
    mutator = ReinforcedMutator(SPACE, lr=0.05, entropy_weight=0.0, mutations=1)
    state = policy_state(SPACE, (1, 2, 1, 0, 3, 2), Evaluation(5.0, 20.0, 3.75), BUDGET)
    good, bad = 3, 8
    before_good, before_bad = mutator.log_prob(state, [good]).item(), mutator.log_prob(state, [bad]).item()
    assert before_good == pytest.approx(-math.log(SPACE.num_actions))  # uniform initial policy
    for _ in range(5):
        stats = mutator.update([Transition(state, [good], 3.75, 4.75), Transition(state, [bad], 3.75, 2.75)])
    assert set(stats) >= {"policy_loss", "entropy", "mean_advantage"}
    assert stats["mean_advantage"] == pytest.approx(0.0)
    assert mutator.log_prob(state, [good]).item() > before_good + 0.1
    assert mutator.log_prob(state, [bad]).item() < before_bad - 0.1
    assert mutator.update([]) == {}


def test_log_prob_matches_sampling_without_replacement():
    space = SearchSpace(1, (0, 1, 2), (0, 1, 2))  # 4 actions
    mutator = ReinforcedMutator(space, mutations=2)
    with torch.no_grad():
        mutator.policy[2].bias.copy_(torch.tensor([2.0, 0.0, -1.0, 0.5]))
    state = policy_state(space, (1, 1), Evaluation(0.5, 1.0, 0.5), 1.0)
    pairs = list(itertools.permutations(range(4), 2))
    probs = {p: mutator.log_prob(state, p).exp().item() for p in pairs}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = dict.fromkeys(pairs, 0)
    for _ in range(n):
        counts[tuple(mutator.propose((1, 1), Evaluation(0.5, 1.0, 0.5), 1.0, space, g))] += 1
    for p in pairs:
        assert counts[p] / n == pytest.approx(probs[p], abs=0.03)
    with pytest.raises(ValueError, match="repeat"):
        mutator.log_prob(state, [1, 1])


# -- evolution ------------------------------------------------------------------------------
@pytest.mark.parametrize("mutator", ["random", "reinforced"])
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


def test_same_seed_same_history_and_other_seed_differs():
    a = make_search(seed=3).run()
    b = make_search(seed=3).run()
    c = make_search(seed=4).run()
    assert a.history == b.history and a.population == b.population
    assert a.history != c.history


def test_state_round_trip_resumes_bit_for_bit(tmp_path):
    full = make_search(generations=4).run()
    first = make_search(generations=4)
    for _ in range(3):  # generation 0 and two more
        first.step()
    path = tmp_path / "search.pt"
    torch.save(first.state_dict(), path)
    resumed = make_search(generations=4)
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
