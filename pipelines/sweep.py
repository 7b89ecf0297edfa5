"""Multirun support: each job's identity, its W&B headline run, and the sweep summary (a Hydra callback).

``python run.py -m pruner.target_sparsity=0.4,0.5`` runs every job in its own dir
``<sweep dir>/<job num>`` under one sweep dir (``conf/hydra/default.yaml``).
:class:`SweepSummary` (registered in ``conf/hydra/default.yaml``) writes, in every job's
dir, ``job_status.json`` (overrides, completed or failed and why) when the job ends, in
whatever process ran it (the basic, joblib or submitit launcher), and rewrites the
sweep's ``summary.csv`` and ``summary.md`` (one row per job: its overrides and headline
figures from its ``results.json``) after every job and at the end of the sweep, so a
sweep with failed jobs (Hydra stops after the batch that holds them) still has its
summary. When ``optimized_metric`` lists two or more figures (a multi-objective search,
``hparams_search=top_optuna``) the summary also marks the Pareto front and plots it
(``pareto.png``). When the jobs differ in pruner, ``frontier.png`` plots every final model's
test accuracy against its ONNX Runtime latency (:mod:`pipelines.frontier`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from modules.core.files import atomic_path, write_text
from modules.core.plots import pyplot, save_figure

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
PARETO_PNG = "pareto.png"
FRONTIER_PNG = "frontier.png"


def multirun_job() -> dict[str, str] | None:
    """The running job's identity in a multirun: ``{"name": overrides, "group": sweep dir name}``; None otherwise.

    The name is Hydra's ``job.override_dirname`` (``pruner.target_sparsity=0.4``, or
    ``job<num>`` without overrides); the group is the sweep dir's name (its start time).
    """
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    name = hc.job.override_dirname or f"job{hc.job.num}"
    return {"name": name, "group": Path(str(hc.sweep.dir)).name}


def get_path(results: dict, dotted: str) -> Any:
    """The value at ``dotted`` (``pruned.metrics.accuracy``) in ``results``, or None."""
    node: Any = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    """Scalar leaves of a nested dict, keyed ``<prefix>_<key>_<key>...``."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}_{k}"))
        return out
    return {prefix: node} if isinstance(node, (int, float, bool, str)) or node is None else {}


def headline_figures(results: dict) -> dict[str, Any]:
    """The flat headline figures of one run's results (text or stream), by column name: the sweep
    summary's columns and the W&B results run's summary (``pipelines.tracking``).

    Columns: ``quality`` metric of the final (pruned, else dense) model (``accuracy`` or
    ``auc``), the dense one, ``drop_points`` (dense minus pruned, points), ``macs_reduction``
    (dense / pruned MACs per sample), ``speedup_bs<B>`` per timed batch size (PyTorch) and
    ``<key>_bs<B>`` for every other top-level speedup by batch size (``speedup_onnxruntime``,
    ``speedup_vs_dense_torch``, ...), every test metric of every final model as
    ``<model>_<metric>`` (e.g. ``pruned_f1``), every figure whose results path names int8
    (``<path joined by _>``, read generically), ``sparsity`` (the pruner's achieved sparsity,
    fraction), ``target_met``, ``threads`` and ``wall_clock_s``.
    """
    final = "pruned" if "pruned" in results else "dense"
    metric = "accuracy" if get_path(results, "dense.metrics.accuracy") is not None else "auc"
    out: dict[str, Any] = {"metric": metric}
    out[metric] = get_path(results, f"{final}.metrics.{metric}")
    out[f"dense_{metric}"] = get_path(results, f"dense.metrics.{metric}")
    if final == "pruned" and out[metric] is not None and out[f"dense_{metric}"] is not None:
        out["drop_points"] = 100.0 * (out[f"dense_{metric}"] - out[metric])
    macs = results.get("macs_reduction")
    if macs is None and final == "pruned":
        d, p = get_path(results, "dense.macs_per_sample"), get_path(results, "pruned.macs_per_sample")
        macs = d / p if d and p else None
    out["macs_reduction"] = macs
    for bs, v in (results.get("speedup") or {}).items():
        out[f"speedup_bs{bs}"] = v
    for key, by_bs in results.items():
        if key.startswith("speedup_") and isinstance(by_bs, dict):
            out.update({f"{key}_bs{bs}": v for bs, v in by_bs.items() if isinstance(v, (int, float))})
    for name, entry in results.items():
        if isinstance(entry, dict) and isinstance(entry.get("metrics"), dict):
            for m, v in entry["metrics"].items():
                if isinstance(v, (int, float)):
                    out.setdefault(f"{name}_{m}", v)
    for key, v in _flat(results, "").items():
        if "int8" in key:
            out.setdefault(key.lstrip("_"), v)
    sparsity = get_path(results, "pruned.metrics.sparsity")
    if sparsity is None:
        sparsity = get_path(results, "pruner.overall")
    out["sparsity"] = sparsity
    out["target_met"] = results.get("target_met")
    out["threads"] = get_path(results, "threads.train")
    out["wall_clock_s"] = results.get("wall_clock_s")
    return out


