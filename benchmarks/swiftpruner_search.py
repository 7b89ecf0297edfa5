"""Benchmark: SwiftPruner on Rotten Tomatoes at a latency budget, mean over seeds (default 3).

    python benchmarks/swiftpruner_search.py                   # writes benchmarks/results/swiftpruner_search.json
    python benchmarks/swiftpruner_search.py --teacher-ckpt PATH --seeds 0

Every seed is one ``run.py model=bert pruner=swiftpruner`` run (composed from the real
configs) sharing one dense teacher (fine-tuned first by a ``pruner=none`` run unless
``--teacher-ckpt`` is given): it searches with the reinforced mutator under a budget of
``--budget-fraction`` (default 0.5) of the dense model's directly measured batch-1
latency (measured in the first seed's run; later seeds get the same budget in ms, or
``--budget-ms`` for all), fine-tunes the chosen model and the best uniform model within the same
measured budget (task loss + distillation), and tests and times both. A second,
search-only run per seed uses ``pruner.mutator=random`` with the same seed (same
generation 0), budget and lookup table (``pruner.latency_table``). Figures:

1. the chosen model's measured latency against the budget (must be within);
2. test accuracy of the searched minus the uniform model (mean over seeds);
3. best reward so far against candidate evaluations for both mutators, and the
   evaluations the reinforced mutator needs to reach the random mutator's best reward.

Writes ``<out>.json`` and ``<out>_curves.png``; each run's folder keeps its results.json,
search_history.json and search_pareto.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

import run  # noqa: E402
from pipelines.common import write_results  # noqa: E402


def run_job(overrides: list[str], reuse: bool = False) -> dict:
    """Compose the real config with ``overrides``, run it, return its results dict.

    With ``reuse``, a run whose output dir already holds a results.json with the same
    overrides is not run again (its results are read).
    """
    out_dir = Path(next(o for o in overrides if o.startswith("paths.output_dir=")).split("=", 1)[1])
    done = out_dir / "results.json"
    if reuse and done.is_file():
        results = json.loads(done.read_text())
        if results.get("benchmark_overrides") == overrides:
            return results
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=["model=bert", "logger=csv", *overrides])
    results = run.train(cfg)
    results["benchmark_overrides"] = overrides
    write_results(out_dir, results)
    return results


def evaluations_to_reach(curve: list[float], target: float) -> int | None:
    """1-based number of evaluations after which ``curve`` (best reward so far) reaches ``target``; None if never."""
    for i, r in enumerate(curve):
        if r >= target - 1e-12:
            return i + 1
    return None


def plot_curves(curves: dict[str, list[list[float]]], path: Path) -> None:
    """Mean best-reward-so-far curve of each mutator over seeds (thin lines: single seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, runs), color in zip(curves.items(), ("tab:red", "tab:blue")):
        n = min(len(c) for c in runs)
        for c in runs:
            ax.plot(range(1, len(c) + 1), c, color=color, lw=0.6, alpha=0.4)
        ax.plot(range(1, n + 1), [statistics.mean(c[i] for c in runs) for i in range(n)], color=color, lw=2,
                label=f"{name} mutator (mean of {len(runs)} seeds)")
    ax.set_xlabel("candidate evaluations")
    ax.set_ylabel("best reward so far")
    ax.set_title("SwiftPruner: reinforced vs random mutator")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Run the benchmark and write its figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-fraction", type=float, default=0.5)
    parser.add_argument("--budget-ms", type=float, default=None,
                        help="budget in ms for every seed; default: --budget-fraction of the first run's dense latency")
    parser.add_argument("--teacher-ckpt", default=None, help="dense BertClassifier checkpoint; default: fine-tune one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "swiftpruner_search"))
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs with the same overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")  # the search's progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"threads={args.threads}", f"pruner.budget_fraction={args.budget_fraction}", *args.extra]
    started = time.time()

    teacher = args.teacher_ckpt
    if teacher is None:
        dense = run_job(["pruner=none", "trainer.max_epochs=1", f"threads={args.threads}",
                         f"paths.output_dir={out / 'teacher'}"])
        teacher = dense["dense"]["checkpoint"]

    per_seed = []
    curves: dict[str, list[list[float]]] = {"reinforced": [], "random": []}
    budget_ms = args.budget_ms
    for seed in args.seeds:
        # One budget in ms for every seed: the first run's fraction of its measured dense latency
        # (or --budget-ms), so the seeds differ only in the search, not in how loaded the machine was.
        budget = [] if budget_ms is None else [f"pruner.latency_budget_ms={budget_ms}"]
        full = run_job(["pruner=swiftpruner", f"seed={seed}", f"pruner.teacher_ckpt={teacher}",
                        f"paths.output_dir={out / f'seed{seed}'}", *common, *budget], reuse=args.reuse)
        budget_ms = full["search"]["budget_ms"]
        # Same seed (same generation 0), the same budget in ms and the same lookup table, so both mutators
        # see the same rewards and the curves compare.
        rand = run_job(["pruner=swiftpruner", f"seed={seed}", f"pruner.teacher_ckpt={teacher}", "pruner.mutator=random",
                        "pruner.search_only=true", f"pruner.latency_budget_ms={full['search']['budget_ms']}",
                        f"pruner.latency_table={out / f'seed{seed}' / 'latency_table.json'}",
                        f"paths.output_dir={out / f'random_seed{seed}'}", *common], reuse=args.reuse)
        s, r = full["search"], rand["search"]
        curves["reinforced"].append(s["best_reward_curve"])
        curves["random"].append(r["best_reward_curve"])
        random_best = r["best_reward_curve"][-1]
        per_seed.append({
            "seed": seed,
            "budget_ms": s["budget_ms"],
            "dense_ms": s["dense_ms"],
            "chosen": {"heads": s["chosen"]["heads"], "ffn_neurons": s["chosen"]["ffn_neurons"],
                       "predicted_ms": s["chosen"]["predicted_ms"], "measured_ms": s["chosen"]["measured_ms"],
                       "within_budget": s["chosen"]["measured_ms"] <= s["budget_ms"]},
            "uniform": {"heads": s["uniform"]["heads"][0], "ffn_neurons": s["uniform"]["ffn_neurons"][0],
                        "measured_ms": s["uniform"]["measured_ms"]},
            "test_accuracy": {"dense": full["dense"]["metrics"]["accuracy"],
                              "searched": full["pruned"]["metrics"]["accuracy"],
                              "uniform": full["uniform"]["metrics"]["accuracy"]},
            "speedup": {"searched": full["speedup"], "uniform": full["uniform"]["speedup"]},
            "macs_reduction": {"searched": full["macs_reduction"], "uniform": full["uniform"]["macs_reduction"]},
            "predictor_error_mean_abs_pct": s["predictor_error"]["mean_abs_pct"],
            "two_anchor_predictor_error_mean_abs_pct": s["predictor_error"].get("two_anchor_fit_mean_abs_pct"),
            "evaluations": {"reinforced": s["evaluations"], "random": r["evaluations"]},
            "random_best_reward": random_best,
            "reinforced_best_reward": s["best_reward_curve"][-1],
            "evaluations_to_random_best": {
                "reinforced": evaluations_to_reach(s["best_reward_curve"], random_best),
                "random": evaluations_to_reach(r["best_reward_curve"], random_best),
            },
            "run_dirs": {"reinforced": str(out / f"seed{seed}"), "random": str(out / f"random_seed{seed}")},
        })

    mean = lambda xs: statistics.mean(xs) if xs else None  # noqa: E731
    acc = [p["test_accuracy"] for p in per_seed]
    reach = [p["evaluations_to_random_best"] for p in per_seed]
    summary = {
        "teacher_ckpt": teacher,
        "budget_fraction_of_dense_batch1": args.budget_fraction,
        "seeds": args.seeds,
        "all_chosen_within_budget": all(p["chosen"]["within_budget"] for p in per_seed),
        "mean_test_accuracy": {k: mean([a[k] for a in acc]) for k in ("dense", "searched", "uniform")},
        "mean_searched_minus_uniform_points": mean([100 * (a["searched"] - a["uniform"]) for a in acc]),
        "mean_speedup_batch1": {k: mean([p["speedup"][k]["1"] for p in per_seed]) for k in ("searched", "uniform")},
        "mean_evaluations_to_random_best": {
            k: mean([x[k] for x in reach if x[k] is not None]) for k in ("reinforced", "random")
        },
        "reinforced_reached_random_best_in_fewer_evaluations": sum(
            1 for x in reach if x["reinforced"] is not None and x["reinforced"] < x["random"]
        ),
        "mean_predictor_error_abs_pct": mean([p["predictor_error_mean_abs_pct"] for p in per_seed]),
        "mean_two_anchor_predictor_error_abs_pct": mean(
            [p["two_anchor_predictor_error_mean_abs_pct"] for p in per_seed if p["two_anchor_predictor_error_mean_abs_pct"] is not None]
        ),
        "per_seed": per_seed,
        "curves": curves,
        "wall_clock_s": round(time.time() - started),
    }
    plot_curves(curves, Path(f"{out}_curves.png"))
    Path(f"{out}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("per_seed", "curves")}, indent=2))


if __name__ == "__main__":
    main()
