"""Entry point: ``python run.py model=bert pruner=top`` (see README.md).

``train(cfg)`` does the work and returns the results dict; ``main`` is the thin Hydra
wrapper that returns the headline metric for sweeps. A user error (bad data, a bad
setting, a model and pruner that do not go together; ``modules.core.errors.UserError``) prints
one line, ``error: <message>``, and exits with status 2; ``HYDRA_FULL_ERROR=1`` or
``debug=true`` shows its traceback. A config Hydra cannot compose (a misspelled key, a
wrong type, an unknown group option) also exits with status 2, with Hydra's message as one
line ``error: <message>`` (:func:`compact_hydra_message`; all of it with ``HYDRA_FULL_ERROR=1``).
Any other exception is a bug and keeps its traceback.

``python run.py resume=DIR`` continues the killed run in DIR with the config saved there
(see ``pipelines.resume``); on resume only settings that cannot change the result may be overridden.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

import pipelines.configs  # noqa: F401  (registers the config schemas and the resolvers before Hydra composes)
from modules.core.errors import ConfigError, UserError
from pipelines import flow, resume
from pipelines.common import format_table, write_results
from pipelines.sweep import multirun_job
from pipelines.threads import apply_threads
from pipelines.tracking import log_results
from pipelines.distributed import is_global_zero
from pipelines.quantize import raise_if_failed

log = logging.getLogger(__name__)

#: exit status of a user error (argparse's convention for bad usage)
USER_ERROR_STATUS = 2
_task_started = False


def check_run_settings(cfg: DictConfig) -> None:
    """Settings of the run itself that Lightning or torch would otherwise reject late or obscurely.

    Raises:
        ConfigError: a ``model.pipeline`` (removed: ``model.task`` says what a run does), ``threads`` or
            ``latency.threads`` below 1, ``trainer.limit_train_batches=0``,
            a run without an end (``trainer.max_epochs`` below 1 and no ``trainer.max_steps``), or a bad
            quantization setting (``export.quantize``, ...; :func:`pipelines.quantize.check_settings`).
    """
    if cfg.model.get("pipeline") is not None:
        raise ConfigError(
            f"model.pipeline={cfg.model.pipeline!r} is no longer a setting: the model config's task "
            "(model.task._target_, e.g. pipelines.tasks.text_classification.TextClassificationTask or "
            "pipelines.tasks.stream.StreamTask) says what a run does; delete model.pipeline from the model config."
        )
    threads = cfg.get("threads")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads={threads} must be >= 1, or null for the cores the process may use.")
    lat_threads = (cfg.get("latency") or {}).get("threads")
    if lat_threads is not None and lat_threads < 1:
        raise ConfigError(f"latency.threads={lat_threads} must be >= 1, or null for the training thread count.")
    if cfg.get("export") is not None:
        from pipelines.quantize import check_settings

        check_settings(cfg.export)
    if cfg.trainer.get("limit_train_batches") in (0, 0.0):
        raise ConfigError("trainer.limit_train_batches=0 trains nothing; set it to a number of batches >= 1, a fraction, or null.")
    epochs, steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps")
    if epochs is not None and epochs < 1 and (steps is None or steps < 1):
        raise ConfigError(
            f"trainer.max_epochs={epochs} gives a run without an end; set it to 1 or more "
            "(or set trainer.max_steps to a number of steps)."
        )


def train(cfg: DictConfig) -> dict:
    """Run the flow (:mod:`pipelines.flow`) with the task the model config names, write ``results.json`` under the run dir, log the
    run's conclusions to its loggers (``pipelines.tracking.log_results``), print a table.

    Args:
        cfg: the composed Hydra config (``conf/config.yaml``).

    Returns:
        The results dict (also written to ``<paths.output_dir>/results.json``).

    Raises:
        modules.core.errors.UserError: bad data or settings (raised before any training where they can be seen then).
        pipelines.quantize.QuantizationError: a served model ONNX Runtime could not quantize (raised after
            results.json and every fp32 export are written).
    """
    check_run_settings(cfg)
    out_dir = Path(cfg.paths.output_dir)
    if resume.is_finished(out_dir):  # resume= of a finished run: report, change nothing
        print(f"The run in {out_dir} is finished (every phase complete); results: {out_dir / 'results.json'}")
        return json.loads((out_dir / "results.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in the saved config; stderr stays for errors
    threads = apply_threads(cfg)
    started = time.time()
    results = flow.run(cfg, out_dir)
    results["resumed"] = resume.resumed_events(out_dir)
    results["threads"] = threads
    results["wall_clock_s"] = math.floor(time.time() - started)
    if is_global_zero():  # under DDP every rank runs train(); rank 0 alone writes and prints
        path = write_results(out_dir, results)
        log_results(cfg, out_dir, results)  # the results run of the run's W&B group (pipelines.tracking)
        print(f"\n{format_table(results)}\nresults: {path}")
        raise_if_failed(results)  # a model ONNX Runtime could not quantize: exit 2 once everything else is written
    return results


def headline(results: dict, metric) -> float | list | None:
    """The value at the dotted path ``metric`` of ``results`` (what sweepers optimise), or None;
    for a list of paths (a multi-objective search), the list of their values."""
    if not metric:
        return None
    if not isinstance(metric, str):
        return [headline(results, m) for m in metric]
    node = results
    for part in metric.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, (int, float)) else None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry; returns ``cfg.optimized_metric`` from the results for sweepers.

    A user error exits with status 2 after one line ``error: <message>`` on stderr; in a
    multirun it fails only its job (Hydra records it; the sweep summary names it).
    """
    global _task_started
    _task_started = True
    if isinstance(sys.stderr, _HeldStderr):  # the config composed: pass stderr through from now on
        sys.stderr.real.write(sys.stderr.release())
    try:
        results = train(cfg)
    except UserError as err:
        if cfg.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1" or multirun_job() is not None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    except Exception:
        log.exception("run failed")
        raise
    return headline(results, cfg.get("optimized_metric"))


