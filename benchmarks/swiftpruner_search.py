"""Benchmark: SwiftPruner on Rotten Tomatoes at a latency budget, searched against uniform and reinforced against random.

    python benchmarks/swiftpruner_search.py --teacher-ckpt T              # seeds 0 1 2
    python benchmarks/swiftpruner_search.py --seeds 0 --extra pruner.search.generations=8

Per seed:

1. the reinforced run is a normal run, ``python run.py model=bert logger=csv
   pruner=swiftpruner seed=<seed> pruner.teacher_ckpt=T pruner.latency.budget_fraction=F
   <--extra>`` (a subprocess, output under ``--runs``/seed<seed>): it searches, fine-tunes the
   chosen and the best uniform model, tests and times them;
2. the random-mutator search runs the search component directly on the same teacher, from
   the same composed config with ``pruner.search.mutator=random`` and the first run's
   ``latency_table.json`` as ``pruner.latency.table``, under that run's search budget: the
   same seed (same subsets, importance and generation 0) and the same predictions, so the
   best-reward curves of the two mutators compare. It is not fine-tuned.

Without ``--teacher-ckpt`` a ``pruner=none`` run fine-tunes the teacher first.

Writes ONE summary, ``<out>.json`` (the command that regenerates it, per-seed figures:
budgets, picks and their timings, test accuracy of dense / searched / uniform, speed-ups,
predictor error, evaluations each mutator needs to reach the random one's best reward;
their means), and ONE plot, ``<out>_curves.png`` (best reward so far against evaluations).
Every run's own files (results.json, search history, lookup table, checkpoints, the random
search's curve) stay under ``--runs`` (``benchmarks/runs/``, not versioned).

``--toy`` compares the mutators on :func:`toy_problem` instead (a synthetic objective with a
real lookup table's latencies, many seeds, seconds) and writes ``<out>_toy.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from modules.core.plots import pyplot, save_figure  # noqa: E402

RUNS = ROOT / "benchmarks" / "runs"


# --------------------------------------------------------------------------- paths and commands
def relative(path: str | Path) -> str:
    """``path`` relative to the repository root (``..`` where it lies outside), for the summaries."""
    return os.path.relpath(Path(path).resolve(), ROOT)


def relative_token(token: str) -> str:
    """A command-line token with an absolute path (alone, after ``--opt=`` or ``key=``) made relative to the root."""
    if "=" in token:
        key, value = token.split("=", 1)
        return f"{key}={relative_token(value)}"
    return relative(token) if os.path.isabs(token) else token


def command_line(script: str, argv: list[str]) -> str:
    """The command that regenerates a summary, run from the repository root, with relative paths only."""
    return " ".join(["python", script, *(shlex.quote(relative_token(a)) for a in argv)])


def compose_config(overrides: list[str]):
    """The shipped config composed with ``overrides`` (Hydra syntax), as ``python run.py <overrides>`` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import pipelines.configs  # noqa: F401  (registers the schemas and resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=list(overrides))


def benchmark_runs(runs: Path) -> list[Path]:
    """The ``seed<N>`` run folders under ``runs`` that hold a results.json, by seed."""
    return sorted((p.parent for p in Path(runs).glob("seed*/results.json")), key=lambda p: int(p.name[4:]))


def run_job(overrides: list[str], out_dir: Path, reuse: bool = False) -> dict:
    """``python run.py <overrides> paths.output_dir=<out_dir>`` in a subprocess; its results.json.

    The overrides are kept in ``<out_dir>/benchmark_overrides.json``; with ``reuse`` a run whose
    folder holds a results.json made with the same overrides is not run again.
    """
    out_dir = Path(out_dir)
    done, record = out_dir / "results.json", out_dir / "benchmark_overrides.json"
    if reuse and done.is_file() and record.is_file() and json.loads(record.read_text()) == overrides:
        return json.loads(done.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "run.py", *overrides, f"paths.output_dir={out_dir}"], cwd=ROOT, check=True)
    record.write_text(json.dumps(overrides))
    return json.loads(done.read_text())


