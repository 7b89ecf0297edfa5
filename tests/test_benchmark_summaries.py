"""Known-value tests of the SwiftPruner benchmark's curve summaries (benchmarks/swiftpruner_search.py)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark("swiftpruner_search")


def test_evaluations_to_reach_is_one_based_and_none_when_never():
    assert bench.evaluations_to_reach([0.1, 0.5, 0.7], 0.5) == 2
    assert bench.evaluations_to_reach([0.1, 0.5, 0.7], 0.8) is None


def test_mean_curve_comparison_known_values():
    curves = {
        "reinforced": [[0.2, 0.6, 0.6, 0.9], [0.4, 0.4, 0.8, 0.8]],  # mean 0.3, 0.5, 0.7, 0.85
        "random": [[0.2, 0.2, 0.6, 0.6], [0.4, 0.6, 0.6, 0.8]],  # mean 0.3, 0.4, 0.6, 0.7
    }
    out = bench.mean_curve_comparison(curves)
    assert out["mean_final_best_reward"] == pytest.approx({"reinforced": 0.85, "random": 0.7})
    assert out["evaluations_to_random_mean_final_best"] == {"reinforced": 3, "random": 4}
    assert out["evaluations_reinforced_mean_at_or_above_random"] == 4
    assert out["evaluations"] == 4


def test_mean_curve_comparison_cuts_to_the_shortest_curve():
    curves = {"reinforced": [[0.1, 0.2, 0.9], [0.1, 0.2]], "random": [[0.3, 0.3, 0.3], [0.3, 0.3, 0.3]]}
    out = bench.mean_curve_comparison(curves)
    assert out["evaluations"] == 2
    assert out["evaluations_to_random_mean_final_best"] == {"reinforced": None, "random": 1}
    assert out["evaluations_reinforced_mean_at_or_above_random"] == 0


def test_paired_comparison_counts_and_mean_difference():
    random = [[0.5, 0.6], [0.5, 0.7], [0.5, 0.5]]
    a = [[0.6, 0.7], [0.5, 0.6], [0.5, 0.5]]  # sooner, never (later), tie
    b = [[0.5, 0.6], [0.7, 0.7], [0.5, 0.5]]
    out = bench.paired_comparison(a, b, random)
    assert (out["a_sooner_to_random_best"], out["a_later_to_random_best"]) == (1, 1)
    assert (out["a_higher_final_best"], out["a_lower_final_best"]) == (1, 1)
    diffs = [0.1, -0.1, 0.0]
    assert out["mean_final_best_difference"] == pytest.approx(0.0)
    assert out["standard_error"] == pytest.approx(math.sqrt(sum(d * d for d in diffs) / 2) / math.sqrt(3))


def test_accuracy_gap_known_values():
    gap = bench.accuracy_gap([{"searched": 0.82, "uniform": 0.80}, {"searched": 0.80, "uniform": 0.81},
                              {"searched": 0.81, "uniform": 0.81}])
    assert gap["per_seed"] == pytest.approx([2.0, -1.0, 0.0])
    assert gap["mean"] == pytest.approx(1 / 3)
    assert gap["standard_error"] == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))  # sample SD of 2, -1, 0
    assert (gap["searched_higher"], gap["searched_lower"]) == (1, 1)
    assert bench.accuracy_gap([{"searched": 0.8, "uniform": 0.7}])["standard_error"] is None
    with pytest.raises(ValueError, match="at least one seed"):
        bench.accuracy_gap([])


retime = load_benchmark("swiftpruner_retime")


def test_interleaved_ratios_rotate_the_order_and_cancel_drift():
    # The machine slows down 1 ms per timing; each model's own cost is fixed. Ratios are
    # taken per round, and the order rotates so that no model always runs last.
    cost = {"dense": 10.0, "a": 5.0, "b": 4.0}
    calls = []

    def time_once(name):
        calls.append(name)
        return cost[name] + len(calls) - 1  # drift: +1 ms per measurement so far

    out = retime.interleaved_ratios(["dense", "a", "b"], time_once, rounds=3)
    assert calls == ["dense", "a", "b", "a", "b", "dense", "b", "dense", "a"]
    assert out["dense"]["ms"] == [10.0, 15.0, 17.0]
    assert out["a"]["ms"] == [6.0, 8.0, 13.0]
    assert out["a"]["ratio"] == pytest.approx([0.6, 8 / 15, 13 / 17])
    assert out["a"]["median_ratio"] == pytest.approx(0.6)
    assert out["dense"]["median_ratio"] == 1.0


def test_interleaved_ratios_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounds"):
        retime.interleaved_ratios(["dense"], lambda n: 1.0, rounds=0)
    with pytest.raises(ValueError, match="reference"):
        retime.interleaved_ratios(["a"], lambda n: 1.0, rounds=1)


def test_runs_with_checkpoints_skips_runs_whose_checkpoints_are_gone(tmp_path):
    runs = []
    for name, present in (("seed0", True), ("seed1", False)):
        run = tmp_path / name
        run.mkdir()
        ckpts = {k: run / f"{k}.ckpt" for k in ("dense", "pruned", "uniform")}
        for k, path in ckpts.items():
            if present or k == "dense":
                path.write_bytes(b"")
        (run / "results.json").write_text(json.dumps({k: {"checkpoint": str(p)} for k, p in ckpts.items()}))
        runs.append(run)
    timable, missing = retime.runs_with_checkpoints(runs)
    assert timable == [runs[0]]
    assert missing == {str(runs[1]): [str(runs[1] / "pruned.ckpt"), str(runs[1] / "uniform.ckpt")]}


finetune_seeds = load_benchmark("swiftpruner_finetune_seeds")


def test_finetune_seed_summary_known_values():
    runs = [
        {"seed": 0, "searched": [0.82, 0.80, 0.81], "uniform": [0.80, 0.80, 0.79]},  # means 0.81 vs 0.7967
        {"seed": 1, "searched": [0.80, 0.79, 0.78], "uniform": [0.81, 0.80, 0.79]},  # means 0.79 vs 0.80
    ]
    out = finetune_seeds.finetune_seed_summary(runs)
    assert [p["difference_points"] for p in out["per_seed"]] == pytest.approx([4 / 3, -1.0])
    assert out["per_seed"][0]["paired_differences_points"] == pytest.approx([2.0, 0.0, 2.0])
    assert out["mean_difference_points"] == pytest.approx(1 / 6)
    assert out["standard_error"] == pytest.approx(abs(4 / 3 + 1) / 2)  # two values: SD = |a - b| / sqrt 2
    assert (out["searched_higher"], out["searched_lower"]) == (1, 1)
    assert (out["pairs_searched_higher"], out["pairs_searched_lower"]) == (2, 3)
    # Sample variances (points^2) of the four picks: 1, 1/3, 1, 1 -> pooled SD sqrt(5/6).
    assert out["finetune_sd_points"] == pytest.approx(math.sqrt((1 + 1 / 3 + 1 + 1) / 4))
    assert out["finetune_noise_sd_of_difference_points"] == pytest.approx(math.sqrt(5 / 6) * math.sqrt(2 / 3))


def test_finetune_seed_summary_single_values_and_bad_input():
    one = finetune_seeds.finetune_seed_summary([{"seed": 0, "searched": [0.8], "uniform": [0.7]}])
    assert one["mean_difference_points"] == pytest.approx(10.0)
    assert one["standard_error"] is None and one["finetune_sd_points"] is None
    with pytest.raises(ValueError, match="at least one"):
        finetune_seeds.finetune_seed_summary([])
    with pytest.raises(ValueError, match="same number"):
        finetune_seeds.finetune_seed_summary([{"seed": 3, "searched": [0.8, 0.7], "uniform": [0.7]}])


proxy_study = load_benchmark("swiftpruner_proxy_study")


def test_proxy_agreement_known_values():
    picks = [
        {"run": "a", "score": 0.9, "test": 0.82}, {"run": "a", "score": 0.8, "test": 0.81},  # agrees
        {"run": "b", "score": 0.7, "test": 0.83}, {"run": "b", "score": 0.6, "test": 0.84},  # disagrees
        {"run": "c", "score": 0.5, "test": 0.80}, {"run": "c", "score": 0.4, "test": 0.80},  # tie in test: not counted
    ]
    out = proxy_study.agreement(picks, "score")
    assert (out["pairs_agree"], out["pairs"]) == (1, 2)
    # Ranks of score 6..1 against test ranks 4, 3, 5, 6, 1.5, 1.5: Pearson of the ranks.
    rs, rt = torch.tensor([6, 5, 4, 3, 2, 1.0]), torch.tensor([4, 3, 5, 6, 1.5, 1.5])
    expected = float(torch.corrcoef(torch.stack([rs, rt]))[0, 1])
    assert out["spearman"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="at least 3"):
        proxy_study.agreement(picks[:2], "score")


def test_proxies_of_the_teacher_itself():
    logits = torch.tensor([[2.0, -1.0], [0.5, 1.0], [-1.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 1])
    out = proxy_study.proxies(logits, labels, logits)
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["neg_kl_t1"] == pytest.approx(0.0, abs=1e-6) and out["neg_kl_t2"] == pytest.approx(0.0, abs=1e-6)
    assert out["neg_ce"] == pytest.approx(-float(torch.nn.functional.cross_entropy(logits, labels)))
