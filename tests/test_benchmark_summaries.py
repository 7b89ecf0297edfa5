"""Known-value tests of the SwiftPruner benchmarks' summaries (benchmarks/swiftpruner_search.py, swiftpruner_retime.py)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest


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
    assert missing == {bench.relative(runs[1]): [bench.relative(runs[1] / "pruned.ckpt"), bench.relative(runs[1] / "uniform.ckpt")]}
    assert not any(Path(p).is_absolute() for p in [*missing, *missing[bench.relative(runs[1])]])


def test_command_line_holds_relative_paths_only(tmp_path):
    root = bench.ROOT
    cmd = bench.command_line("benchmarks/swiftpruner_search.py", [
        "--teacher-ckpt", str(root / "outputs" / "t.ckpt"), f"--runs={tmp_path}", "--extra", f"pruner.latency.table={root / 'x.json'}",
        "pruner.search.generations=8", "--seeds", "0", "1"])
    assert cmd.startswith("python benchmarks/swiftpruner_search.py --teacher-ckpt outputs/t.ckpt ")
    assert "pruner.latency.table=x.json pruner.search.generations=8 --seeds 0 1" in cmd
    assert not any(token.split("=")[-1].startswith("/") for token in cmd.split())  # no absolute path
    assert f"--runs={bench.relative(tmp_path)}" in cmd


def _results(searched: float, uniform: float, verified: float) -> dict:
    """A reinforced run's results.json as the text pipeline writes it (the fields the benchmark reads)."""
    pick = {"heads": [4, 4], "ffn_neurons": [8, 8], "predicted_ms": 4.0, "measured_ms": 4.1, "verified_ms": verified, "quality": 0.9}
    search = {"budget_ms": 5.0, "search_budget_ms": 4.85, "dense_ms": 10.0, "chosen": pick, "uniform": dict(pick),
              "verification": {"rejected": [{}], "rejected_uniform": []}, "best_reward_curve": [0.5, 0.7, 0.9],
              "predictor_error": {"mean_abs_pct": 3.0, "two_anchor_fit_mean_abs_pct": 6.0}}
    return {"pruner": search, "dense": {"metrics": {"accuracy": 0.85}}, "pruned": {"metrics": {"accuracy": searched}},
            "uniform": {"metrics": {"accuracy": uniform}, "speedup": {"1": 1.9}, "macs_reduction": 2.1},
            "speedup": {"1": 2.0}, "macs_reduction": 2.2}


def test_seed_figures_and_their_summary_known_values():
    first = bench.seed_figures(_results(0.82, 0.80, 4.5), random_curve=[0.5, 0.6, 0.7, 0.8])
    assert first["chosen"]["within_budget"] and first["rejected_on_re_measurement"] == {"searched": 1, "uniform": 0}
    assert first["test_accuracy"] == {"dense": 0.85, "searched": 0.82, "uniform": 0.80}
    assert first["evaluations_to_random_best"] == {"reinforced": 3, "random": 4}
    assert first["evaluations"] == {"reinforced": 3, "random": 4} and first["best_reward"] == {"reinforced": 0.9, "random": 0.8}
    second = bench.seed_figures(_results(0.80, 0.81, 5.5), random_curve=[0.95, 0.95, 0.95])
    assert not second["chosen"]["within_budget"] and second["evaluations_to_random_best"] == {"reinforced": None, "random": 1}
    out = bench.summarise([first, second], {"reinforced": [[0.5, 0.7, 0.9]] * 2, "random": [[0.5, 0.6, 0.7, 0.8], [0.95] * 3]})
    assert out["all_chosen_within_budget"] is False
    assert out["searched_minus_uniform_points"]["per_seed"] == pytest.approx([2.0, -1.0])
    assert out["mean_test_accuracy"]["searched"] == pytest.approx(0.81)
    assert out["reinforced_reached_random_best_in_fewer_evaluations"] == 1
    assert out["mean_evaluations_to_random_best"] == {"reinforced": 3, "random": 2.5}
    assert out["mean_speedup_batch1"] == pytest.approx({"searched": 2.0, "uniform": 1.9})
    json.dumps(out)


def test_sweep_teacher_reuse_adds_the_dense_fit_back_for_each_cached_job(tmp_path):
    """Known values: two jobs of 700 s and 300 s, the first fitted the teacher in 400 s (config written at t=1000,
    dense record at t=1400), the second took it from the cache: separate runs would take 700 + 300 + 400 s."""
    import os

    sweep_bench = load_benchmark("sweep_teacher_reuse")
    for job, hit, wall in (("0", False, 700), ("1", True, 300)):
        d = tmp_path / job
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text("seed: 42\n")
        (d / ".hydra" / "overrides.yaml").write_text(f"- pruner.target_sparsity=0.{job}\n")
        (d / "checkpoints" / "dense").mkdir(parents=True)
        (d / "checkpoints" / "dense" / "complete.json").write_text("{}")
        os.utime(d / ".hydra" / "config.yaml", (1000, 1000))
        os.utime(d / "checkpoints" / "dense" / "complete.json", (1400, 1400))
        results = {"teacher_cache": {"hit": hit}, "wall_clock_s": wall, "dense": {"metrics": {"accuracy": 0.8}},
                   "pruned": {"metrics": {"accuracy": 0.79}, "speedup_onnxruntime": {"1": 1.3}}}
        (d / "results.json").write_text(json.dumps(results))
    out = sweep_bench.summarise(tmp_path, 1010.0, ["pruner.target_sparsity=0.0,0.1"])
    assert out["dense_fit_s"] == 400 and out["teacher_fits"] == 1
    assert out["separate_runs_estimate_s"] == 1400 and out["saving_fraction"] == pytest.approx(1 - 1010 / 1400, abs=1e-3)
    assert [j["overrides"] for j in out["jobs"]] == [["pruner.target_sparsity=0.0"], ["pruner.target_sparsity=0.1"]]
    assert out["jobs"][0]["drop_points"] == pytest.approx(1.0)
