"""Entry point: ``python run.py model=bert pruner=top`` (see README.md).

``train(cfg)`` does the work and returns the results dict; ``main`` is the thin
Hydra wrapper that returns the headline metric for sweeps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

import pipelines.configs  # noqa: F401  (registers the config schemas and the resolvers before Hydra composes)
from pipelines.common import format_table, write_results

log = logging.getLogger(__name__)

PIPELINES = ("text", "stream")


def train(cfg: DictConfig) -> dict:
    """Run the pipeline the model config names, write ``results.json`` under the run dir, print a table.

    Args:
        cfg: the composed Hydra config (``conf/config.yaml``).

    Returns:
        The results dict (also written to ``<paths.output_dir>/results.json``).

    Raises:
        ValueError: an unknown ``model.pipeline``.
    """
    pipeline = cfg.model.get("pipeline")
    if pipeline not in PIPELINES:
        raise ValueError(f"model.pipeline={pipeline!r} is not one of {list(PIPELINES)}.")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if pipeline == "text":
        from pipelines.text import run
    else:
        from pipelines.stream import run
    results = run(cfg, out_dir)
    path = write_results(out_dir, results)
    print(f"\n{format_table(results)}\nresults: {path}")
    return results


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry; returns ``cfg.optimized_metric`` from the results for sweepers."""
    try:
        results = train(cfg)
    except Exception:
        log.exception("run failed")
        raise
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    node = results
    for part in metric.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, (int, float)) else None


if __name__ == "__main__":
    main()