def pareto_front(rows: list[dict], keys: list[str], directions: list[str]) -> list[int]:
    """Indices of the rows not dominated in ``keys`` (each maximised or minimised as ``directions`` say).

    A row with a missing or non-finite value is never on the front.
    """
    sign = [1.0 if d.startswith("max") else -1.0 for d in directions]
    pts = {}
    for i, r in enumerate(rows):
        vals = [r.get(k) for k in keys]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            pts[i] = [s * v for s, v in zip(sign, vals)]
    front = []
    for i, a in pts.items():
        dominated = any(all(x >= y for x, y in zip(b, a)) and any(x > y for x, y in zip(b, a)) for j, b in pts.items() if j != i)
        if not dominated:
            front.append(i)
    return front


def collect_rows(sweep_dir: Path) -> list[dict]:
    """One row per job dir under ``sweep_dir`` (job status, overrides, headline figures), by job number."""
    rows = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
                          key=lambda p: (len(p.name), p.name)):
        status_path, results_path = job_dir / STATUS_FILE, job_dir / "results.json"
        row: dict[str, Any] = {"job": job_dir.name}
        if status_path.is_file():
            st = json.loads(status_path.read_text())
            row.update(status=st["status"], overrides=st["overrides"], error=st.get("error"))
        else:
            over = job_dir / ".hydra" / "overrides.yaml"
            row.update(status="not finished", overrides=" ".join(OmegaConf.load(over)) if over.is_file() else "")
        if results_path.is_file() and row["status"] == "completed":
            row.update(headline_figures(json.loads(results_path.read_text())))
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_summary(sweep_dir: str | Path, objectives: list[str] | None = None, directions: list[str] | None = None) -> dict:
    """(Re)write ``summary.csv`` and ``summary.md`` in ``sweep_dir`` from its job dirs; with two or
    more ``objectives`` (dotted results paths, or headline column names), also the Pareto front
    (a ``pareto`` column, a section of ``summary.md`` and ``pareto.png``). Returns {rows, pareto}."""
    sweep_dir = Path(sweep_dir)
    rows = collect_rows(sweep_dir)
    front: list[int] = []
    keys = []
    if objectives and len(objectives) >= 2:
        for i, obj in enumerate(objectives):
            key = f"objective_{i}"
            keys.append(key)
            for r in rows:
                res = sweep_dir / r["job"] / "results.json"
                r[key] = get_path(json.loads(res.read_text()), obj) if r["status"] == "completed" and res.is_file() else None
        directions = list(directions or ["maximize"] * len(keys))
        front = pareto_front(rows, keys, directions)
        for i, r in enumerate(rows):
            r["pareto"] = i in front
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    with atomic_path(sweep_dir / SUMMARY_CSV) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: r.get(k) for k in columns} for r in rows)
    tokens = [r.get("overrides", "").split() for r in rows]
    common = [t for t in tokens[0] if all(t in ts for ts in tokens)] if len(tokens) > 1 else []
    md = [f"# Sweep {sweep_dir.name}", "", f"{len(rows)} jobs, "
          f"{sum(r['status'] == 'completed' for r in rows)} completed, {sum(r['status'] == 'failed' for r in rows)} failed.", ""]
    if common:
        md += ["Overrides of every job: `" + " ".join(common) + "`; the table lists the others (all of them: summary.csv).", ""]
    shown = [{**r, "overrides": " ".join(t for t in ts if t not in common)} for r, ts in zip(rows, tokens)]
    md += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    md += ["| " + " | ".join(_fmt(r.get(k)).replace("|", "/").replace("\n", " ") for k in columns) + " |" for r in shown]
    if keys:
        md += ["", "## Pareto front", "", "Objectives: " + ", ".join(
            f"`{k}` = `{o}` ({d})" for k, o, d in zip(keys, objectives, directions)), ""]
        md += [f"- job {rows[i]['job']}: `{shown[i]['overrides']}`: " + ", ".join(_fmt(rows[i][k]) for k in keys) for i in front]
        if front and plot_pareto(rows, keys, objectives, front, sweep_dir / PARETO_PNG):
            md += ["", f"![Pareto front]({PARETO_PNG})"]
    if write_frontier(sweep_dir, rows, [" ".join(t for t in ts if t not in common) for ts in tokens]):
        md += ["", "## Accuracy vs latency across pruners", "",
               f"Every final model's test accuracy vs its ONNX Runtime latency as a fraction of its run's dense model "
               f"(pipelines.frontier), Pareto front joined: ![frontier]({FRONTIER_PNG})"]
    write_text(sweep_dir / SUMMARY_MD, "\n".join(md) + "\n")
    return {"rows": rows, "pareto": front}


