"""Benchmark: one accuracy vs latency frontier across every BERT pruner, on one dense teacher.

    python benchmarks/frontier.py [--teacher CKPT] [--seeds 42 43 44] [--plan default|smoke] [--log-dir DIR] [OVERRIDE ...]

Runs, as one resumable sweep under ``LOG_DIR/frontier/<plan>/`` (``--log-dir``, default ``outputs``):

* the dense teacher, once (``pruner=none teacher_cache=true``, so it comes from the teacher cache when an
  earlier run of the same config fitted it), unless ``--teacher`` names its checkpoint;
* ToP at 4 MACs sparsity targets, SwiftPruner at 3 latency budgets (each run also fine-tunes its uniform
  baseline), layer dropping at its default budget and 2 fixed depths, and the composite
  ``swiftpruner_top`` at 3 points, every job distilling from that one teacher
  (``pruner.teacher_ckpt``); each method's default point runs with every seed of ``--seeds``, the other
  points with the first seed.

Each job is ``python run.py model=bert pruner=<p> pruner.teacher_ckpt=CKPT seed=S <job overrides>
<OVERRIDE ...>`` in ``<sweep>/<job>/``. A job whose ``results.json`` is there is read, not run; a job
killed midway is continued with ``resume=<its dir>`` (its finished phases are kept), so a killed
benchmark continues where it stopped. Every finished job gets a ``job_status.json``, and the sweep dir
gets the sweep summary (``summary.csv``, ``summary.md`` and ``frontier.png``, :mod:`pipelines.sweep`).

Written to ``--out`` (default ``benchmarks/results``): ``frontier.json`` (every job's figures, the
points grouped over seeds with standard errors, the Pareto front at each timed batch size, the
searched-minus-uniform accuracy difference of SwiftPruner with its standard error at each budget, the
wall clock) and ``frontier.png`` (test accuracy vs ONNX Runtime latency as a fraction of the dense
model, at batch 1 and at batch 32, Pareto front marked, error bars where there are seeds; int8
points hollow when the runs' results carry them). Latency is each run's own interleaved measurement
of the model against its dense model (``latency_ms_onnxruntime``), so drift between runs cancels.

``--plan smoke`` is a tiny configuration (random 3-layer BERT, 48 sentences per split, tiny searches)
that exercises every part in minutes: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.frontier import group_points, pareto, plot, run_points  # noqa: E402
from pipelines.sweep import STATUS_FILE, write_summary  # noqa: E402

#: per plan: the overrides every run gets, and the jobs (name, pruner, overrides, whether it is the
#: method's default point, run with every seed)
TINY_BERT = ("model.module.bert_config={vocab_size:30522,hidden_size:32,num_hidden_layers:3,num_attention_heads:4,"
             "intermediate_size:64,max_position_embeddings:128}")
SMOKE_SWIFT = ["head_choices=[2,4]", "ffn_fractions=[0,0.5,1]", "search.generations=1", "search.population_size=4",
               "search.parents=2", "proxy.examples=16", "importance.examples=16", "latency.repeats=2",
               "latency.seq_len=16", "latency.verify_rounds=0", "latency.calibration_models=2"]
PLANS: dict[str, dict] = {
    "default": {
        "common": [],
        "jobs": [
            ("top_0.51", "top", [], True),
            ("top_0.40", "top", ["pruner.target_sparsity=0.4"], False),
            ("top_0.60", "top", ["pruner.target_sparsity=0.6"], False),
            ("top_0.70", "top", ["pruner.target_sparsity=0.7"], False),
            ("swiftpruner_0.50", "swiftpruner", [], True),
            ("swiftpruner_0.40", "swiftpruner", ["pruner.latency.budget_fraction=0.4"], False),
            ("swiftpruner_0.60", "swiftpruner", ["pruner.latency.budget_fraction=0.6"], False),
            ("layerdrop_0.50", "layerdrop", [], True),
            ("layerdrop_k2", "layerdrop", ["pruner.layers=2"], False),
            ("layerdrop_k4", "layerdrop", ["pruner.layers=4"], False),
            ("swiftpruner_top_0.50_0.51", "swiftpruner_top", [], True),
            ("swiftpruner_top_0.60_0.40", "swiftpruner_top", ["pruner.stages.structure.latency.budget_fraction=0.6",
                                                              "pruner.stages.tokens.target_sparsity=0.4"], False),
            ("swiftpruner_top_0.40_0.51", "swiftpruner_top", ["pruner.stages.structure.latency.budget_fraction=0.4"], False),
        ],
    },
    "smoke": {
        "common": ["threads=1", "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                   TINY_BERT, "allow_majority_class_teacher=true", "data.limit_per_split=48", "data.batch_size=8",
                   "trainer.num_sanity_val_steps=0", "latency.batch_sizes=[1,32]", "latency.repeats=2", "latency.warmup=1",
                   "latency.examples=32", "export.parity_examples=32"],
        "dense": ["trainer.max_epochs=1"],  # the dense job's fit (pruner=none); each pruner job runs its own epochs
        "jobs": [
            ("top_0.30", "top", ["pruner.target_sparsity=0.3", "pruner.pruning_epochs=2", "pruner.bin_count=4"], True),
            ("swiftpruner_1000ms", "swiftpruner", [*(f"pruner.{s}" for s in SMOKE_SWIFT), "pruner.latency.budget_ms=1000"], False),
            ("layerdrop_k1", "layerdrop", ["pruner.layers=1"], False),
            ("swiftpruner_top", "swiftpruner_top", [*(f"pruner.stages.structure.{s}" for s in SMOKE_SWIFT),
                                                    "pruner.stages.structure.latency.budget_ms=1000",
                                                    "pruner.stages.tokens.pruning_epochs=2", "pruner.stages.tokens.bin_count=4"], False),
        ],
    },
}
ENV = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")


def run_py(args: list[str]) -> None:
    """``python run.py *args`` in the repository root.

    Raises:
        subprocess.CalledProcessError: the run failed (its output is on the console).
    """
    subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=ENV, check=True)


def run_job(run_dir: Path, args: list[str]) -> dict:
    """``results.json`` of the job in ``run_dir``: read when there, else run (or resumed when its dir holds a killed run)."""
    results = run_dir / "results.json"
    if not results.is_file():
        if (run_dir / ".hydra" / "config.yaml").is_file():
            run_py([f"resume={run_dir}"])
        else:
            run_py([*args, f"hydra.run.dir={run_dir}"])
    return json.loads(results.read_text())


def teacher_checkpoint(base: Path, common: list[str], overrides: list[str]) -> Path:
    """The dense teacher's checkpoint: the dense run of the sweep (fitted once, or taken from the teacher cache)."""
    run_job(base / "dense", ["model=bert", "pruner=none", "seed=42", "teacher_cache=true", *common, *overrides])
    return base / "dense" / "checkpoints" / "dense" / "final.ckpt"


