"""Accuracy vs latency across methods: points from runs' results, seeds grouped, the Pareto front, the plot.

Used by ``benchmarks/frontier.py`` and by the sweep summary (:func:`pipelines.sweep.write_summary`:
a sweep whose jobs differ in pruner gets ``frontier.png`` in its sweep dir).

A *point* is one final model of one run (``pruned``, a baseline such as ``uniform``, a
composite's earlier stage, ``dense``, and any entry whose results path names ``int8``, read
generically) that has test accuracy and ONNX Runtime latency. Its latency is given as a
fraction of the same run's dense model in ONNX Runtime at that batch size (both timed
interleaved in the run, so machine drift between runs cancels), with the absolute ms kept.
Points of the same label (method and setting) over several seeds are grouped: mean and
standard error (sample standard deviation / sqrt(n)) of accuracy and relative latency.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Iterator
from modules.core.plots import pyplot, save_figure

#: file name of the plot in a sweep dir
FRONTIER_PNG = "frontier.png"


def _entries(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    """(path, entry) of every dict under ``node`` holding test ``metrics.accuracy`` and ``latency_ms_onnxruntime``."""
    if not isinstance(node, dict):
        return
    metrics = node.get("metrics")
    if isinstance(metrics, dict) and "accuracy" in metrics and isinstance(node.get("latency_ms_onnxruntime"), dict):
        yield path, node
    for key, value in node.items():
        if isinstance(value, dict) and key not in ("metrics", "latency_ms_onnxruntime", "latency_ms"):
            yield from _entries(value, (*path, str(key)))


def run_points(results: dict, label: str, models: list[str] | None = None) -> list[dict[str, Any]]:
    """The points of one run's results (see the module docstring).

    Args:
        results: a run's results.json.
        label: the run's label (method and setting); a point's label is ``label`` for ``pruned``,
            ``<label> / <model path>`` for the others (``dense`` is labelled ``dense``).
        models: result paths (``/``-joined) to keep; None keeps every one.

    Returns:
        dicts with ``label``, ``model`` (path), ``int8`` (bool), ``accuracy``, ``ort_ms`` (batch -> ms),
        ``relative_latency`` (batch -> fraction of the run's dense model in ONNX Runtime).
    """
    dense = (results.get("dense") or {}).get("latency_ms_onnxruntime") or {}
    points = []
    for path, entry in _entries(results):
        name = "/".join(path)
        if models is not None and name not in models:
            continue
        ms = {str(b): float(v) for b, v in entry["latency_ms_onnxruntime"].items()}
        rel = {b: v / float(dense[b]) for b, v in ms.items() if dense.get(b)}
        point_label = "dense" if name == "dense" else label if name == "pruned" else f"{label} / {name}"
        points.append({"label": point_label, "model": name, "int8": "int8" in name, "accuracy": float(entry["metrics"]["accuracy"]),
                       "ort_ms": ms, "relative_latency": rel})
    return points


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def group_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points of equal label grouped over seeds: ``n``, ``accuracy`` / ``accuracy_se`` and, per batch size,
    ``relative_latency`` / ``relative_latency_se`` and ``ort_ms`` (means); SE None for one seed."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(p["label"], []).append(p)
    out = []
    for label, ps in groups.items():
        acc, acc_se = _mean_se([p["accuracy"] for p in ps])
        batches = sorted(set.intersection(*(set(p["relative_latency"]) for p in ps)), key=int)
        rel = {b: _mean_se([p["relative_latency"][b] for p in ps]) for b in batches}
        out.append({"label": label, "model": ps[0]["model"], "int8": ps[0]["int8"], "n": len(ps), "accuracy": acc,
                    "accuracy_se": acc_se, "relative_latency": {b: m for b, (m, _) in rel.items()},
                    "relative_latency_se": {b: s for b, (_, s) in rel.items()},
                    "ort_ms": {b: statistics.fmean(p["ort_ms"][b] for p in ps) for b in batches}})
    return out


def pareto(groups: list[dict[str, Any]], batch: str) -> list[str]:
    """Labels of the groups no other group beats at ``batch`` (lower or equal relative latency and higher or
    equal accuracy, one of them strictly), by increasing latency."""
    pts = [(g["relative_latency"][batch], g["accuracy"], g["label"]) for g in groups if batch in g["relative_latency"]]
    front = [(x, y, l) for x, y, l in pts
             if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for x2, y2, _ in pts)]
    return [l for _, _, l in sorted(front)]


def plot(groups: list[dict[str, Any]], batches: list[str], path: str | Path, title: str = "") -> bool:
    """PNG of test accuracy vs ONNX Runtime latency (fraction of dense) per batch size, one panel each:
    every group with its standard-error bars where it has seeds, int8 points hollow, the Pareto front joined.
    False (nothing written) when no group has a latency at these batch sizes."""
    plt = pyplot()
    batches = [b for b in batches if any(b in g["relative_latency"] for g in groups)]
    if not batches:
        return False
    methods = sorted({g["label"].split(" ")[0] for g in groups})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.8), squeeze=False)
    for ax, b in zip(axes[0], batches):
        seen = set()
        for g in groups:
            if b not in g["relative_latency"]:
                continue
            method = g["label"].split(" ")[0]
            ax.errorbar(g["relative_latency"][b], g["accuracy"], xerr=g["relative_latency_se"].get(b) or None,
                        yerr=g["accuracy_se"] or None, fmt="o", color=colours[method], capsize=3,
                        mfc="none" if g["int8"] else colours[method], label=None if method in seen else method)
            seen.add(method)
            ax.annotate(g["label"], (g["relative_latency"][b], g["accuracy"]), fontsize=6, alpha=0.7,
                        xytext=(3, 3), textcoords="offset points")
        front = {g["label"]: g for g in groups}
        line = [(front[l]["relative_latency"][b], front[l]["accuracy"]) for l in pareto(groups, b)]
        ax.plot(*zip(*line), "o--", color="black", lw=1, ms=12, mfc="none", alpha=0.7, label="Pareto front")
        ax.set_xlabel(f"ONNX Runtime latency, fraction of dense (batch {b})")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True