# --------------------------------------------------------------------------- the random-mutator search
def random_search(overrides: list[str], budget_ms: float):
    """The search component alone, from the config composed with ``overrides`` (``pruner.search.mutator=random``,
    ``pruner.latency.table``, the teacher): subsets, importance and proxy on the teacher, predictions from the
    loaded table, evolution under ``budget_ms``. Returns the finished :class:`EvolutionarySearch`."""
    from hydra.utils import instantiate

    from pruners.distillation import load_teacher_model
    from pruners.swiftpruner.search import prepare

    cfg = compose_config(overrides)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    swift = instantiate(cfg.pruner)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = load_teacher_model(swift.teacher_ckpt)
    space = swift.space(model)
    inputs = prepare(model, datamodule, space, swift.importance, swift.proxy, swift.search.seed)
    table = swift.latency.load_table(space)
    return swift.search.evolve(space, lambda g: (inputs.quality(g), table.predict_ms(*space.decode(g))), budget_ms, table,
                               inputs.importance)


# --------------------------------------------------------------------------- summaries
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


def seed_figures(results: dict, random_curve: list[float]) -> dict:
    """One seed's figures from the reinforced run's results.json and the random search's best-reward curve.

    The search summary is ``results["pruner"]``; the tested models are ``results["dense"]``,
    ``results["pruned"]`` (searched) and ``results["uniform"]`` (their ``metrics``, ``speedup``
    per batch size and ``macs_reduction``).
    """
    s, curve = results["pruner"], results["pruner"]["best_reward_curve"]
    pick = lambda p: {k: p.get(k) for k in ("heads", "ffn_neurons", "predicted_ms", "measured_ms", "verified_ms", "quality")}  # noqa: E731
    target = random_curve[-1]
    return {
        "budget_ms": s["budget_ms"],
        "search_budget_ms": s["search_budget_ms"],
        "dense_ms": s["dense_ms"],
        "chosen": {**pick(s["chosen"]), "within_budget": s["chosen"].get("verified_ms", s["chosen"]["measured_ms"]) <= s["budget_ms"]},
        "uniform": pick(s["uniform"]),
        "rejected_on_re_measurement": {k: len(s["verification"][f"rejected{x}"]) for k, x in (("searched", ""), ("uniform", "_uniform"))},
        "test_accuracy": {k: results[r]["metrics"]["accuracy"] for k, r in (("dense", "dense"), ("searched", "pruned"), ("uniform", "uniform"))},
        "speedup": {"searched": results["speedup"], "uniform": results["uniform"]["speedup"]},
        "macs_reduction": {"searched": results["macs_reduction"], "uniform": results["uniform"]["macs_reduction"]},
        "predictor_error_mean_abs_pct": s["predictor_error"]["mean_abs_pct"],
        "two_anchor_predictor_error_mean_abs_pct": s["predictor_error"]["two_anchor_fit_mean_abs_pct"],
        "evaluations": {"reinforced": len(curve), "random": len(random_curve)},
        "best_reward": {"reinforced": curve[-1], "random": target},
        "evaluations_to_random_best": {"reinforced": evaluations_to_reach(curve, target),
                                       "random": evaluations_to_reach(random_curve, target)},
    }