def mean_se(values: list[float]) -> dict:
    """``{"mean", "se", "n"}`` (se: sample standard deviation / sqrt(n); None for one value)."""
    return {"mean": statistics.fmean(values), "n": len(values),
            "se": statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None}


def summarize(jobs: list[dict], batches: list[str]) -> dict:
    """The frontier: grouped points, Pareto front per batch size, SwiftPruner's searched minus uniform per budget."""
    points = [p for j in jobs for p in run_points(j["results"], j["name"])]
    groups = group_points(points)
    searched = {}
    for j in jobs:
        diff = j["results"].get("pruned_minus_uniform_points")
        if diff is not None:
            searched.setdefault(j["name"], []).append(diff)
    return {
        "groups": groups,
        "pareto": {b: pareto(groups, b) for b in batches},
        "searched_minus_uniform_points": {k: mean_se(v) for k, v in searched.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    """Run (or read) every job, write the sweep summary, ``frontier.json`` and ``frontier.png``; return the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="dense teacher checkpoint; default: the sweep's own dense run (teacher cache)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="seeds of each method's default point")
    ap.add_argument("--plan", choices=sorted(PLANS), default="default")
    ap.add_argument("--log-dir", default=os.environ.get("LITPRUNE_LOG_DIR", "outputs"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of frontier.json and frontier.png")
    ap.add_argument("overrides", nargs="*", help="run.py overrides of every job")
    args = ap.parse_args(argv)
    plan = PLANS[args.plan]
    base = Path(args.log_dir).resolve() / "frontier" / args.plan
    started = time.time()
    teacher = Path(args.teacher) if args.teacher else teacher_checkpoint(base, [*plan["common"], *plan.get("dense", [])], args.overrides)
    jobs = []
    for name, pruner, overrides, default_point in plan["jobs"]:
        for seed in args.seeds if default_point else args.seeds[:1]:
            job = f"{name}_seed{seed}"
            run_args = ["model=bert", f"pruner={pruner}", f"pruner.teacher_ckpt={teacher}", f"seed={seed}",
                        *plan["common"], *overrides, *args.overrides]
            results = run_job(base / job, run_args)
            status = {"status": "completed", "overrides": " ".join([f"pruner={pruner}", f"seed={seed}", *overrides]),
                      "error": None, "ended": time.time()}
            (base / job / STATUS_FILE).write_text(json.dumps(status, indent=2) + "\n")
            jobs.append({"job": job, "name": name, "pruner": pruner, "seed": seed, "overrides": overrides, "results": results})
    write_summary(base)  # summary.csv, summary.md and frontier.png of the sweep dir
    batches = sorted({str(b) for j in jobs for b in (j["results"]["dense"].get("latency_ms_onnxruntime") or {})}, key=int)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": "python benchmarks/frontier.py " + " ".join(
            [*(["--teacher", "CKPT"] if args.teacher else []), "--plan", args.plan, "--seeds", *map(str, args.seeds), *args.overrides]),
        "what": "test accuracy vs ONNX Runtime latency (fraction of each run's dense model, timed interleaved in the run) "
                "of every final model; groups over seeds: mean and standard error",
        "dense": {"accuracy": jobs[0]["results"]["dense"]["metrics"]["accuracy"] if jobs else None},
        "jobs": [{"job": j["job"], "pruner": j["pruner"], "seed": j["seed"], "overrides": j["overrides"],
                  "accuracy": j["results"]["pruned"]["metrics"]["accuracy"],
                  "latency_ms_onnxruntime": j["results"]["pruned"].get("latency_ms_onnxruntime"),
                  "speedup_onnxruntime": j["results"].get("speedup_onnxruntime"),
                  "macs_reduction": j["results"].get("macs_reduction"), "wall_clock_s": j["results"].get("wall_clock_s")}
                 for j in jobs],
        **summarize(jobs, batches),
        "wall_clock_s": {"this_invocation": round(time.time() - started, 1),
                         "sum_of_jobs": sum(j["results"].get("wall_clock_s") or 0 for j in jobs)},
    }
    (out / "frontier.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary["groups"], batches, out / "frontier.png", title=summary["command"])
    print(json.dumps({k: summary[k] for k in ("pareto", "searched_minus_uniform_points", "wall_clock_s")}, indent=2))
    return summary


if __name__ == "__main__":
    main()
