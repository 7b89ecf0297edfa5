"""Fine-tune a SwiftPruner benchmark's searched and uniform picks again on more fine-tuning seeds.

    python benchmarks/swiftpruner_finetune_seeds.py benchmarks/results/swiftpruner_search_margin_rerank \
        --finetune-seeds 101 102
    # writes benchmarks/results/swiftpruner_search_margin_rerank_finetune_seeds.json

Why: the benchmark's second figure (searched minus uniform test accuracy) compares two
models each fine-tuned once, so it mixes real differences between the picks with the
fine-tuning seed's noise (data order, dropout). This study separates the two (on the
margin benchmark's picks the seed moved one pick's accuracy by 0.25 points SD). It keeps
each run's picks (the exact head and FFN-neuron masks, read from the run's fine-tuned
checkpoints) and fine-tunes both again from the same dense teacher with the run's own
settings (task loss + distillation, ``pruner.finetune_epochs``, best checkpoint by
validation accuracy), once per ``--finetune-seeds`` value. The searched and
the uniform pick get the same seed (same data order), so each pair is a paired comparison.
Each pick's accuracy is then the mean over the original fine-tuning and these.

For every ``seed*`` run folder (or ``--seeds``) of a ``benchmarks/swiftpruner_search.py``
output, each fine-tuning seed's models and ``results.json`` go to
``seed<N>/finetune_seed<F>/``; a finished one is reused (delete it to run it again).
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from modules.bert_classifier import BertClassifier  # noqa: E402
from pipelines.common import build, register_resolvers, write_results  # noqa: E402
from pipelines.text import finetune_under_masks  # noqa: E402
from swiftpruner_search import benchmark_runs, compose_config, finished_results, standard_error  # noqa: E402

log = logging.getLogger("swiftpruner_finetune_seeds")
PICKS = {"searched": "pruned", "uniform": "uniform"}  # pick -> its phase (and results.json key) in a run


def finetune_seed_summary(runs: list[dict]) -> dict:
    """Searched minus uniform test accuracy, each pick averaged over several fine-tunings.

    Args:
        runs: one dict per benchmark seed: ``{"seed": int, "searched": [accuracy per
            fine-tuning], "uniform": [accuracy per fine-tuning]}``, accuracies as fractions,
            the two lists paired (entry ``j`` of both used the same fine-tuning seed).

    Returns:
        ``per_seed`` (each pick's mean accuracy and the difference of the means, in points,
        and the paired differences), the ``mean_difference_points`` over benchmark seeds with
        its ``standard_error`` (sample SD / sqrt(seeds); None for one seed), how many seeds
        and how many single pairs the searched pick won and lost, ``finetune_sd_points``: the
        pooled SD of one pick's accuracy across fine-tuning seeds (the fine-tuning noise;
        None with one fine-tuning each), and ``finetune_noise_sd_of_difference_points``: the SD
        of a seed's difference of means that this noise alone gives (sd * sqrt(2 / n)).

    Raises:
        ValueError: no runs, or a run whose two lists are empty or of different lengths.
    """
    if not runs:
        raise ValueError("finetune_seed_summary needs at least one benchmark seed.")
    per_seed, variances = [], []
    for run in runs:
        s, u = run["searched"], run["uniform"]
        if not s or len(s) != len(u):
            raise ValueError(
                f"seed {run.get('seed')}: needs the same number (>= 1) of searched and uniform fine-tunings, "
                f"got {len(s)} and {len(u)}."
            )
        pairs = [100 * (a - b) for a, b in zip(s, u)]
        per_seed.append({
            "seed": run.get("seed"),
            "finetunings": len(s),
            "searched_mean": statistics.mean(s),
            "uniform_mean": statistics.mean(u),
            "difference_points": 100 * (statistics.mean(s) - statistics.mean(u)),
            "paired_differences_points": pairs,
        })
        if len(s) > 1:
            variances += [statistics.variance([100 * a for a in s]), statistics.variance([100 * b for b in u])]
    diffs = [p["difference_points"] for p in per_seed]
    pairs = [d for p in per_seed for d in p["paired_differences_points"]]
    sd = math.sqrt(statistics.mean(variances)) if variances else None
    n = min(p["finetunings"] for p in per_seed)
    return {
        "seeds": len(per_seed),
        "per_seed": per_seed,
        "mean_difference_points": statistics.mean(diffs),
        "standard_error": standard_error(diffs),
        "searched_higher": sum(d > 0 for d in diffs),
        "searched_lower": sum(d < 0 for d in diffs),
        "pairs_searched_higher": sum(d > 0 for d in pairs),
        "pairs_searched_lower": sum(d < 0 for d in pairs),
        "mean_searched": statistics.mean(p["searched_mean"] for p in per_seed),
        "mean_uniform": statistics.mean(p["uniform_mean"] for p in per_seed),
        "finetune_sd_points": sd,
        "finetune_noise_sd_of_difference_points": None if sd is None else sd * math.sqrt(2 / n),
    }


def pick_masks(checkpoint: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, A) head and (L, I) neuron masks (float 0/1) held by a fine-tuned pick's checkpoint.

    Raises:
        FileNotFoundError: no checkpoint there (the benchmark's checkpoints were deleted).
    """
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"No checkpoint at {checkpoint}: this study reads each pick's masks from the benchmark run's fine-tuned "
            "checkpoints; run benchmarks/swiftpruner_search.py again (without deleting checkpoints/)."
        )
    heads, neurons = BertClassifier.load_from_checkpoint(checkpoint, map_location="cpu").model.structured_masks()
    return torch.stack(heads), torch.stack(neurons)


