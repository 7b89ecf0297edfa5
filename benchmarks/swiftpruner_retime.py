"""Re-time a SwiftPruner benchmark's served models at the budget's shape, interleaved with the dense model.

    python benchmarks/swiftpruner_retime.py benchmarks/runs/swiftpruner_search
    # writes benchmarks/results/swiftpruner_search_retime.json (--out)

An independent check of the first goal (the chosen model is within the budget), made
after the runs and apart from the search's own timings: for every ``seed*`` run folder of
a ``benchmarks/swiftpruner_search.py`` runs folder, the dense teacher and the fine-tuned
searched and uniform models are reloaded from their checkpoints, physically shrunk as
served (``BertClassifier.served_model()``), and timed ``--rounds`` times at the search's
budget shape (batch x tokens from ``results.json``; one median of ``--repeats`` forwards
each). Within a round the three are timed one right after another, in an order that
rotates from round to round, so machine drift hits them alike; each round gives each model's
ratio to the dense timing of that round. A model is within budget when its median ratio is
at most the run's budget fraction (``budget_ms / dense_ms`` of its search).

Runs whose checkpoints are not on this machine (they are not versioned) are skipped and
listed under ``skipped_missing_checkpoints``. The summary holds the command that regenerates
it and relative paths only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from modules.lit.bert_classifier import BertClassifier  # noqa: E402
from pruners.swiftpruner.latency_table import measure_model_ms  # noqa: E402
from swiftpruner_search import benchmark_runs, command_line, relative  # noqa: E402


def interleaved_ratios(names: list[str], time_once: Callable[[str], float], rounds: int, reference: str = "dense") -> dict:
    """Time ``names`` in ``rounds`` rotating rounds and summarise each one's ratio to ``reference``.

    Args:
        names: the models to time, ``reference`` among them.
        time_once: name -> one latency measurement in ms.
        rounds: number of rounds (>= 1); round ``r`` starts at ``names[r % len(names)]``.
        reference: the name every ratio is taken against, per round.

    Returns:
        name -> ``{"ms": [per round], "ratio": [per round, ms / reference ms of that
        round], "median_ms", "median_ratio"}``.

    Raises:
        ValueError: ``rounds`` < 1 or ``reference`` not in ``names``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if reference not in names:
        raise ValueError(f"reference {reference!r} is not among the timed models {names}")
    ms: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            ms[name].append(time_once(name))
    out = {}
    for name in names:
        ratio = [m / d for m, d in zip(ms[name], ms[reference])]
        out[name] = {"ms": ms[name], "ratio": ratio, "median_ms": statistics.median(ms[name]),
                     "median_ratio": statistics.median(ratio)}
    return out


def served_checkpoints(results: dict) -> dict[str, str]:
    """The checkpoint path of a run's dense, searched and uniform models, from its results.json."""
    return {"dense": results["dense"]["checkpoint"], "searched": results["pruned"]["checkpoint"],
            "uniform": results["uniform"]["checkpoint"]}


def runs_with_checkpoints(runs: list[Path]) -> tuple[list[Path], dict[str, list[str]]]:
    """Split run folders into those whose dense, pruned and uniform checkpoints all exist here
    and the others.

    Checkpoints are not versioned, so runs made on another machine cannot be re-timed.

    Returns:
        (the re-timable run folders, {run folder: its checkpoint paths that are missing}, both
        relative to the repository root).
    """
    timable, missing = [], {}
    for run in runs:
        ckpts = served_checkpoints(json.loads((run / "results.json").read_text()))
        gone = [path for path in ckpts.values() if not Path(path).exists()]
        if gone:
            missing[relative(run)] = [relative(p) for p in gone]
        else:
            timable.append(run)
    return timable, missing


def retime_run(run_dir: Path, rounds: int, warmup: int, repeats: int) -> dict:
    """Re-time one run folder's dense, searched and uniform served models (see the module docstring)."""
    results = json.loads((run_dir / "results.json").read_text())
    search = results["pruner"]
    shape = search["latency_shape"]
    models = {k: BertClassifier.load_from_checkpoint(p, map_location="cpu").served_model().model.eval()
              for k, p in served_checkpoints(results).items()}

    def time_once(name: str) -> float:
        return measure_model_ms(models[name], shape["batch_size"], shape["seq_len"], warmup=warmup, repeats=repeats)

    timed = interleaved_ratios(["dense", "searched", "uniform"], time_once, rounds)
    fraction = search["budget_ms"] / search["dense_ms"]
    return {
        "run_dir": relative(run_dir),
        "shape": shape,
        "budget_fraction": fraction,
        "timings": timed,
        "within_budget": {k: timed[k]["median_ratio"] <= fraction for k in ("searched", "uniform")},
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark_dir", help="--runs folder of benchmarks/swiftpruner_search.py (holds seed*/results.json)")
    parser.add_argument("--out", default=None, help="summary JSON; default benchmarks/results/<benchmark_dir name>_retime.json")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = Path(args.benchmark_dir)
    runs = benchmark_runs(bench)
    if not runs:
        raise SystemExit(f"{bench} holds no seed*/results.json; give the --runs folder of benchmarks/swiftpruner_search.py")
    timable, missing = runs_with_checkpoints(runs)
    for run, gone in missing.items():
        print(f"skipping {run}: checkpoint(s) not on this machine: {gone}")
    if not timable:
        raise SystemExit(f"no run in {bench} has its checkpoints on this machine; re-run the benchmark here first")
    per_run = [retime_run(p, args.rounds, args.warmup, args.repeats) for p in timable]
    summary = {
        "command": command_line("benchmarks/swiftpruner_retime.py", argv),
        "rounds": args.rounds, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
        "skipped_missing_checkpoints": missing,
        "all_searched_within_budget": all(r["within_budget"]["searched"] for r in per_run),
        "median_ratio_to_dense": {r["run_dir"]: {k: r["timings"][k]["median_ratio"] for k in ("searched", "uniform")} for r in per_run},
        "per_run": per_run,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{bench.resolve().name}_retime.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_run"}, indent=2))


if __name__ == "__main__":
    main()
