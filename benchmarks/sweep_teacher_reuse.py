"""Benchmark of a sweep's wall clock with teacher reuse: one dense fit for a sweep of ToP targets.

    python benchmarks/sweep_teacher_reuse.py [--overrides model=bert pruner=top pruner.target_sparsity=0.4,0.5,0.6]
    python benchmarks/sweep_teacher_reuse.py --sweep-dir SWEEP_DIR --wall-clock-s S   # summarise a sweep already run

Runs ``python run.py -m <overrides>`` (default: the issue's sweep of three ToP targets on the
default data) and times it, or reads a sweep that was run that way. From the jobs'
results.json it takes each job's overrides, headline figures, wall clock and teacher cache
hit, and from the job that fitted the teacher the dense phase's wall clock (its run start,
``.hydra/config.yaml``, to the dense phase's completion record). Three separate runs would
each fit that teacher: their wall clock is estimated as the sweep's job wall clocks plus
the dense fit once more for every job that took the teacher from the cache (an estimate
from measured phases, not a run of three separate jobs). Summary:
``benchmarks/results/sweep_teacher_reuse.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "sweep_teacher_reuse.json"
DEFAULT = ["model=bert", "pruner=top", "pruner.target_sparsity=0.4,0.5,0.6"]


def run_sweep(overrides: list[str], log_dir: Path) -> tuple[Path, float]:
    """Run the multirun with its outputs under ``log_dir``; (its sweep dir, wall clock in s)."""
    env = dict(os.environ, LITPRUNE_LOG_DIR=str(log_dir), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    started = time.time()
    subprocess.run([sys.executable, "run.py", "-m", *overrides], cwd=ROOT, env=env, check=True)
    elapsed = time.time() - started
    sweeps = sorted((log_dir / "multiruns").iterdir())
    return sweeps[-1], elapsed


def summarise(sweep: Path, wall_clock_s: float, overrides: list[str]) -> dict:
    """The summary of a finished sweep (see the module docstring)."""
    from pipelines.sweep import headline_figures

    jobs, dense_fit_s = [], None
    for job in sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        results = json.loads((job / "results.json").read_text())
        hit = (results.get("teacher_cache") or {}).get("hit")
        record = job / "checkpoints" / "dense" / "complete.json"
        if hit is False and record.is_file():
            dense_fit_s = record.stat().st_mtime - (job / ".hydra" / "config.yaml").stat().st_mtime
        overrides_of_job = (job / ".hydra" / "overrides.yaml").read_text().split("\n")
        jobs.append({
            "job": job.name,
            "overrides": [o.strip("- ").strip() for o in overrides_of_job if o.strip()],
            "teacher_from_cache": hit,
            **{k: v for k, v in headline_figures(results).items() if k != "metric"},
            "speedup_onnxruntime": (results.get("pruned") or {}).get("speedup_onnxruntime"),
            "speedup_vs_dense_torch": (results.get("pruned") or {}).get("speedup_vs_dense_torch"),
        })
    refits = sum(1 for j in jobs if j["teacher_from_cache"])
    separate = sum(j["wall_clock_s"] for j in jobs) + refits * (dense_fit_s or 0.0)
    return {
        "command": "python benchmarks/sweep_teacher_reuse.py --overrides " + " ".join(overrides),
        "what": "a Hydra multirun of ToP targets: every job after the first loads the dense teacher from the "
                "teacher cache; separate_runs_estimate_s adds the measured dense fit back for each of them",
        "sweep_wall_clock_s": round(wall_clock_s, 1),
        "dense_fit_s": round(dense_fit_s, 1) if dense_fit_s is not None else None,
        "teacher_fits": len(jobs) - refits,
        "separate_runs_estimate_s": round(separate, 1),
        "saving_fraction": round(1 - wall_clock_s / separate, 3) if separate else None,
        "cpu_count": os.cpu_count(),
        "jobs": jobs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--overrides", nargs="+", default=DEFAULT)
    ap.add_argument("--sweep-dir", type=Path, default=None, help="summarise this finished sweep instead of running one")
    ap.add_argument("--wall-clock-s", type=float, default=None, help="with --sweep-dir: the sweep's measured wall clock")
    ap.add_argument("--log-dir", type=Path, default=ROOT / "outputs")
    ap.add_argument("--note", default=None, help="what else ran on the machine meanwhile (recorded in the summary)")
    a = ap.parse_args()
    if a.sweep_dir is not None:
        if a.wall_clock_s is None:
            ap.error("--sweep-dir needs --wall-clock-s (the sweep's measured wall clock)")
        sweep, wall = a.sweep_dir, a.wall_clock_s
    else:
        sweep, wall = run_sweep(a.overrides, a.log_dir)
    summary = summarise(sweep, wall, a.overrides)
    if a.note:
        summary["note"] = a.note
    OUT.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