def finetune_again(run_dir: Path, finetune_seed: int, threads: int) -> dict:
    """Fine-tune one run's searched and uniform picks with ``finetune_seed``; return (and write) their results.

    The run's own overrides (``benchmark_overrides`` in its results.json) are kept, with
    ``seed`` and ``paths.output_dir`` replaced. A finished folder with the same overrides is read.

    Raises:
        FileNotFoundError: the run has no results.json or its checkpoints are gone.
        ValueError: the masks in a checkpoint do not keep the heads and neurons the run reports.
    """
    base = json.loads((run_dir / "results.json").read_text())
    out = run_dir / f"finetune_seed{finetune_seed}"
    overrides = [o for o in base["benchmark_overrides"] if not o.startswith(("seed=", "paths.output_dir="))]
    overrides += [f"seed={finetune_seed}", f"paths.output_dir={out}"]
    if (previous := finished_results(out, overrides)) is not None:
        return previous
    cfg = compose_config(overrides)
    torch.set_num_threads(threads)
    L.seed_everything(finetune_seed, workers=True)
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    swift = build(cfg.pruner)
    teacher = base["dense"]["checkpoint"]
    swift.load_teacher(teacher)  # the run's dense model, also when the run fine-tuned it itself
    started = time.time()
    results = {"run": str(run_dir), "finetune_seed": finetune_seed, "benchmark_overrides": overrides}
    for pick, phase in PICKS.items():
        heads, neurons = pick_masks(base[phase]["checkpoint"])
        reported = base["search"]["chosen" if pick == "searched" else "uniform"]
        kept = ([int(h.sum()) for h in heads], [int(n.sum()) for n in neurons])
        if kept != (list(reported["heads"]), list(reported["ffn_neurons"])):
            raise ValueError(f"{run_dir}: the {pick} checkpoint keeps heads/neurons {kept}, the search reports "
                             f"{reported['heads']} / {reported['ffn_neurons']}.")
        L.seed_everything(finetune_seed, workers=True)  # same data order and dropout for both picks
        finetuner = swift.masked_finetuner(heads, neurons, pick)
        path, _, metrics = finetune_under_masks(cfg, phase, teacher, finetuner, datamodule, max_epochs=swift.finetune_epochs)
        results[pick] = {"checkpoint": path, "metrics": metrics, "heads": kept[0], "ffn_neurons": kept[1]}
        log.info("%s, fine-tuning seed %d, %s: test accuracy %.4f", run_dir.name, finetune_seed, pick, metrics["accuracy"])
    results["wall_clock_s"] = math.floor(time.time() - started)
    write_results(out, results)
    return results


def main() -> None:
    """Fine-tune every run's picks on the extra seeds and write ``<bench dir>_finetune_seeds.json``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench_dir", help="a benchmarks/swiftpruner_search.py output folder (holds seed<N>/ runs)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="benchmark seeds; default: every seed<N> folder")
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=[101, 102])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    register_resolvers()
    bench = Path(args.bench_dir)
    if args.seeds is None:
        runs = benchmark_runs(bench)
    else:
        runs = [bench / f"seed{s}" for s in args.seeds]
    if not runs:
        parser.error(f"no seed<N>/results.json under {bench}: give the output folder of benchmarks/swiftpruner_search.py")
    missing = [str(r) for r in runs if not (r / "results.json").is_file()]
    if missing:
        parser.error(f"no results.json in {missing}")
    if set(args.finetune_seeds) & {int(r.name[4:]) for r in runs}:
        parser.error("--finetune-seeds must differ from the benchmark seeds (those are the original fine-tunings)")
    started = time.time()
    accuracies = []
    for run_dir in runs:
        base = json.loads((run_dir / "results.json").read_text())
        entry = {"seed": int(run_dir.name[4:]), "finetune_seeds": [f"{run_dir.name} (the run)"],
                 "searched": [base["pruned"]["metrics"]["accuracy"]], "uniform": [base["uniform"]["metrics"]["accuracy"]]}
        for f in args.finetune_seeds:
            again = finetune_again(run_dir, f, args.threads)
            entry["finetune_seeds"].append(f)
            entry["searched"].append(again["searched"]["metrics"]["accuracy"])
            entry["uniform"].append(again["uniform"]["metrics"]["accuracy"])
        accuracies.append(entry)
    summary = finetune_seed_summary(accuracies)
    report = {
        "what": "searched minus uniform test accuracy (points), each pick's accuracy the mean over its original "
                "fine-tuning and one more per fine-tuning seed (same masks, teacher and settings; both picks the same seed)",
        "bench_dir": str(bench),
        "finetune_seeds": args.finetune_seeds,
        "test_accuracy": accuracies,
        "summary": summary,
        "wall_clock_s": math.floor(time.time() - started),
    }
    path = bench.parent / f"{bench.name}_finetune_seeds.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
