"""Benchmark: a ToP setting's test accuracy drop over seeds on one dense teacher.

    python benchmarks/top_seeds.py --teacher CKPT --name default [--seeds 42 43 44] [OVERRIDE ...]

Each seed runs ``python run.py model=bert pruner=top pruner.teacher_ckpt=CKPT seed=S
OVERRIDE ...`` with its run dir at ``LOG_DIR/top_seeds/<name>/seed<S>/`` (``--log-dir``,
default ``outputs``). A seed whose ``results.json`` is there already is read, not run again,
so a killed benchmark continues where it stopped, and a run made another way (the default
main job, whose teacher is ``CKPT``) can be placed there to count as its seed.

Every seed distils from the same teacher and is scored on the same test sentences, so the
dense accuracy is the same in every seed and the drops are paired: the summary gives each
seed's dense and pruned test accuracy, drop in points, MACs reduction and wall clock, and
the drops' mean and standard error over the seeds (sample standard deviation / sqrt(n)).
It is written to ``benchmarks/results/top_seeds.json`` under ``<name>``, beside the
settings already there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipelines.resume import RECORD_FILE  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "top_seeds.json"


def run_seed(run_dir: Path, teacher: str, seed: int, overrides: list[str]) -> dict:
    """``results.json`` of the seed's run in ``run_dir``, running it first when it is not there.

    Raises:
        subprocess.CalledProcessError: the run failed (its output is on the console).
    """
    results = run_dir / "results.json"
    if not results.is_file():
        env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
        cmd = [sys.executable, "run.py", "model=bert", "pruner=top", f"pruner.teacher_ckpt={teacher}",
               f"seed={seed}", f"hydra.run.dir={run_dir}", *overrides]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return json.loads(results.read_text())


def wall_clock_split(run_dir: Path) -> dict[str, float | None]:
    """Seconds of the run's parts from its files' times: ``teacher`` (start, ``.hydra/config.yaml``,
    to the dense phase's completion record; None when the teacher came from a checkpoint),
    ``pruning`` (to the pruned phase's record) and ``test_latency_export`` (to ``results.json``)."""
    start = (run_dir / ".hydra" / "config.yaml").stat().st_mtime
    dense = run_dir / "checkpoints" / "dense" / RECORD_FILE
    pruned = (run_dir / "checkpoints" / "pruned" / RECORD_FILE).stat().st_mtime
    teacher_end = dense.stat().st_mtime if dense.is_file() else None
    return {
        "teacher": None if teacher_end is None else round(teacher_end - start, 1),
        "pruning": round(pruned - (teacher_end or start), 1),
        "test_latency_export": round((run_dir / "results.json").stat().st_mtime - pruned, 1),
    }


def summarize(per_seed: dict[int, dict], run_dirs: dict[int, Path]) -> dict:
    """Per-seed figures and the drops' mean and standard error (points; n = number of seeds)."""
    rows = {}
    for seed, r in sorted(per_seed.items()):
        dense, pruned = r["dense"]["metrics"]["accuracy"], r["pruned"]["metrics"]["accuracy"]
        rows[str(seed)] = {
            "dense_accuracy": dense,
            "pruned_accuracy": pruned,
            "drop_points": 100.0 * (dense - pruned),
            "macs_reduction": r["pruned"].get("macs_reduction"),
            "sparsity": r["pruned"]["metrics"].get("sparsity"),
            "kept_tokens_per_layer": r["pruned"].get("kept_tokens_per_layer"),
            "wall_clock_s": r.get("wall_clock_s"),
            "wall_clock_split_s": wall_clock_split(run_dirs[seed]),
        }
    drops = [row["drop_points"] for row in rows.values()]
    macs = [row["macs_reduction"] for row in rows.values() if row["macs_reduction"] is not None]
    return {
        "seeds": rows,
        "n": len(drops),
        "drop_points_mean": statistics.fmean(drops),
        "drop_points_se": statistics.stdev(drops) / math.sqrt(len(drops)) if len(drops) > 1 else None,
        "drop_points_max": max(drops),
        "macs_reduction_mean": statistics.fmean(macs) if macs else None,
    }


def main() -> None:
    """Run (or read) every seed and write the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="dense teacher checkpoint (a run's checkpoints/dense/final.ckpt)")
    ap.add_argument("--name", required=True, help="name of the setting in the summary (e.g. default)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--log-dir", default=os.environ.get("LITPRUNE_LOG_DIR", "outputs"))
    ap.add_argument("overrides", nargs="*", help="run.py overrides of the setting")
    args = ap.parse_args()
    base = Path(args.log_dir).resolve() / "top_seeds" / args.name
    run_dirs = {s: base / f"seed{s}" for s in args.seeds}
    per_seed = {s: run_seed(run_dirs[s], args.teacher, s, args.overrides) for s in args.seeds}
    summary = json.loads(OUT.read_text()) if OUT.is_file() else {}
    summary[args.name] = {
        "command": "python benchmarks/top_seeds.py --teacher CKPT --name "
        + " ".join([args.name, "--seeds", *map(str, args.seeds), *args.overrides]),
        "overrides": args.overrides,
        **summarize(per_seed, run_dirs),
    }
    OUT.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary[args.name], indent=2))


if __name__ == "__main__":
    main()