def compact_hydra_message(text: str) -> str:
    """Hydra's report of a config it cannot compose, as one line (its pointer to HYDRA_FULL_ERROR and
    OmegaConf's ``full_key``/``object_type`` detail lines dropped)."""
    drop = ("Set the environment variable HYDRA_FULL_ERROR", "full_key:", "object_type=", "reference_type=",
            "To append to your config use")  # every node is typed: a '+' cannot add a key to it either
    text = text.split("Config search path:", 1)[0]  # the search path lists machine paths
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(drop)]
    message = " ".join(line if line.endswith((".", ":")) else line + ";" for line in lines).rstrip(";")
    key = re.search(r"Could not override '([\w.]+)'", message)
    if key and "not in" in message:
        group = key.group(1).split(".")[0]
        message += f". Check the spelling: python run.py --cfg job --package {group} prints every {group} setting."
    return message


class _HeldStderr:
    """stderr that holds what is written until the task starts (:meth:`release`), then passes it through.

    Hydra reports a config it cannot compose on stderr in several lines before the task
    starts; held, it is printed as one line ``error: <message>`` instead.
    """

    def __init__(self, real):
        self.real, self.held, self.holding = real, [], True

    def write(self, text: str) -> int:
        if self.holding:
            self.held.append(text)
        else:
            self.real.write(text)
        return len(text)

    def release(self) -> str:
        """Stop holding; return what was held (not yet written)."""
        self.holding = False
        text, self.held = "".join(self.held), []
        return text

    def __getattr__(self, name):
        return getattr(self.real, name)


if __name__ == "__main__":
    try:
        sys.argv, _ = resume.resume_argv(sys.argv)  # resume=DIR: the config saved in DIR, written into DIR
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    held = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else _HeldStderr(sys.stderr)
    if held is not None:
        sys.stderr = held
    try:
        main()
    except SystemExit as exc:
        # Hydra reports a config it cannot compose, then exits with 1 before the task starts.
        if exc.code == 1 and not _task_started:
            text = held.release() if held is not None else ""
            if text and "Traceback" not in text:
                print(f"error: {compact_hydra_message(text)}", file=held.real)
            elif held is not None:
                held.real.write(text)
            sys.exit(USER_ERROR_STATUS)
        raise
    finally:
        if held is not None:
            held.real.write(held.release())
            sys.stderr = held.real
