"""Entry point: ``python export.py run_dir=DIR`` exports a finished run's final models (see README.md).

Each final model goes to ``DIR/served/<name>/`` (``model.onnx``, ``litprune.json``, the
tokenizer for text), is checked against PyTorch in ONNX Runtime and re-timed in both
runtimes, with its int8 copy ``DIR/served/<name>-int8/`` (``quantize=``, default the run's
``export.quantize``); ``DIR/results.json`` is updated in place (atomically). A user error (no such
run, an unknown model name) prints one line ``error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

import pipelines.configs  # noqa: F401  (registers the resolvers before Hydra composes)
from modules.core.errors import UserError
from pipelines.common import format_table, write_results
from pipelines.quantize import raise_if_failed

USER_ERROR_STATUS = 2


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """Export, check and time the run's models; print the table."""
    from pipelines.reexport import reexport

    try:
        results = reexport(cfg.run_dir, list(cfg.models) if cfg.models else None, cfg.threads, cfg.get("quantize"))
        path = write_results(cfg.run_dir, results)
        print(f"\n{format_table(results)}\nresults: {path}")
        raise_if_failed(results)  # a model ONNX Runtime could not quantize: its fp32 export and results.json are written
    except UserError as err:
        if cfg.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)


if __name__ == "__main__":
    main()