def summarise(per_seed: list[dict], curves: dict[str, list[list[float]]]) -> dict:
    """Means over seeds of :func:`seed_figures` (``per_seed``, each with its ``seed``) and the mean-curve comparison."""
    mean = lambda xs: statistics.mean(xs) if xs else None  # noqa: E731
    acc = [p["test_accuracy"] for p in per_seed]
    reach = [p["evaluations_to_random_best"] for p in per_seed]
    return {
        "all_chosen_within_budget": all(p["chosen"]["within_budget"] for p in per_seed),
        "mean_test_accuracy": {k: mean([a[k] for a in acc]) for k in ("dense", "searched", "uniform")},
        "searched_minus_uniform_points": accuracy_gap(acc),
        "mean_speedup_batch1": {k: mean([p["speedup"][k]["1"] for p in per_seed]) for k in ("searched", "uniform")},
        "reinforced_reached_random_best_in_fewer_evaluations": sum(
            1 for x in reach if x["reinforced"] is not None and x["reinforced"] < x["random"]),
        "mean_evaluations_to_random_best": {k: mean([x[k] for x in reach if x[k] is not None]) for k in ("reinforced", "random")},
        "mean_curves": mean_curve_comparison(curves),
        "mean_predictor_error_abs_pct": mean([p["predictor_error_mean_abs_pct"] for p in per_seed]),
        "mean_two_anchor_predictor_error_abs_pct": mean([p["two_anchor_predictor_error_mean_abs_pct"] for p in per_seed]),
    }


def plot_curves(curves: dict[str, list[list[float]]], path: Path) -> None:
    """Mean best-reward-so-far curve of each mutator over seeds (thin lines: single seeds)."""
    plt = pyplot()
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
    save_figure(fig, path, dpi=120)


# --------------------------------------------------------------------------- toy mutator study
def toy_problem(seed: int, table, importance_noise: float = 0.5, quality_noise: float = 0.003):
    """A synthetic search resembling the MiniLM one: (space, objective, budget_ms, estimated importance).

    The layers, choices and additive latency of ``table`` (a real lookup table), budget 50% of
    the dense prediction. True unit importances are exponential with a log-normal scale per
    layer and kind; quality = 0.5 + 0.4 * concave(kept importance share, heads and FFN
    weighted) + deterministic per-genes noise (sd ``quality_noise``, like a proxy on a small
    subset). The mutator gets the true importances times log-normal noise (``importance_noise``),
    as Taylor importance is only an estimate.
    """
    from modules.nn.structured import UnitImportance
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


