"""Benchmark: D2S on the MovieLens-100K stream, mean over seeds (default 3).

    python benchmarks/d2s_stream.py                    # seeds 0 1 2, writes benchmarks/results/d2s_stream.json
    python benchmarks/d2s_stream.py --seeds 0 --limit-rows 20000   # a quick look

Every variant is one ``run.py`` run (``model=dlrm pruner=d2s``, composed from the real
configs), which trains a dense reference and the pruned model on the same stream with the
same seed, and measures both served copies' CPU latency interleaved, in PyTorch eager and
in ONNX Runtime (the exported ``served/<name>/model.onnx``). Variants:

* ``d2s_unstructured_90``: adaptive D2S, 90% unstructured MLP sparsity;
* ``static_unstructured_90``: prune once at the start, then train sparse (same sparsity);
* ``uniform_unstructured_90``: adaptive, but the same sparsity in every layer;
* ``d2s_neuron_50``: adaptive D2S, 50% of hidden neurons removed (physically smaller MLPs).

Figures (second-half mean AUC over the stream's windows, then mean over seeds):

1. AUC of D2S at 90% unstructured minus dense (requirement: >= -0.005);
2. AUC of D2S minus static at 90% (requirement: > 0);
3. neuron 50%: latency speedup at batch 4096 (and 1) of the served model, and its AUC cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

import run  # noqa: E402

VARIANTS = {
    "d2s_unstructured_90": ["pruner.target_sparsity=0.9"],
    "static_unstructured_90": ["pruner.target_sparsity=0.9", "pruner.mode=static"],
    "uniform_unstructured_90": ["pruner.target_sparsity=0.9", "pruner.allocation=uniform"],
    "d2s_neuron_50": ["pruner.target_sparsity=0.5", "pruner.granularity=neuron"],
}


def run_variant(name: str, seed: int, out_root: Path, threads: int, limit_rows: int | None, extra: list[str]) -> dict:
    """Compose the real config for one variant and seed, run it, return its results dict."""
    overrides = [
        "model=dlrm", "pruner=d2s", "logger=none", f"seed={seed}", f"threads={threads}",
        f"paths.output_dir={out_root / name / f'seed{seed}'}", *VARIANTS[name], *extra,
    ]
    if limit_rows:
        overrides.append(f"data.limit_rows={limit_rows}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=overrides)
    return run.train(cfg)


def mean(xs: list[float]) -> float:
    """Arithmetic mean."""
    return statistics.fmean(xs)


def main(argv: list[str] | None = None) -> dict:
    """Run every variant for every seed, write and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training and latency")
    ap.add_argument("--limit-rows", type=int, default=None, help="only the first N rows of the stream")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "d2s_stream.json")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "outputs" / "benchmarks" / "d2s_stream")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. latency.repeats=30")
    args = ap.parse_args(argv)

    t0 = time.time()
    runs: dict[str, dict[int, dict]] = {v: {} for v in args.variants}
    for seed in args.seeds:
        for name in args.variants:
            r = run_variant(name, seed, args.runs_dir, args.threads, args.limit_rows, args.overrides)
            runs[name][seed] = {
                "dense_auc": r["dense"]["metrics"]["auc"],
                "pruned_auc": r["pruned"]["metrics"]["auc"],
                "dense_ne": r["dense"]["metrics"]["ne"],
                "pruned_ne": r["pruned"]["metrics"]["ne"],
                "auc_delta": r["auc_delta"],
                "sparsity_overall": r["pruner"]["overall"],
                "sparsity_masked": r["pruner"]["masked"],
                "neurons_removed": r["pruner"]["neurons_removed"],
                "per_layer": r["pruner"]["per_layer"],
                "latency_ms": {"dense": r["dense"]["latency_ms"], "pruned": r["pruned"]["latency_ms"]},
                "speedup": r["speedup"],
                "latency_ms_onnxruntime": {k: r[k].get("latency_ms_onnxruntime") for k in ("dense", "pruned")},
                "speedup_onnxruntime": r.get("speedup_onnxruntime"),
                "speedup_vs_dense_torch": r.get("speedup_vs_dense_torch"),
                "params": {"dense": r["dense"]["params"], "pruned": r["pruned"]["params"]},
                "mlp_params": {"dense": r["dense"]["mlp_params"], "pruned": r["pruned"]["mlp_params"]},
            }

    def avg(variant: str, key: str) -> float:
        return mean([runs[variant][s][key] for s in args.seeds])

    summary: dict = {"seeds": args.seeds, "threads": args.threads, "limit_rows": args.limit_rows, "variants": {}}
    for v in args.variants:
        summary["variants"][v] = {
            "dense_auc": avg(v, "dense_auc"),
            "pruned_auc": avg(v, "pruned_auc"),
            "auc_delta": avg(v, "auc_delta"),
            "dense_ne": avg(v, "dense_ne"),
            "pruned_ne": avg(v, "pruned_ne"),
            "sparsity_overall": avg(v, "sparsity_overall"),
            "neurons_removed": avg(v, "neurons_removed"),
            "speedup": {b: mean([runs[v][s]["speedup"][b] for s in args.seeds]) for b in ("1", "4096")},
        }
        if all(runs[v][s]["speedup_onnxruntime"] for s in args.seeds):
            for key in ("speedup_onnxruntime", "speedup_vs_dense_torch"):
                summary["variants"][v][key] = {b: mean([runs[v][s][key][b] for s in args.seeds]) for b in ("1", "4096")}
    figures = {}
    if "d2s_unstructured_90" in runs:
        d = summary["variants"]["d2s_unstructured_90"]
        figures["d2s90_auc_minus_dense"] = d["auc_delta"]
        figures["d2s90_within_0.005_of_dense"] = d["auc_delta"] >= -0.005
    if {"d2s_unstructured_90", "static_unstructured_90"} <= set(runs):
        diffs = [runs["d2s_unstructured_90"][s]["pruned_auc"] - runs["static_unstructured_90"][s]["pruned_auc"] for s in args.seeds]
        figures["d2s90_auc_minus_static90"] = mean(diffs)
        figures["d2s_beats_static_every_seed"] = all(x > 0 for x in diffs)
    if {"d2s_unstructured_90", "uniform_unstructured_90"} <= set(runs):
        figures["d2s90_auc_minus_uniform90"] = mean(
            [runs["d2s_unstructured_90"][s]["pruned_auc"] - runs["uniform_unstructured_90"][s]["pruned_auc"] for s in args.seeds]
        )
    if "d2s_neuron_50" in runs:
        n = summary["variants"]["d2s_neuron_50"]
        figures["neuron50_speedup_bs4096"] = n["speedup"]["4096"]
        figures["neuron50_speedup_bs1"] = n["speedup"]["1"]
        figures["neuron50_auc_cost"] = -n["auc_delta"]
        if "speedup_onnxruntime" in n:
            figures["neuron50_speedup_onnxruntime_bs4096"] = n["speedup_onnxruntime"]["4096"]
            figures["neuron50_speedup_onnxruntime_bs1"] = n["speedup_onnxruntime"]["1"]
    summary["figures"] = figures
    summary["per_seed"] = runs
    summary["command"] = "python benchmarks/d2s_stream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary["wall_seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\nD2S on MovieLens-100K, seeds {args.seeds}, {args.threads} thread(s): second-half mean AUC")
    print(f"{'variant':26s} {'dense':>7s} {'pruned':>7s} {'delta':>8s} {'sparsity':>8s} {'x@bs1':>6s} {'x@bs4096':>8s}")
    for v, s in summary["variants"].items():
        print(f"{v:26s} {s['dense_auc']:7.4f} {s['pruned_auc']:7.4f} {s['auc_delta']:+8.4f} {s['sparsity_overall']:8.3f} "
              f"{s['speedup']['1']:6.2f} {s['speedup']['4096']:8.2f}")
    for k, v in figures.items():
        print(f"{k}: {v:+.4f}" if isinstance(v, float) else f"{k}: {v}")
    print(f"written: {args.out}")
    return summary


if __name__ == "__main__":
    main()
