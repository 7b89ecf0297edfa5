"""Benchmark: SwiftPruner on Rotten Tomatoes at a latency budget, mean over seeds (default 3).

    python benchmarks/swiftpruner_search.py                   # writes benchmarks/results/swiftpruner_search.json
    python benchmarks/swiftpruner_search.py --teacher-ckpt PATH --seeds 0

Every seed is one ``run.py model=bert pruner=swiftpruner`` run (composed from the real
configs) sharing one dense teacher (fine-tuned first by a ``pruner=none`` run unless
``--teacher-ckpt`` is given): it searches with the reinforced mutator under a budget of
``--budget-fraction`` (default 0.5) of the dense model's directly measured batch-1
latency (or ``--budget-ms`` for all), fine-tunes the chosen model and the best uniform model within the same
measured budget (task loss + distillation), and tests and times both. With
``--latency-reference dense`` (the default) every timing follows a timing of the dense
model (``pruner.latency_reference=dense``) and each run's budget is ``--budget-fraction`` of
its own dense latency, so the budget means the same fraction of dense on every seed;
``--latency-reference none`` times absolutely and carries the first run's budget in ms over. A second,
search-only run per seed uses ``pruner.mutator=random`` with the same seed (same
generation 0), budget in ms and lookup table (``pruner.latency_table``), so its rewards
compare with the reinforced run's; its own pick is not used. Figures:

1. the chosen model's measured latency against the budget (must be within; the median of
   ``pruner.verify_rounds`` re-measurements when they are on);
2. test accuracy of the searched minus the uniform model (mean over seeds);
3. best reward so far against candidate evaluations for both mutators, the evaluations
   the reinforced mutator needs to reach the random mutator's best reward per seed, and
   the same for the mean curves over seeds (``mean_curves``).

Writes ``<out>.json`` and ``<out>_curves.png``; each run's folder keeps its results.json,
search_history.json and search_pareto.png.

Two cheaper modes compare only the mutators:

    python benchmarks/swiftpruner_search.py --toy --threads 1      # seconds; <out>_toy.json
    python benchmarks/swiftpruner_search.py --mutators-only --threads 1 --teacher-ckpt PATH \
        --budget-ms 8.99 --out benchmarks/results/swiftpruner_search_mutators --extra pruner.generations=8

``--toy`` runs both mutators on :func:`toy_problem` (many seeds, synthetic quality, the
real lookup table's latencies) with the default reinforced settings and ablations.
``--mutators-only`` runs, per seed and in one process, the random then the reinforced
search only (no fine-tuning) on the real model, with the seed's saved lookup table
(``--tables``) and one cache of proxy scores shared by both searches.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

import run  # noqa: E402
from pipelines.common import write_results  # noqa: E402


def compose_config(overrides: list[str]):
    """The real config (``conf/``) for ``model=bert logger=csv`` plus ``overrides`` (Hydra syntax)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=["model=bert", "logger=csv", *overrides])


def finished_results(out_dir: Path, overrides: list[str]) -> dict | None:
    """The results.json in ``out_dir`` if it was written with the same ``benchmark_overrides``, else None."""
    done = Path(out_dir) / "results.json"
    if done.is_file():
        results = json.loads(done.read_text())
        if results.get("benchmark_overrides") == overrides:
            return results
    return None


def benchmark_runs(bench: Path) -> list[Path]:
    """The ``seed<N>`` run folders of a benchmark output that hold a results.json, by seed."""
    return sorted((p.parent for p in Path(bench).glob("seed*/results.json")), key=lambda p: int(p.name[4:]))


def run_job(overrides: list[str], reuse: bool = False) -> dict:
    """Compose the real config with ``overrides``, run it, return its results dict.

    With ``reuse``, a run whose output dir already holds a results.json with the same
    overrides is not run again (its results are read).
    """
    out_dir = Path(next(o for o in overrides if o.startswith("paths.output_dir=")).split("=", 1)[1])
    if reuse and (results := finished_results(out_dir, overrides)) is not None:
        return results
    results = run.train(compose_config(overrides))
    results["benchmark_overrides"] = overrides
    write_results(out_dir, results)
    return results