def write_frontier(sweep_dir: Path, rows: list[dict], labels: list[str]) -> bool:
    """``frontier.png`` in ``sweep_dir`` when its completed jobs differ in pruner (their results' ``task``):
    every final model, labelled ``<pruner> <job's own overrides>`` (:mod:`pipelines.frontier`). Returns
    whether it was written."""
    from pipelines.frontier import group_points, plot, run_points

    runs = {}
    for r, label in zip(rows, labels):
        res = sweep_dir / r["job"] / "results.json"
        if r["status"] == "completed" and res.is_file():
            runs[r["job"]] = (json.loads(res.read_text()), label)
    if len({results.get("task") for results, _ in runs.values()}) < 2:
        return False
    points = [p for results, label in runs.values()
              for p in run_points(results, f"{str(results.get('task', '')).split('-', 1)[-1]} {label}".strip())]
    batches = sorted({b for p in points for b in p["relative_latency"]}, key=int)
    return plot(group_points(points), batches, sweep_dir / FRONTIER_PNG, title=f"sweep {sweep_dir.name}")


def plot_pareto(rows: list[dict], keys: list[str], labels: list[str], front: list[int], path: Path) -> bool:
    """PNG of every completed job in the first two objectives, the Pareto front joined; False if nothing to plot."""
    plt = pyplot()
    pts = [(r[keys[0]], r[keys[1]]) for r in rows if r.get(keys[0]) is not None and r.get(keys[1]) is not None]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(*zip(*pts), color="grey", label="jobs")
    fr = sorted((rows[i][keys[0]], rows[i][keys[1]]) for i in front)
    ax.plot(*zip(*fr), "o-", color="C3", label="Pareto front")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True


def _objectives(config: DictConfig) -> tuple[list[str] | None, list[str] | None]:
    metric = config.get("optimized_metric")
    if metric is None or isinstance(metric, str):
        return None, None
    metrics = [str(m) for m in metric]
    direction = OmegaConf.select(config, "hydra.sweeper.direction")
    if direction is None or isinstance(direction, str):
        direction = [str(direction or "maximize")] * len(metrics)
    return metrics, [str(d) for d in direction]


class SweepSummary(Callback):
    """Hydra callback: a job status file per job, ``summary.csv`` / ``summary.md`` (and the Pareto
    front) per sweep; see the module docstring. Registered in ``conf/hydra/default.yaml``."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Record the job's status in its dir, then rewrite the sweep summary (multirun jobs only)."""
        hc = config.get("hydra")
        if hc is None or hc.mode != RunMode.MULTIRUN:
            return
        out = Path(hc.runtime.output_dir)
        status = "completed" if job_return.status.name == "COMPLETED" else "failed"
        error = None
        if status == "failed":
            try:
                _ = job_return.return_value  # raises the job's exception
            except Exception as err:  # noqa: BLE001  (any error of the job is its row's message)
                error = f"{type(err).__name__}: {err}"
        record = {"status": status, "overrides": " ".join(hc.overrides.task), "error": error, "ended": time.time()}
        (out / STATUS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        self._refresh(config, Path(str(hc.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the final sweep summary; log it to the sweep's W&B run (``pipelines.tracking.log_sweep``)."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        path = self._refresh(config, sweep_dir)
        if path is not None:
            log.info("sweep summary: %s", path)
            from pipelines.tracking import log_sweep

            try:
                log_sweep(config, sweep_dir)
            except Exception:  # like the summary, its W&B run must never fail the sweep
                log.exception("could not log the sweep summary to W&B")

    def _refresh(self, config: DictConfig, sweep_dir: Path) -> Path | None:
        from filelock import FileLock

        if not sweep_dir.is_dir():
            return None
        objectives, directions = _objectives(config)
        try:
            with FileLock(str(sweep_dir / ".summary.lock")):
                write_summary(sweep_dir, objectives, directions)
        except Exception:  # a summary must never fail a job or the sweep
            log.exception("could not write the sweep summary in %s", sweep_dir)
            return None
        return sweep_dir / SUMMARY_MD
