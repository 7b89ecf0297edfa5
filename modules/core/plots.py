"""The one matplotlib setup: a headless backend, figures written atomically.

Runs and benchmarks draw on machines without a display (CI, cluster nodes), so every plot
goes through :func:`pyplot`, which selects the non-interactive ``Agg`` backend before
``matplotlib.pyplot`` is imported, and :func:`save_figure`, which writes the PNG through
:func:`modules.core.files.atomic_path` (an earlier plot is never left half-written) and
closes the figure (no figures pile up over a sweep). matplotlib is imported lazily, so
importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modules.core.files import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot``, with the ``Agg`` backend selected (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (parent folders created), close it, return ``path`` as a Path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return Path(path)