def evaluations_to_reach(curve: list[float], target: float) -> int | None:
    """1-based number of evaluations after which ``curve`` (best reward so far) reaches ``target``; None if never."""
    for i, r in enumerate(curve):
        if r >= target - 1e-12:
            return i + 1
    return None


def mean_curve(runs: list[list[float]]) -> list[float]:
    """Mean over seeds of best-reward-so-far curves, cut to the shortest."""
    return [statistics.mean(c[i] for c in runs) for i in range(min(len(c) for c in runs))]


def mean_curve_comparison(curves: dict[str, list[list[float]]]) -> dict:
    """The mutators' mean best-reward-so-far curves over seeds, compared.

    ``curves[name][i]`` is seed ``i``'s curve (one value per candidate evaluation), for
    ``name`` in ``reinforced`` and ``random``; curves are cut to the shortest. Returns the mean
    final best reward of each, the evaluations each mean curve needs to reach the random
    mean curve's final value, and at how many evaluations the reinforced mean is >= the random one.
    """
    n = min(len(c) for runs in curves.values() for c in runs)
    mean = {k: mean_curve(curves[k])[:n] for k in ("reinforced", "random")}
    target = mean["random"][-1]
    return {
        "mean_final_best_reward": {k: v[-1] for k, v in mean.items()},
        "evaluations_to_random_mean_final_best": {k: evaluations_to_reach(v, target) for k, v in mean.items()},
        "evaluations_reinforced_mean_at_or_above_random": sum(a >= b - 1e-12 for a, b in zip(mean["reinforced"], mean["random"])),
        "evaluations": n,
    }


