"""SwiftPruner inside Lightning on a tiny random BERT: search, budget, masks, state round trip, config errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

import run
from modules.bert_classifier import BertClassifier
from pipelines.common import build
from pipelines.text import evaluate_test_split
from pruners.base import PrunerConfigError
from modules.structured import UnitImportance
from pruners.swiftpruner.evolution import GENERIC_ACTION_FEATURES, ReinforcedMutator, SearchSpace
from pruners.swiftpruner.pruner import SwiftPruner, policy_prior, proxy_score, unit_action_features

CONF = Path(__file__).resolve().parents[1] / "conf"


# A budget no tiny model can exceed, for tests of what the search does rather than of the budget.
# 1e3 ms was not enough: with another process using both cores, the tiny model's lookup table
# measured 2.4 s for its smallest configuration (thread oversubscription), and the search refused.
NON_BINDING_BUDGET_MS = 1e6


def _pruner(teacher_ckpt, **kw) -> SwiftPruner:
    settings = dict(
        budget_fraction=0.9,
        head_choices=[0, 2, 4],
        ffn_fractions=[0.0, 0.5, 1.0],
        population_size=6,
        parents=2,
        generations=2,
        proxy_examples=8,
        importance_examples=8,
        proxy_batch_size=4,
        latency_seq_len=16,
        latency_warmup=3,
        latency_repeats=10,
        teacher_ckpt=str(teacher_ckpt),
    )
    return SwiftPruner(**{**settings, **kw})


def _trainer(tmp_path, pruner, **kw) -> L.Trainer:
    settings = dict(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path, callbacks=[pruner], num_sanity_val_steps=0)
    return L.Trainer(**{**settings, **kw})


def test_search_at_fit_start_applies_a_within_budget_candidate_and_state_round_trips(tiny_setup, tmp_path):
    dm, teacher_ckpt, _ = tiny_setup
    student = BertClassifier.load_from_checkpoint(teacher_ckpt)
    # A fixed budget: on a tiny model fixed overheads dominate, so a fraction of the dense latency can fall below
    # the smallest model's (timing noise); the budget logic on the real model is checked end to end.
    pruner = _pruner(teacher_ckpt, latency_budget_ms=NON_BINDING_BUDGET_MS)
    trainer = _trainer(tmp_path, pruner)
    trainer.fit(student, datamodule=dm)

    result = pruner.result
    chosen = result["chosen"]
    assert chosen["measured_ms"] <= result["budget_ms"]
    assert result["budget_ms"] == NON_BINDING_BUDGET_MS and result["budget_source"] == "latency_budget_ms"
    assert result["evaluations"] == len(result["candidates"]) >= 6
    # The module trains under the chosen candidate's masks: per layer, exactly the chosen unit counts.
    heads, neurons = student.model.structured_masks()
    assert [int(h.sum()) for h in heads] == chosen["heads"]
    assert [int(n.sum()) for n in neurons] == chosen["ffn_neurons"]
    # The uniform baseline is uniform and within the same measured budget.
    uniform = result["uniform"]
    assert len(set(uniform["heads"])) == 1 and len(set(uniform["ffn_neurons"])) == 1
    assert uniform["measured_ms"] <= result["budget_ms"]
    baseline = pruner.uniform_pruner()
    assert [int(m.sum()) for m in baseline.head_masks] == uniform["heads"]

    # Checkpoint round trip: the pruner's state (search result, evolution state) survives torch's safe loading,
    # and a resumed fit does not search again.
    ckpt = tmp_path / "swift.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"][pruner.state_key]
    assert state["search"]["history"] == pruner.search.state_dict()["history"]
    fresh = _pruner(teacher_ckpt, latency_budget_ms=NON_BINDING_BUDGET_MS)

    def no_search(*args, **kwargs):
        raise AssertionError("a resumed fit must not search again")

    fresh.run_search = no_search
    resumed = BertClassifier.load_from_checkpoint(teacher_ckpt)
    _trainer(tmp_path, fresh, max_steps=3).fit(resumed, datamodule=dm, ckpt_path=ckpt)
    assert fresh.result["chosen"]["genes"] == chosen["genes"]
    assert fresh.state_dict()["search"]["history"] == state["search"]["history"]
    for a, b in zip(resumed.model.structured_masks(), student.model.structured_masks()):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


def test_search_is_reproducible_for_a_seed(tiny_setup, tmp_path):
    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model
    # A fixed budget makes the choice independent of timing noise in the dense measurement.
    runs = [_pruner(teacher_ckpt, latency_budget_ms=1e6, search_seed=3).run_search(model, dm) for _ in range(2)]
    strip = lambda r: [(c["genes"], c["quality"]) for c in r["candidates"]]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])


def test_a_shared_quality_cache_scores_each_candidate_once_across_searches(tiny_setup, monkeypatch):
    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model
    scored = []
    original = SwiftPruner._quality_fn

    def counting(self, *args):
        quality = original(self, *args)

        def wrapped(space, genes):
            scored.append(genes)
            return quality(space, genes)

        return wrapped

    monkeypatch.setattr(SwiftPruner, "_quality_fn", counting)
    cache: dict = {}
    results, scored_by = [], []
    for m in ("random", "reinforced"):
        before = len(scored)
        results.append(_pruner(teacher_ckpt, latency_budget_ms=1e6, search_seed=1, mutator=m).run_search(model, dm, quality_cache=cache))
        scored_by.append(set(scored[before:]))
    assert len(scored) == len(set(scored)) == len(cache)  # nothing scored twice
    gen0 = [tuple(c["genes"]) for c in results[1]["candidates"] if c["generation"] == 0]
    assert gen0 == [tuple(c["genes"]) for c in results[0]["candidates"] if c["generation"] == 0]
    assert not scored_by[1] & set(gen0)  # the second search scored none of the shared generation 0
    for r in results:
        for c in r["candidates"]:
            assert c["quality"] == cache[tuple(c["genes"])]


def test_unit_action_features_latency_change_and_importance_mass():
    space = SearchSpace(2, (0, 1, 2), (0, 2, 4))
    importance = UnitImportance(torch.tensor([[3.0, 1.0], [0.0, 4.0]]), torch.tensor([[1.0, 1.0, 1.0, 5.0], [2.0, 0.0, 0.0, 0.0]]))
    # latency: 1 ms per kept head, 0.5 ms per kept neuron
    predict = lambda heads, neurons: 1.0 + sum(heads) + 0.5 * sum(neurons)  # noqa: E731
    fn = unit_action_features(space, predict, importance, budget_ms=10.0)
    genes = (1, 0, 1, 2)  # layer 0: 1 head, 2 neurons; layer 1: 0 heads, 4 neurons
    f = fn(genes)
    assert f.shape == (space.num_actions, 2)
    # action 1: layer 0 heads up (1 -> 2): adds the second head of layer 0 (importance 1 of 8 head mass), +1 ms
    assert f[1].tolist() == pytest.approx([1 / 8, min((1 / 8) / 0.1, 10.0)])
    # action 2: layer 0 FFN down (2 -> 0 neurons): removes the two best neurons of layer 0 (5 + 1 of 10), -1 ms
    assert f[2].tolist() == pytest.approx([-6 / 10, -6.0])
    # action 4: layer 1 heads down from 0: clamped, zeros
    assert f[4].tolist() == [0.0, 0.0]
    # action 7: layer 1 FFN up from the top: clamped
    assert f[7].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="shape"):
        unit_action_features(space, predict, UnitImportance(torch.ones(3, 2), torch.ones(2, 4)), 10.0)
    with pytest.raises(ValueError, match="all zero"):
        unit_action_features(space, predict, UnitImportance(torch.zeros(2, 2), torch.ones(2, 4)), 10.0)
    # the prior fits the mutator's features
    mutator = ReinforcedMutator(space, action_feature_fn=fn, initial_weights=policy_prior())
    assert mutator.num_features == len(policy_prior()) == GENERIC_ACTION_FEATURES + 2


def test_budget_below_the_smallest_latency_is_a_config_error_naming_it(tiny_setup):
    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model
    with pytest.raises(PrunerConfigError, match=r"below the smallest achievable latency, [0-9.]+ ms"):
        _pruner(teacher_ckpt, latency_budget_ms=1e-6).run_search(model, dm)


def test_nothing_measured_within_budget_fails_a_run_but_a_search_only_run_reports_it(tiny_setup, monkeypatch):
    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model
    # The table predicts candidates within budget, but every direct measurement is over it.
    monkeypatch.setattr(SwiftPruner, "_measure", lambda self, *a: 1e9)
    with pytest.raises(RuntimeError, match="No evaluated candidate.s measured latency is within the search budget"):
        _pruner(teacher_ckpt, latency_budget_ms=1e6, calibration_models=0).run_search(model, dm)
    pruner = _pruner(teacher_ckpt, latency_budget_ms=1e6, calibration_models=0, search_only=True)
    result = pruner.run_search(model, dm)
    assert result["chosen"] is None and result["uniform"] is None
    assert len(result["candidates"]) == result["evaluations"] > 0
    assert pruner.summary()["chosen"] is None


def test_search_history_is_logged_as_a_wandb_table(tiny_setup, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    dm, teacher_ckpt, _ = tiny_setup
    student = BertClassifier.load_from_checkpoint(teacher_ckpt)
    pruner = _pruner(teacher_ckpt, latency_budget_ms=NON_BINDING_BUDGET_MS, generations=1)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="litprune-test")
    trainer = _trainer(tmp_path, pruner, max_steps=1, logger=logger)
    trainer.fit(student, datamodule=dm)  # the search at fit start logs the table
    columns, rows = pruner.history_table()
    assert len(rows) == pruner.result["evaluations"] and "measured_ms" in columns
    logger.experiment.finish()
    tables = list(tmp_path.rglob("search/history_*.table.json"))
    assert tables, "no W&B table file was written for search/history"
    import json

    logged = json.loads(tables[0].read_text())
    assert logged["columns"] == columns and len(logged["data"]) == len(rows)


def test_a_saved_latency_table_is_reused_and_a_mismatched_one_is_a_clear_error(tiny_setup, tmp_path):
    import json

    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model
    first = _pruner(teacher_ckpt, latency_budget_ms=1e6, generations=1).run_search(model, dm)
    path = tmp_path / "latency_table.json"
    path.write_text(json.dumps(first["lut"]))
    again = _pruner(teacher_ckpt, latency_budget_ms=1e6, generations=1, latency_table=str(path)).run_search(model, dm)
    assert again["lut"] == first["lut"]
    # Same seed, same table: the same candidates with the same predicted latencies.
    assert [(c["genes"], c["predicted_ms"]) for c in again["candidates"]] == [
        (c["genes"], c["predicted_ms"]) for c in first["candidates"]
    ]
    with pytest.raises(PrunerConfigError, match="pruner.latency_table=.*holds"):
        _pruner(teacher_ckpt, latency_budget_ms=1e6, latency_seq_len=8, latency_table=str(path)).run_search(model, dm)
    with pytest.raises(FileNotFoundError, match="pruner.latency_table"):
        _pruner(teacher_ckpt, latency_table=str(tmp_path / "none.json")).run_search(model, dm)


@pytest.mark.parametrize(
    "setting",
    [
        {"budget_fraction": 0.0},
        {"latency_budget_ms": -1.0},
        {"mutator": "greedy"},
        {"proxy_metric": "f2"},
        {"parents": 6, "population_size": 6},
        {"ffn_fractions": [0.5, 1.5]},
        {"head_choices": []},
        {"reward_beta": 0.5},
        {"policy_steps": 0},
        {"policy_prior": -1.0},
        {"policy_hidden": -1},
        {"latency_margin": 1.0},
        {"latency_margin": -0.1},
        {"rerank_top_k": -1},
        {"rerank_recovery_steps": 0},
    ],
)
def test_bad_settings_are_config_errors(setting):
    with pytest.raises(PrunerConfigError):
        SwiftPruner(**setting)


def test_proxy_score_known_values():
    logits = torch.tensor([[0.0, 0.5], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert proxy_score(logits, labels, "accuracy") == pytest.approx(0.5)
    # the negative's class-1 probability (0.62) is above one positive's (0.27), below two: AUC = 2/3
    assert proxy_score(logits, labels, "auroc") == pytest.approx(2 / 3)


@pytest.mark.slow
def test_swiftpruner_job_on_a_slice_writes_search_uniform_and_reloads(tmp_path):
    overrides = [
        f"paths.output_dir={tmp_path}", "model=bert", "pruner=swiftpruner", "logger=csv",
        "data.limit_per_split=64", "trainer.val_check_interval=1.0", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false", "latency.batch_sizes=[1,4]", "latency.examples=4",
        "latency.repeats=2", "latency.warmup=1", "pruner.generations=1", "pruner.population_size=4",
        "pruner.parents=2", "pruner.proxy_examples=16", "pruner.importance_examples=16",
        "pruner.latency_repeats=3", "pruner.latency_seq_len=32", "pruner.head_choices=[0,6,12]",
        "pruner.ffn_fractions=[0,0.5,1]", "pruner.budget_fraction=0.9",  # most random candidates fit: no flaky empty choice
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=overrides)
    run.train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    search = results["search"]
    assert search["chosen"]["measured_ms"] <= search["budget_ms"]
    assert search["predictor_error"]["candidates"] == search["evaluations"]
    assert Path(search["pareto_plot"]).stat().st_size > 0
    for name in ("dense", "pruned", "uniform"):
        assert set(results[name]["latency_ms"]) == {"1", "4"}
        assert 0.0 <= results[name]["metrics"]["accuracy"] <= 1.0
    assert results["macs_reduction"] == pytest.approx(
        results["dense"]["macs_per_sample"] / results["pruned"]["macs_per_sample"]
    )
    # The final checkpoint reloads as the masked model and reproduces the served (shrunk) model's accuracy.
    reloaded = BertClassifier.load_from_checkpoint(results["pruned"]["checkpoint"])
    heads, _ = reloaded.model.structured_masks()
    assert [int(h.sum()) for h in heads] == search["chosen"]["heads"]
    datamodule = build(cfg.data)
    datamodule.setup("test")
    again = evaluate_test_split(cfg, reloaded, datamodule)
    assert again["accuracy"] == pytest.approx(results["pruned"]["metrics"]["accuracy"])


def test_proxy_recovery_steps_train_a_fresh_copy_per_candidate(tiny_setup, monkeypatch):
    """``proxy_recovery_steps``: each candidate is scored after that many training steps on a
    train subset, always starting from the dense weights (nothing accumulates across candidates
    and the dense model is untouched)."""
    import pruners.swiftpruner.pruner as sp

    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model.eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    monkeypatch.setattr(sp, "proxy_score", lambda logits, labels, metric: seen.append(logits.clone()) or float(len(seen)))

    def scorer(steps):
        pruner = _pruner(teacher_ckpt, proxy_recovery_steps=steps, search_seed=3)
        space = pruner._space(model)
        imp, proxy, recovery = pruner._subsets(dm)
        assert len(recovery) == steps and all(len(b["labels"]) == dm.batch_size for b in recovery)
        return space, pruner._quality_fn(model, sp.taylor_importance(model, imp), proxy, recovery)

    space, plain = scorer(0)
    genes = space.uniform(1, 1)
    plain(space, genes)
    _, recovered = scorer(2)
    recovered(space, genes)
    recovered(space, space.uniform(2, 2))  # another candidate in between
    recovered(space, genes)
    assert not torch.allclose(seen[0], seen[1])  # the recovery steps changed the scored model
    torch.testing.assert_close(seen[1], seen[3])  # and started from the dense weights both times
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, dense[k])


def test_proxy_recovery_steps_use_the_fine_tuning_loss_with_the_dense_logits(tiny_setup, monkeypatch):
    """The recovery steps minimise the final fine-tuning's loss, ``task_weight * CE + kd_weight *
    KL(dense || candidate)`` at ``kd_temperature``, against the dense model's logits of the same
    recovery batch, so the proxy scores what the fine-tuning can recover."""
    import pruners.swiftpruner.pruner as sp

    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model.eval()
    calls = []
    real_kd = sp.kd_loss
    monkeypatch.setattr(sp, "kd_loss", lambda s, t, temp: calls.append((t.clone(), temp)) or real_kd(s, t, temp))
    pruner = _pruner(teacher_ckpt, proxy_recovery_steps=2, kd_temperature=3.0, search_seed=3)
    space = pruner._space(model)
    imp, proxy, recovery = pruner._subsets(dm)
    quality = pruner._quality_fn(model, sp.taylor_importance(model, imp), proxy, recovery)
    quality(space, space.uniform(1, 1))
    assert [temp for _, temp in calls] == [3.0, 3.0]
    with torch.inference_mode():
        for (teacher_logits, _), b in zip(calls, recovery):
            expected = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).logits
            torch.testing.assert_close(teacher_logits, expected)


def test_mask_tuning_scores_the_least_squares_tuned_shrunk_copy(tiny_setup, monkeypatch):
    """``mask_tuning=lsq``: the proxy scores the candidate's shrunk copy after
    :func:`tune_unit_scales` on ``mask_tuning_examples`` seeded training sentences against the
    unmasked dense model; the same seed gives the same calibration set, and the dense model is
    untouched."""
    import pruners.swiftpruner.pruner as sp
    from pruners.mask_tuning import dense_targets, tune_unit_scales

    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model.eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    monkeypatch.setattr(sp, "proxy_score", lambda logits, labels, metric: seen.append(logits.clone()) or 0.0)
    pruner = _pruner(teacher_ckpt, mask_tuning="lsq", mask_tuning_examples=12, mask_tuning_damping=0.05, search_seed=3)
    assert pruner._calibration(dm)[0]["input_ids"].shape[0] == 4 and sum(len(b["labels"]) for b in pruner._calibration(dm)) == 12
    torch.testing.assert_close(pruner._calibration(dm)[0]["input_ids"], pruner._calibration(dm)[0]["input_ids"])
    assert _pruner(teacher_ckpt)._calibration(dm) == []  # mask_tuning=none: no calibration set
    space = pruner._space(model)
    imp, proxy, _ = pruner._subsets(dm)
    importance = sp.taylor_importance(model, imp)
    calibration = pruner._calibration(dm)
    genes = space.uniform(1, 1)
    pruner._quality_fn(model, importance, proxy, [], calibration)(space, genes)
    pruner._quality_fn(model, importance, proxy, [])(space, genes)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, dense[k])
    expected = copy.deepcopy(model)
    expected.set_structured_masks(*sp.top_unit_masks(importance, *space.decode(genes)))
    expected = sp.shrink_structured(expected).eval()
    tune_unit_scales(expected, dense_targets(model, calibration), calibration, 0.05)
    with torch.inference_mode():
        logits = torch.cat([expected(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).logits for b in proxy])
    torch.testing.assert_close(seen[0], logits)
    assert not torch.allclose(seen[0], seen[1])  # the tuning changed what is scored
    with pytest.raises(PrunerConfigError, match="pruner.mask_tuning"):
        _pruner(teacher_ckpt, mask_tuning="fisher")
    with pytest.raises(PrunerConfigError, match="pruner.mask_tuning_damping"):
        _pruner(teacher_ckpt, mask_tuning_damping=0.0)


def test_the_pick_is_re_measured_and_one_that_comes_out_over_budget_is_passed_over(tiny_setup, monkeypatch):
    """``verify_rounds``: the best candidate by proxy whose search-time timing was within budget is
    timed again; if the median of those timings is over budget the next candidate is tried."""
    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model
    budget = 100.0
    first_timing: dict = {}

    def fake_measure(self, work, importance, space, genes):
        genes = tuple(genes)
        if genes not in first_timing:  # the search-time timing: everything within budget
            first_timing[genes] = 50.0
            return 50.0
        return 150.0 if self._unlucky == genes else 60.0  # re-measurement: one candidate is really over

    monkeypatch.setattr(SwiftPruner, "_measure", fake_measure)
    kw = dict(latency_budget_ms=budget, calibration_models=0, search_seed=2, verify_rounds=3)
    reference = _pruner(teacher_ckpt, **{**kw, "verify_rounds": 0})
    reference._unlucky = None
    best = reference.run_search(model, dm)["chosen"]
    assert "verified_ms" not in best  # verify_rounds=0: the single timing is accepted

    first_timing.clear()
    pruner = _pruner(teacher_ckpt, **kw)
    pruner._unlucky = tuple(best["genes"])
    result = pruner.run_search(model, dm)
    chosen = result["chosen"]
    assert chosen["genes"] != best["genes"] and chosen["verified_ms"] == 60.0 and chosen["verify_rounds_ms"] == [60.0] * 3
    assert [r["genes"] for r in result["verification"]["rejected"]] == [best["genes"]]
    assert result["verification"]["rejected"][0]["verified_ms"] == 150.0
    ranked = sorted(result["candidates"], key=lambda r: -r["quality"])
    assert chosen["quality"] == max(r["quality"] for r in ranked if r["genes"] != best["genes"])
    assert result["uniform"]["verified_ms"] == 60.0

    # Every candidate comes out over budget when re-measured: a run fails with a clear message.
    first_timing.clear()
    pruner = _pruner(teacher_ckpt, **kw)
    pruner._unlucky = None
    def over_when_re_measured(self, work, importance, space, genes):
        repeat = tuple(genes) in first_timing
        first_timing[tuple(genes)] = 50.0
        return 150.0 if repeat else 50.0

    monkeypatch.setattr(SwiftPruner, "_measure", over_when_re_measured)
    with pytest.raises(RuntimeError, match="stayed within it when re-measured"):
        pruner.run_search(model, dm)


def test_the_latency_margin_searches_and_picks_under_the_budget_less_the_margin(tiny_setup, monkeypatch):
    """``latency_margin``: the search budget is ``budget x (1 - margin)``; a candidate timed between
    it and the budget is not picked (searched or uniform), and the result reports both budgets."""
    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model
    near: set = set()
    monkeypatch.setattr(SwiftPruner, "_measure", lambda self, work, importance, space, genes: 95.0 if tuple(genes) in near else 50.0)
    kw = dict(latency_budget_ms=100.0, calibration_models=0, search_seed=2, verify_rounds=2)
    no_margin = _pruner(teacher_ckpt, latency_margin=0.0, **kw).run_search(model, dm)
    near.update({tuple(no_margin["chosen"]["genes"]), tuple(no_margin["uniform"]["genes"])})
    assert no_margin["search_budget_ms"] == no_margin["budget_ms"] == 100.0

    result = _pruner(teacher_ckpt, latency_margin=0.1, **kw).run_search(model, dm)
    assert result["budget_ms"] == 100.0 and result["search_budget_ms"] == pytest.approx(90.0)
    assert result["latency_margin"] == 0.1
    for pick in (result["chosen"], result["uniform"]):
        assert tuple(pick["genes"]) not in near and pick["verified_ms"] == 50.0
    # the candidates at 95 ms were evaluated but are over the search budget
    assert {tuple(r["genes"]) for r in result["candidates"] if r["measured_ms"] == 95.0} == {tuple(no_margin["chosen"]["genes"])}


def test_margin_below_the_smallest_latency_is_a_config_error_naming_the_budget_to_set(tiny_setup):
    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model
    pruner = _pruner(teacher_ckpt, latency_budget_ms=NON_BINDING_BUDGET_MS, latency_margin=1.0 - 1e-12)
    with pytest.raises(PrunerConfigError, match="less its margin pruner.latency_margin.*or lower pruner.latency_margin"):
        pruner.run_search(model, dm)


def test_rerank_re_scores_the_top_k_re_timed_candidates_and_picks_by_that(tiny_setup, monkeypatch):
    """``rerank_top_k``: the k best searched and the k best uniform candidates (by the plain proxy)
    that stay within the search budget when re-timed are scored again after
    ``rerank_recovery_steps`` recovery steps, and each pick is the best by that score even where
    the plain proxy ranked it lower. A candidate that fails re-timing is not re-scored."""
    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model
    unlucky: set = set()
    timed: set = set()

    def fake_measure(self, work, importance, space, genes):
        genes = tuple(genes)
        repeat = genes in timed
        timed.add(genes)
        return 150.0 if repeat and genes in unlucky else 50.0  # the unlucky are over budget when re-timed

    monkeypatch.setattr(SwiftPruner, "_measure", fake_measure)
    recovery_lengths = []
    real_quality_fn = SwiftPruner._quality_fn

    def quality_fn(self, model, importance, proxy, recovery, calibration=()):
        recovery_lengths.append(len(recovery))
        plain = real_quality_fn(self, model, importance, proxy, [], calibration)
        if not recovery:
            return plain
        # the re-scoring reverses the plain proxy's order, so its pick is the k-th best that passed
        return lambda space, genes: -plain(space, genes)

    monkeypatch.setattr(SwiftPruner, "_quality_fn", quality_fn)
    kw = dict(latency_budget_ms=100.0, calibration_models=0, search_seed=2, verify_rounds=1)
    best = _pruner(teacher_ckpt, **kw).run_search(model, dm)["chosen"]
    unlucky.add(tuple(best["genes"]))
    timed.clear()
    recovery_lengths.clear()
    k = 3
    result = _pruner(teacher_ckpt, rerank_top_k=k, rerank_recovery_steps=2, **kw).run_search(model, dm)
    assert recovery_lengths == [0, 2]  # the search's proxy, then one re-scorer for searched and uniform
    assert result["rerank"]["top_k"] == k and result["rerank"]["recovery_steps"] == 2
    assert [r["genes"] for r in result["verification"]["rejected"]] == [best["genes"]]
    for kind, pool, pick in (("searched", result["candidates"], result["chosen"]),
                             ("uniform", [u for u in result["uniform_candidates"] if "quality" in u], result["uniform"])):
        distinct = {tuple(r["genes"]): r["quality"] for r in pool if tuple(r["genes"]) not in unlucky}
        top = sorted(distinct.values(), reverse=True)[:k]
        rescored = result["rerank"][kind]
        assert len(rescored) == min(k, len(distinct))
        assert [r["quality"] for r in rescored] == top
        assert all(r["rerank_quality"] == -r["quality"] and r["verified_ms"] == 50.0 for r in rescored)
        assert pick["rerank_quality"] == max(r["rerank_quality"] for r in rescored)
        assert pick["quality"] == min(top)


def test_dense_timing_reference_cancels_a_change_of_machine_speed(tiny_setup, monkeypatch):
    """``latency_reference=dense``: a candidate timed while the machine runs 1.7x slower reads
    the same ms as before, ``candidate / dense now * dense at the start``."""
    import pruners.swiftpruner.pruner as sp

    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")
    model = BertClassifier.load_from_checkpoint(teacher_ckpt).model.eval()
    machine = {"slowdown": 1.0}
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    monkeypatch.setattr(sp, "measure_model_ms", lambda m, *a, **k: size(m) / 1e4 * machine["slowdown"])
    pruner = _pruner(teacher_ckpt, latency_reference="dense")
    space = pruner._space(model)
    importance = sp.taylor_importance(model, pruner._subsets(dm)[0])
    work = copy.deepcopy(model)
    genes = space.uniform(1, 1)
    pruner._timing_reference = (model, 7.0)  # the dense model took 7 ms at the search's start
    before = pruner._measure(work, importance, space, genes)
    machine["slowdown"] = 1.7
    after = pruner._measure(work, importance, space, genes)
    shrunk = size(sp.shrink_structured(work))
    assert before == pytest.approx(after) == pytest.approx(shrunk / size(model) * 7.0)
    pruner._timing_reference = None
    assert pruner._measure(work, importance, space, genes) == pytest.approx(shrunk / 1e4 * 1.7)  # absolute timing


def test_latency_reference_is_checked():
    with pytest.raises(PrunerConfigError, match="latency_reference"):
        SwiftPruner(latency_reference="teacher")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_importance_examples_come_from_the_configured_split(tiny_setup, split):
    """``importance_split``: the Taylor importance's examples are drawn from that split, the proxy's
    always from validation (disjoint from the importance's there), and with ``train`` the proxy
    subset does not depend on how many importance examples are drawn."""
    dm, teacher_ckpt, _ = tiny_setup
    dm.setup("fit")

    def rows(batches):  # each example's token ids without padding
        return [tuple(ids[m.bool()].tolist()) for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"])]

    def pool(name):
        return {tuple(torch.as_tensor(x["input_ids"]).tolist()) for x in dm.datasets[name]}

    assert not pool("train") & pool("validation")  # the check below can tell the splits apart
    n_imp = 4 if split == "train" else 2
    pruner = _pruner(teacher_ckpt, importance_split=split, importance_examples=n_imp, proxy_examples=3, search_seed=5)
    imp, proxy, _ = pruner._subsets(dm)
    assert len(rows(imp)) == n_imp and len(rows(proxy)) == 3
    assert set(rows(imp)) <= pool(split)
    assert set(rows(proxy)) <= pool("validation")
    assert not set(rows(imp)) & set(rows(proxy))
    if split == "train":
        _, proxy_more, _ = _pruner(teacher_ckpt, importance_split=split, importance_examples=9, proxy_examples=3, search_seed=5)._subsets(dm)
        assert rows(proxy_more) == rows(proxy)


def test_importance_split_is_checked():
    with pytest.raises(PrunerConfigError, match="importance_split"):
        SwiftPruner(importance_split="test")