def toy_study(args, command: str) -> None:
    """Reinforced (with ablations of the learning and of the prior) vs random mutator on :func:`toy_problem`."""
    from pruners.swiftpruner.evolution import EvolutionarySearch
    from pruners.swiftpruner.latency_table import LatencyTable
    from pruners.swiftpruner.mutators import RandomMutator
    from pruners.swiftpruner.search import Search

    table = LatencyTable.from_state_dict(json.loads(Path(args.toy_table).read_text()))
    variants = {
        "reinforced (defaults: prior + REINFORCE)": {},
        "prior only (policy_lr=1e-12: no learning)": {"policy_lr": 1e-12},
        "REINFORCE from a uniform start (policy_prior=0)": {"policy_prior": 0.0},
    }
    seeds = list(range(args.toy_seeds))
    search = lambda seed, mutator, space, objective, budget: EvolutionarySearch(  # noqa: E731
        space, objective, budget, mutator, generations=args.toy_generations, seed=seed).run().best_reward_curve()
    random_curves = []
    for seed in seeds:
        space, objective, budget, _ = toy_problem(seed, table)
        random_curves.append(search(seed, RandomMutator(), space, objective, budget))
    out: dict = {"command": command,
                 "setting": {"layers": table.num_layers, "head_choices": table.head_choices, "neuron_choices": table.neuron_choices,
                             "latency_table": relative(args.toy_table), "budget": "50% of the dense prediction",
                             "population_size": 16, "parents": 4, "generations": args.toy_generations, "seeds": len(seeds)},
                 "variants": {}}
    all_curves: dict[str, list[list[float]]] = {}
    for name, overrides in variants.items():
        curves = all_curves[name] = []
        for seed in seeds:
            space, objective, budget, estimate = toy_problem(seed, table)
            curves.append(search(seed, Search(seed=seed, **overrides).build_mutator(space, table, estimate, budget), space,
                                 objective, budget))
        reach = [(evaluations_to_reach(c, r[-1]), evaluations_to_reach(r, r[-1])) for c, r in zip(curves, random_curves)]
        out["variants"][name] = {
            "reinforced_sooner": sum(1 for a, b in reach if a is not None and a < b),
            "median_evaluations_to_random_best": {"reinforced (never = inf)": statistics.median(a or math.inf for a, _ in reach),
                                                  "random": statistics.median(b for _, b in reach)},
            "mean_curves": mean_curve_comparison({"reinforced": curves, "random": random_curves}),
        }
        print(name, json.dumps(out["variants"][name]), flush=True)
    names = list(variants)
    out["learning_vs_prior_only"] = paired_comparison(all_curves[names[0]], all_curves[names[1]], random_curves)
    Path(f"{args.out}_toy.json").write_text(json.dumps(out, indent=2) + "\n")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write its summary and plot."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-fraction", type=float, default=0.5, help="pruner.latency.budget_fraction of every run")
    parser.add_argument("--teacher-ckpt", default=None, help="dense BertClassifier checkpoint; default: fine-tune one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "swiftpruner_search"),
                        help="summary <out>.json and plot <out>_curves.png")
    parser.add_argument("--runs", default=str(RUNS / "swiftpruner_search"), help="folder of the runs' own outputs")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs with the same overrides")
    parser.add_argument("--toy", action="store_true", help="only the toy mutator study (synthetic objective, seconds)")
    parser.add_argument("--toy-seeds", type=int, default=40)
    parser.add_argument("--toy-generations", type=int, default=10)
    parser.add_argument("--toy-table", default=str(ROOT / "benchmarks" / "results" / "swiftpruner_search" / "seed0" / "latency_table.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")  # the search's progress
    command = command_line("benchmarks/swiftpruner_search.py", argv)
    torch.set_num_threads(args.threads)
    if args.toy:
        return toy_study(args, command)
    runs, started = Path(args.runs), time.time()
    common = ["model=bert", "logger=csv", f"threads={args.threads}", *args.extra]
    teacher = args.teacher_ckpt
    if teacher is None:
        teacher = run_job([*common, "pruner=none", "trainer.max_epochs=1"], runs / "teacher", args.reuse)["dense"]["checkpoint"]
    teacher = str(Path(teacher).resolve())

    per_seed, curves = [], {"reinforced": [], "random": []}
    for seed in args.seeds:
        swift = [*common, "pruner=swiftpruner", f"seed={seed}", f"pruner.teacher_ckpt={teacher}"]
        run_dir = runs / f"seed{seed}"
        results = run_job([*swift, f"pruner.latency.budget_fraction={args.budget_fraction}"], run_dir, args.reuse)
        random_dir = runs / f"random_seed{seed}"
        done = random_dir / "best_reward_curve.json"
        if args.reuse and done.is_file():
            random_curve = json.loads(done.read_text())
        else:
            search = random_search([*swift, "pruner.search.mutator=random", f"pruner.latency.table={run_dir / 'latency_table.json'}"],
                                   results["pruner"]["search_budget_ms"])
            random_curve = search.best_reward_curve()
            random_dir.mkdir(parents=True, exist_ok=True)
            (random_dir / "search_history.json").write_text(json.dumps(search.history, indent=1))
            done.write_text(json.dumps(random_curve))
        curves["reinforced"].append(results["pruner"]["best_reward_curve"])
        curves["random"].append(random_curve)
        per_seed.append({"seed": seed, **seed_figures(results, random_curve),
                         "run_dirs": {"reinforced": relative(run_dir), "random": relative(random_dir)}})

    summary = {
        "command": command,
        "teacher_ckpt": relative(teacher),
        "budget_fraction_of_dense_batch1": args.budget_fraction,
        "seeds": args.seeds,
        **summarise(per_seed, curves),
        "per_seed": per_seed,
        "wall_clock_s": round(time.time() - started),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, Path(f"{args.out}_curves.png"))
    Path(f"{args.out}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_seed"}, indent=2))


if __name__ == "__main__":
    main()