def plot_curves(curves: dict[str, list[list[float]]], path: Path) -> None:
    """Mean best-reward-so-far curve of each mutator over seeds (thin lines: single seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, runs), color in zip(curves.items(), ("tab:red", "tab:blue")):
        for c in runs:
            ax.plot(range(1, len(c) + 1), c, color=color, lw=0.6, alpha=0.4)
        mean = mean_curve(runs)
        ax.plot(range(1, len(mean) + 1), mean, color=color, lw=2, label=f"{name} mutator (mean of {len(runs)} seeds)")
    ax.set_xlabel("candidate evaluations")
    ax.set_ylabel("best reward so far")
    ax.set_title("SwiftPruner: reinforced vs random mutator")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- mutator comparison
def summarise_mutators(curves: dict[str, list[list[float]]], seeds: list[int]) -> dict:
    """Per seed and overall: evaluations each mutator needs to reach the random mutator's final best reward.

    ``curves[name][i]`` is the best-reward-so-far curve of seed ``seeds[i]``. A reinforced
    search that never reaches it counts as not sooner (and is left out of the means).
    """
    per_seed, reach = [], []
    for i, seed in enumerate(seeds):
        rand, rl = curves["random"][i], curves["reinforced"][i]
        target = rand[-1]
        x = {"reinforced": evaluations_to_reach(rl, target), "random": evaluations_to_reach(rand, target)}
        reach.append(x)
        per_seed.append({"seed": seed, "random_best_reward": target, "reinforced_best_reward": rl[-1],
                         "evaluations": {"reinforced": len(rl), "random": len(rand)}, "evaluations_to_random_best": x})
    reached = [x["reinforced"] for x in reach if x["reinforced"] is not None]
    return {
        "seeds": len(seeds),
        "reinforced_sooner": sum(1 for x in reach if x["reinforced"] is not None and x["reinforced"] < x["random"]),
        "reinforced_reached": len(reached),
        "reinforced_higher_final_best": sum(1 for p in per_seed if p["reinforced_best_reward"] > p["random_best_reward"]),
        "mean_evaluations_to_random_best": {"reinforced (seeds that reached it)": statistics.mean(reached) if reached else None,
                                            "random": statistics.mean(x["random"] for x in reach)},
        "median_evaluations_to_random_best": {
            "reinforced (never = inf)": statistics.median([x["reinforced"] or math.inf for x in reach]),
            "random": statistics.median(x["random"] for x in reach)},
        "mean_final_best_reward": {k: statistics.mean(c[-1] for c in curves[k]) for k in ("reinforced", "random")},
        "mean_curves": mean_curve_comparison(curves),
        "per_seed": per_seed,
    }


def toy_problem(seed: int, table, importance_noise: float = 0.5, quality_noise: float = 0.003):
    """A synthetic search resembling the MiniLM one: (space, objective, budget_ms, estimated importance).

    6 layers, the choices and additive latency of ``table`` (a real lookup table), budget 50% of
    the dense prediction. True unit importances are exponential with a log-normal scale per
    layer and kind; quality = 0.5 + 0.4 * concave(kept importance share, heads and FFN
    weighted) + deterministic per-genes noise (sd ``quality_noise``, like a proxy on a small
    subset). The mutator gets the true importances times log-normal noise (``importance_noise``),
    as Taylor importance is only an estimate.
    """
    from modules.structured import UnitImportance
    from pruners.swiftpruner.evolution import SearchSpace

    space = SearchSpace(table.num_layers, tuple(table.head_choices), tuple(table.neuron_choices))
    g = torch.Generator().manual_seed(10_000 + seed)
    L, A, I = table.num_layers, table.head_choices[-1], table.neuron_choices[-1]
    heads = torch.exp(torch.randn(L, 1, generator=g)) * -torch.rand(L, A, generator=g).log()
    neurons = torch.exp(torch.randn(L, 1, generator=g)) * -torch.rand(L, I, generator=g).log()
    estimate = UnitImportance(heads * torch.exp(importance_noise * torch.randn(L, A, generator=g)),
                              neurons * torch.exp(importance_noise * torch.randn(L, I, generator=g)))
    share = [torch.cat([torch.zeros(L, 1), x.sort(1, descending=True).values.cumsum(1)], 1) / x.sum() for x in (heads, neurons)]
    w_heads = 0.25 + 0.5 * float(torch.rand(1, generator=g))
    salt = int(torch.randint(1 << 30, (1,), generator=g))

    def objective(genes):
        h, n = space.decode(genes)
        kept = sum(w_heads * float(share[0][l, h[l]]) + (1 - w_heads) * float(share[1][l, n[l]]) for l in range(L))
        noise = float(torch.randn(1, generator=torch.Generator().manual_seed(hash((salt, *genes)) % (1 << 62))))
        return 0.5 + 0.4 * (1 - math.exp(-4 * kept / L)) / (1 - math.exp(-4)) + quality_noise * noise, table.predict_ms(h, n)

    budget = 0.5 * table.predict_ms([A] * L, [I] * L)
    return space, objective, budget, estimate


def standard_error(xs: list[float]) -> float | None:
    """Standard error of the mean of ``xs`` (sample SD / sqrt(n)); None for fewer than 2 values."""
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None


def paired_comparison(a: list[list[float]], b: list[list[float]], random: list[list[float]]) -> dict:
    """Variant ``a`` against ``b`` seed by seed (same seeds, same order): which reaches the
    random mutator's final best reward sooner, which ends with the higher best reward, and
    the mean difference of final best rewards (``a - b``, reward units) with its standard error."""
    sooner = later = 0
    for ca, cb, cr in zip(a, b, random):
        ea, eb = (evaluations_to_reach(c, cr[-1]) or math.inf for c in (ca, cb))
        sooner, later = sooner + (ea < eb), later + (ea > eb)
    diffs = [ca[-1] - cb[-1] for ca, cb in zip(a, b)]
    return {
        "seeds": len(diffs),
        "a_sooner_to_random_best": sooner,
        "a_later_to_random_best": later,
        "a_higher_final_best": sum(d > 1e-12 for d in diffs),
        "a_lower_final_best": sum(d < -1e-12 for d in diffs),
        "mean_final_best_difference": statistics.mean(diffs),
        "standard_error": standard_error(diffs),
    }


def accuracy_gap(test_accuracy: list[dict[str, float]]) -> dict:
    """Searched minus uniform test accuracy, in points (100 x fraction), seed by seed.

    Args:
        test_accuracy: one ``{"searched": fraction, "uniform": fraction, ...}`` per seed.

    Returns:
        ``per_seed`` differences, their ``mean``, ``standard_error`` of the mean (sample SD /
        sqrt(seeds); None for one seed), and how many seeds the searched model won and lost.

    Raises:
        ValueError: no seeds.
    """
    if not test_accuracy:
        raise ValueError("accuracy_gap needs at least one seed's test accuracies.")
    diffs = [100 * (a["searched"] - a["uniform"]) for a in test_accuracy]
    return {
        "per_seed": diffs,
        "mean": statistics.mean(diffs),
        "standard_error": standard_error(diffs),
        "searched_higher": sum(d > 0 for d in diffs),
        "searched_lower": sum(d < 0 for d in diffs),
    }


def toy_study(args) -> None:
    """Reinforced vs random mutator on :func:`toy_problem`, many seeds; writes ``<out>_toy.json``."""
    from pruners.swiftpruner.evolution import EvolutionarySearch, RandomMutator
    from pruners.swiftpruner.latency_table import LatencyTable
    from pruners.swiftpruner import SwiftPruner

    table = LatencyTable.from_state_dict(json.loads(Path(args.toy_table).read_text()))
    variants = {
        "reinforced (defaults: prior + REINFORCE)": {},
        "prior only (policy_lr=1e-12: no learning)": {"policy_lr": 1e-12},
        "REINFORCE from a uniform start (policy_prior=0)": {"policy_prior": 0.0},
        "REINFORCE from a uniform start, MLP 32 (policy_prior=0, policy_hidden=32)": {"policy_prior": 0.0, "policy_hidden": 32},
    }
    seeds = list(range(args.toy_seeds))
    out: dict = {"setting": {"layers": table.num_layers, "head_choices": table.head_choices, "neuron_choices": table.neuron_choices,
                             "latency_table": args.toy_table, "budget": "50% of the dense prediction", "population_size": 16,
                             "parents": 4, "generations": args.toy_generations, "seeds": len(seeds)}, "variants": {}}
    random_curves = []
    for seed in seeds:
        space, objective, budget, _ = toy_problem(seed, table)
        random_curves.append(EvolutionarySearch(space, objective, budget, RandomMutator(), generations=args.toy_generations,
                                                seed=seed).run().best_reward_curve())
    all_curves: dict[str, list[list[float]]] = {}
    for name, overrides in variants.items():
        curves = all_curves[name] = []
        for seed in seeds:
            space, objective, budget, estimate = toy_problem(seed, table)
            pruner = SwiftPruner(search_seed=seed, **overrides)
            mutator = pruner.build_mutator(space, table, estimate, budget)
            curves.append(EvolutionarySearch(space, objective, budget, mutator, generations=args.toy_generations,
                                             seed=seed).run().best_reward_curve())
        summary = summarise_mutators({"reinforced": curves, "random": random_curves}, seeds)
        summary.pop("per_seed")
        out["variants"][name] = summary
        print(name, json.dumps(summary), flush=True)
    names = list(variants)
    out["learning_vs_prior_only"] = paired_comparison(all_curves[names[0]], all_curves[names[1]], random_curves)
    print("learning vs prior only", json.dumps(out["learning_vs_prior_only"]), flush=True)
    Path(f"{args.out}_toy.json").write_text(json.dumps(out, indent=2) + "\n")


def mutator_study(args) -> None:
    """Both mutators' searches per seed in one process, sharing the seed's proxy scores and lookup table.

    Search only (no fine-tuning): composes the real config (``pruner=swiftpruner``), loads the
    dense teacher, and runs :meth:`SwiftPruner.run_search` with ``pruner.mutator=random`` then
    ``reinforced``, one quality cache per seed (the proxy of a genes is the same for both).
    Writes ``<out>.json`` (``mutator_comparison``) and ``<out>_curves.png``.
    """
    from pipelines.common import build
    from modules.bert_classifier import BertClassifier

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    curves: dict[str, list[list[float]]] = {"random": [], "reinforced": []}
    runs = []
    for seed in args.seeds:
        table = Path(args.tables) / f"seed{seed}" / "latency_table.json"
        overrides = ["pruner=swiftpruner", f"seed={seed}", f"pruner.teacher_ckpt={args.teacher_ckpt}", "pruner.search_only=true",
                     f"pruner.latency_budget_ms={args.budget_ms}", f"pruner.latency_table={table}", f"threads={args.threads}",
                     # the direct timing of every candidate is not used here (rewards use the saved table)
                     "pruner.latency_warmup=0", "pruner.latency_repeats=1", *args.extra]
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose("config", overrides=["model=bert", "logger=none", *overrides])
        torch.manual_seed(seed)
        datamodule = build(cfg.data)
        datamodule.setup("fit")
        model = BertClassifier.load_from_checkpoint(args.teacher_ckpt, map_location="cpu").model.eval()
        cache: dict = {}
        if args.scores_from:  # proxy scores of an earlier report (same teacher and seed: same importance and subsets)
            earlier = json.loads(Path(args.scores_from).read_text())
            if earlier["teacher_ckpt"] != args.teacher_ckpt:
                raise SystemExit(f"--scores-from {args.scores_from} used another teacher ({earlier['teacher_ckpt']}).")
            for run_ in earlier["runs"]:
                if run_["seed"] == seed:
                    cache.update({tuple(r["genes"]): r["quality"] for r in run_["history"]})
        for name in ("random", "reinforced"):
            started = time.time()
            pruner = build(cfg.pruner)
            pruner.mutator = name
            result = pruner.run_search(model, datamodule, quality_cache=cache)
            curves[name].append(result["best_reward_curve"])
            best = max(result["candidates"], key=lambda r: r["reward"])
            runs.append({"seed": seed, "mutator": name, "evaluations": result["evaluations"], "seconds": round(time.time() - started),
                         "best": {k: best[k] for k in ("heads", "ffn_neurons", "quality", "predicted_ms", "reward")},
                         "history": [{k: r[k] for k in ("evaluation", "generation", "genes", "quality", "predicted_ms", "reward")}
                                     for r in result["candidates"]]})
            logging.info("seed %d %s: best reward %.4f after %d evaluations (%.0f s)", seed, name,
                         result["best_reward_curve"][-1], result["evaluations"], time.time() - started)
        summary = summarise_mutators(curves, args.seeds[: len(curves["random"])])
        report = {"teacher_ckpt": args.teacher_ckpt, "budget_ms": args.budget_ms, "latency_tables": args.tables,
                  "overrides": overrides, "mutator_comparison": summary, "curves": curves, "runs": runs}
        Path(f"{out}.json").write_text(json.dumps(report, indent=1) + "\n")  # after every seed
        plot_curves(curves, Path(f"{out}_curves.png"))
        print(json.dumps({k: v for k, v in summary.items() if k != "per_seed"}), flush=True)



def main() -> None:
    """Run the benchmark and write its figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-fraction", type=float, default=0.5)
    parser.add_argument("--budget-ms", type=float, default=None,
                        help="budget in ms for every seed; default: --budget-fraction of each run's own dense latency "
                             "(of the first run's with --latency-reference none)")
    parser.add_argument("--latency-reference", choices=("none", "dense"), default="dense",
                        help="pruner.latency_reference; with dense every run's budget is --budget-fraction of its own "
                             "dense latency (timings are relative to the dense model, so no ms budget is carried over)")
    parser.add_argument("--teacher-ckpt", default=None, help="dense BertClassifier checkpoint; default: fine-tune one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "swiftpruner_search"))
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs with the same overrides")
    parser.add_argument("--mutators-only", action="store_true",
                        help="only the mutator comparison: search-only, both mutators in one process per seed sharing proxy "
                             "scores, rewards from the saved lookup tables (--tables, --budget-ms, --teacher-ckpt needed)")
    parser.add_argument("--tables", default=str(ROOT / "benchmarks" / "results" / "swiftpruner_search"),
                        help="folder with seed<N>/latency_table.json (--mutators-only)")
    parser.add_argument("--scores-from", default=None,
                        help="(--mutators-only) reuse the proxy scores of an earlier --mutators-only report, same teacher")
    parser.add_argument("--toy", action="store_true", help="only the toy mutator study (synthetic objective, seconds)")
    parser.add_argument("--toy-seeds", type=int, default=40)
    parser.add_argument("--toy-generations", type=int, default=10)
    parser.add_argument("--toy-table", default=str(ROOT / "benchmarks" / "results" / "swiftpruner_search" / "seed0" / "latency_table.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")  # the search's progress
    if args.toy:
        torch.set_num_threads(args.threads)
        return toy_study(args)
    if args.mutators_only:
        if args.teacher_ckpt is None or args.budget_ms is None:
            parser.error("--mutators-only needs --teacher-ckpt and --budget-ms")
        return mutator_study(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"threads={args.threads}", f"pruner.budget_fraction={args.budget_fraction}",
              f"pruner.latency_reference={args.latency_reference}", *args.extra]
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
        # With a dense timing reference each run's timings are fractions of its own dense model, so
        # each run takes --budget-fraction of its own dense latency instead.
        budget = [] if budget_ms is None else [f"pruner.latency_budget_ms={budget_ms}"]
        full = run_job(["pruner=swiftpruner", f"seed={seed}", f"pruner.teacher_ckpt={teacher}",
                        f"paths.output_dir={out / f'seed{seed}'}", *common, *budget], reuse=args.reuse)
        if args.latency_reference == "none":
            budget_ms = full["search"]["budget_ms"]
        # Same seed (same generation 0), the same budget in ms and the same lookup table, so both mutators
        # see the same rewards and the curves compare.
        # Its pick is not used, so it skips any re-ranking of the pick (pruner.rerank_top_k).
        rand_common = [o for o in common if not o.startswith("pruner.rerank_top_k=")]
        if len(rand_common) < len(common):
            rand_common.append("pruner.rerank_top_k=0")
        rand = run_job(["pruner=swiftpruner", f"seed={seed}", f"pruner.teacher_ckpt={teacher}", "pruner.mutator=random",
                        "pruner.search_only=true", f"pruner.latency_budget_ms={full['search']['budget_ms']}",
                        f"pruner.latency_table={out / f'seed{seed}' / 'latency_table.json'}",
                        f"paths.output_dir={out / f'random_seed{seed}'}", *rand_common], reuse=args.reuse)
        s, r = full["search"], rand["search"]
        curves["reinforced"].append(s["best_reward_curve"])
        curves["random"].append(r["best_reward_curve"])
        random_best = r["best_reward_curve"][-1]
        per_seed.append({
            "seed": seed,
            "budget_ms": s["budget_ms"],
            "search_budget_ms": s.get("search_budget_ms", s["budget_ms"]),
            "dense_ms": s["dense_ms"],
            "chosen": {"heads": s["chosen"]["heads"], "ffn_neurons": s["chosen"]["ffn_neurons"],
                       "predicted_ms": s["chosen"]["predicted_ms"], "measured_ms": s["chosen"]["measured_ms"],
                       "verified_ms": s["chosen"].get("verified_ms"), "verify_rounds_ms": s["chosen"].get("verify_rounds_ms"),
                       "within_budget": s["chosen"].get("verified_ms", s["chosen"]["measured_ms"]) <= s["budget_ms"],
                       "proxy": s["chosen"]["quality"], "rerank_proxy": s["chosen"].get("rerank_quality")},
            "uniform": {"heads": s["uniform"]["heads"][0], "ffn_neurons": s["uniform"]["ffn_neurons"][0],
                        "measured_ms": s["uniform"]["measured_ms"], "verified_ms": s["uniform"].get("verified_ms"),
                        "verify_rounds_ms": s["uniform"].get("verify_rounds_ms"),
                        "proxy": s["uniform"]["quality"], "rerank_proxy": s["uniform"].get("rerank_quality")},
            "rejected_on_re_measurement": {k: len(s.get("verification", {}).get(f"rejected{x}", []))
                                           for k, x in (("searched", ""), ("uniform", "_uniform"))},
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
    gap = accuracy_gap(acc)
    summary = {
        "teacher_ckpt": teacher,
        "budget_fraction_of_dense_batch1": args.budget_fraction,
        "latency_reference": args.latency_reference,
        "seeds": args.seeds,
        "all_chosen_within_budget": all(p["chosen"]["within_budget"] for p in per_seed),
        "mean_test_accuracy": {k: mean([a[k] for a in acc]) for k in ("dense", "searched", "uniform")},
        "mean_searched_minus_uniform_points": gap["mean"],
        "searched_minus_uniform_points": gap,
        "mean_speedup_batch1": {k: mean([p["speedup"][k]["1"] for p in per_seed]) for k in ("searched", "uniform")},
        "mean_evaluations_to_random_best": {
            k: mean([x[k] for x in reach if x[k] is not None]) for k in ("reinforced", "random")
        },
        "reinforced_reached_random_best_in_fewer_evaluations": sum(
            1 for x in reach if x["reinforced"] is not None and x["reinforced"] < x["random"]
        ),
        "mean_curves": mean_curve_comparison(curves),
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
