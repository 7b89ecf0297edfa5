"""The Pareto plot of a SwiftPruner search: proxy quality against measured latency of every candidate."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from modules.core.plots import pyplot, save_figure


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated (latency, quality) points: no other point is faster and at least as good.

    Args:
        points: (latency in ms, quality) pairs.

    Returns:
        the front, sorted by latency (ascending), quality strictly increasing along it.
    """
    front: list[tuple[float, float]] = []
    for lat, q in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or q > front[-1][1]:
            front.append((lat, q))
    return front


def plot_pareto(result: dict[str, Any], path: str | Path) -> Path:
    """Write the search's Pareto plot as PNG.

    Every evaluated candidate (colour = generation), the uniform configurations within
    and over budget, the Pareto front of the candidates, the budget line, and the chosen
    and best uniform candidates marked. Latency is the direct measurement of the
    physically shrunk model at the budget's shape (ms), quality the search's proxy.

    Args:
        result: :attr:`pruners.swiftpruner.SwiftPruner.result` (:func:`pruners.swiftpruner.search.run_search`).
        path: the PNG to write (parent folders are created).

    Returns:
        ``path`` as a Path.
    """
    plt = pyplot()
    cands = result["candidates"]
    metric = result["proxy"]["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sc = ax.scatter(
        [c["measured_ms"] for c in cands],
        [c["quality"] for c in cands],
        c=[c["generation"] for c in cands],
        cmap="viridis",
        s=14,
        label=f"searched candidates ({result['mutator']} mutator)",
    )
    fig.colorbar(sc, ax=ax, label="generation")
    front = pareto_front([(c["measured_ms"], c["quality"]) for c in cands])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:green", lw=1, label="Pareto front")
    uni = [u for u in result["uniform_candidates"] if "quality" in u]
    if uni:
        ax.scatter([u["measured_ms"] for u in uni], [u["quality"] for u in uni], marker="s", facecolors="none",
                   edgecolors="tab:orange", s=30, label="uniform (within budget)")
    ax.axvline(result["budget_ms"], color="tab:red", ls="--", lw=1, label=f"budget {result['budget_ms']:.2f} ms")
    search_budget = result["search_budget_ms"]
    if search_budget < result["budget_ms"]:  # the budget less pruner.latency.margin
        ax.axvline(search_budget, color="tab:red", ls=":", lw=1, label=f"search budget {search_budget:.2f} ms (margin)")
    ch = result["chosen"]
    ax.scatter([ch["measured_ms"]], [ch["quality"]], marker="*", s=220, color="tab:red", edgecolors="k", zorder=5,
               label="chosen")
    if result.get("uniform"):
        u = result["uniform"]
        ax.scatter([u["measured_ms"]], [u["quality"]], marker="D", s=80, color="tab:orange", edgecolors="k", zorder=5,
                   label="best uniform")
    shape = result["latency_shape"]
    ax.set_xlabel(f"measured latency, ms (batch {shape['batch_size']} x {shape['seq_len']} tokens)")
    ax.set_ylabel(f"proxy {metric} (held-out, before fine-tuning)")
    ax.set_title("SwiftPruner search: quality vs latency")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
