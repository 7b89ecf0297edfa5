"""Entry point: ``python run.py model=bert pruner=top`` (see README.md).

``train(cfg)`` does the work and returns the results dict; ``main`` is the thin Hydra
wrapper that returns the headline metric for sweeps. A user error (bad data, a bad
setting, a model and pruner that do not go together; ``modules.errors.UserError``) prints
one line, ``error: <message>``, and exits with status 2; ``HYDRA_FULL_ERROR=1`` or
``debug=true`` shows its traceback. A config Hydra cannot compose (a misspelled key, a
wrong type, an unknown group option) also exits with status 2, after Hydra's message.
Any other exception is a bug and keeps its traceback.

``python run.py resume=DIR`` continues the killed run in DIR with the config saved there
(see ``pipelines.resume``); on resume only settings that cannot change the result may be overridden.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

import pipelines.configs  # noqa: F401  (registers the config schemas and the resolvers before Hydra composes)
from modules.errors import ConfigError, UserError
from pipelines import resume
from pipelines.common import format_table, write_results

log = logging.getLogger(__name__)

PIPELINES = ("text", "stream")
#: exit status of a user error (argparse's convention for bad usage)
USER_ERROR_STATUS = 2
_task_started = False


def check_run_settings(cfg: DictConfig) -> None:
    """Settings of the run itself that Lightning or torch would otherwise reject late or obscurely.

    Raises:
        ConfigError: an unknown ``model.pipeline``, ``threads`` below 1, or a run without an end
            (``trainer.max_epochs`` below 1 and no ``trainer.max_steps``).
    """
    if cfg.model.get("pipeline") not in PIPELINES:
        raise ConfigError(f"model.pipeline={cfg.model.get('pipeline')!r} is not one of {list(PIPELINES)}.")
    threads = cfg.get("threads")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads={threads} must be >= 1, or null for torch's own choice.")
    epochs, steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps")
    if epochs is not None and epochs < 1 and (steps is None or steps < 1):
        raise ConfigError(
            f"trainer.max_epochs={epochs} gives a run without an end; set it to 1 or more "
            "(or set trainer.max_steps to a number of steps)."
        )


def train(cfg: DictConfig) -> dict:
    """Run the pipeline the model config names, write ``results.json`` under the run dir, print a table.

    Args:
        cfg: the composed Hydra config (``conf/config.yaml``).

    Returns:
        The results dict (also written to ``<paths.output_dir>/results.json``).

    Raises:
        modules.errors.UserError: bad data or settings (raised before any training where they can be seen then).
    """
    check_run_settings(cfg)
    out_dir = Path(cfg.paths.output_dir)
    if resume.is_finished(out_dir):  # resume= of a finished run: report, change nothing
        print(f"The run in {out_dir} is finished (every phase complete); results: {out_dir / 'results.json'}")
        return json.loads((out_dir / "results.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.model.pipeline == "text":
        from pipelines.text import run
    else:
        from pipelines.stream import run
    results = run(cfg, out_dir)
    results["resumed"] = resume.resumed_events(out_dir)
    path = write_results(out_dir, results)
    print(f"\n{format_table(results)}\nresults: {path}")
    return results


def headline(results: dict, metric: str | None) -> float | None:
    """The value at the dotted path ``metric`` of ``results`` (what sweepers optimise), or None."""
    if not metric:
        return None
    node = results
    for part in metric.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, (int, float)) else None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry; returns ``cfg.optimized_metric`` from the results for sweepers.

    A user error exits with status 2 after one line ``error: <message>`` on stderr.
    """
    global _task_started
    _task_started = True
    try:
        results = train(cfg)
    except UserError as err:
        if cfg.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    except Exception:
        log.exception("run failed")
        raise
    return headline(results, cfg.get("optimized_metric"))


if __name__ == "__main__":
    try:
        sys.argv, _ = resume.resume_argv(sys.argv)  # resume=DIR: the config saved in DIR, written into DIR
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    try:
        main()
    except SystemExit as exc:
        # Hydra reports a config it cannot compose, then exits with 1 before the task starts.
        if exc.code == 1 and not _task_started:
            sys.exit(USER_ERROR_STATUS)
        raise
