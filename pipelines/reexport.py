"""Export (again) the final models of a finished run: what ``python export.py run_dir=DIR`` does.

Reads the run's own configuration (``DIR/.hydra/config.yaml``) and ``results.json``,
reloads each final model from the checkpoint results.json names, builds its served copy,
and runs the same export, parity check and PyTorch / ONNX Runtime timing as the end of a
run (:func:`pipelines.flow.serve_and_time` with the run's task). results.json is then replaced atomically
with the new ``served`` entries and latency figures; nothing else in it changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from modules.core.errors import ConfigError, MissingFileError, UserError
from pipelines.common import RESULTS_FILE
from pipelines.flow import build_task, serve_and_time


#: the task of a run saved before ``model.task`` existed, by its ``model.pipeline``
LEGACY_TASKS = {"text": "pipelines.tasks.text_classification.TextClassificationTask", "stream": "pipelines.tasks.stream.StreamTask"}


#: the package of each module that moved into a sub-package of modules/ (issue 32), for ``_target_`` paths of older runs
LEGACY_MODULES = {
    **dict.fromkeys(("errors", "version", "features", "packages"), "core"),
    **dict.fromkeys(("bert", "gates", "structured", "tokens"), "nn"),
    **dict.fromkeys(("bert_classifier", "objective", "distributed"), "lit"),
    **dict.fromkeys(("text_data", "stream_data", "stream_readers", "data_checks", "resumable"), "data"),
    **dict.fromkeys(("served_bert", "served_dlrm", "onnx_export", "latency"), "served"),
}


def current_target(target: str) -> str:
    """``target`` (a ``_target_`` path) as the modules/ sub-packages spell it: ``modules.text_data.X`` ->
    ``modules.data.text_data.X``; ``modules.dlrm.DLRMModule`` -> ``modules.lit.dlrm``, other ``modules.dlrm`` names ->
    ``modules.nn.dlrm``. Any other path is returned unchanged."""
    parts = target.split(".")
    if len(parts) < 3 or parts[0] != "modules":
        return target
    if parts[1] == "dlrm":
        package = "lit" if parts[2] == "DLRMModule" else "nn"
    else:
        package = LEGACY_MODULES.get(parts[1])
    return ".".join(["modules", package, *parts[1:]]) if package else target


def _update_targets(node: Any) -> None:
    """Rewrite every ``_target_`` under ``node`` (a plain dict/list tree) with :func:`current_target`, in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str):
                node[key] = current_target(value)
            else:
                _update_targets(value)
    elif isinstance(node, list):
        for value in node:
            _update_targets(value)


class RunDirError(UserError, ValueError):
    """The run dir cannot be exported: not a finished run, or a broken results.json."""


def load_run(run_dir: Path) -> tuple[DictConfig, dict[str, Any]]:
    """The run's composed config (output dir set to ``run_dir``) and its results.

    Raises:
        MissingFileError: no such folder, or it lacks .hydra/config.yaml or results.json.
        RunDirError: results.json is not valid JSON.
    """
    if not run_dir.is_dir():
        raise MissingFileError(f"run_dir={run_dir} is not a folder; give the run dir a finished run printed (its results.json's folder).")
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise MissingFileError(f"{run_dir} has no .hydra/config.yaml: it is not a run dir of run.py.")
    if not (run_dir / RESULTS_FILE).is_file():
        raise MissingFileError(
            f"{run_dir} has no {RESULTS_FILE}: the run did not finish. Finish it (or resume it), then export."
        )
    try:
        results = json.loads((run_dir / RESULTS_FILE).read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"{run_dir / RESULTS_FILE} is not valid JSON ({err}).") from None
    import pipelines.configs  # noqa: F401  (registers the resolvers the saved config uses)

    from pipelines.configs import ExportConfig, LatencyConfig

    saved = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=False)
    _update_targets(saved)  # runs saved before modules/ had sub-packages name the old module paths
    cfg = OmegaConf.create(saved)
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = str(run_dir)
    # runs made before a setting existed get its default
    for key, schema in (("export", ExportConfig), ("latency", LatencyConfig)):
        cfg[key] = OmegaConf.merge(OmegaConf.structured(schema), cfg.get(key) or {})
    legacy = cfg.model.pop("pipeline", None)  # runs made before model.task named their flow by this string
    if cfg.model.get("task") is None and legacy in LEGACY_TASKS:
        cfg.model.task = {"_target_": LEGACY_TASKS[legacy]}
    return cfg, results


def final_models(results: dict[str, Any], names: list[str] | None, run_dir: Path) -> dict[str, Path]:
    """name -> checkpoint of each final model to export (every one with a checkpoint, or ``names``).

    Raises:
        ConfigError: an unknown model name (lists the run's models).
        MissingFileError: a checkpoint results.json names is gone.
    """
    available = {k: v["checkpoint"] for k, v in results.items() if isinstance(v, dict) and "checkpoint" in v and "metrics" in v}
    if not available:
        raise RunDirError(f"{run_dir / RESULTS_FILE} names no model checkpoint; was it written by run.py?")
    chosen = list(names) if names else list(available)
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise ConfigError(f"models={unknown}: this run has the models {list(available)}.")
    out = {}
    for name in chosen:
        path = Path(available[name])
        path = path if path.is_absolute() else run_dir / path
        if not path.is_file():
            raise MissingFileError(f"The {name} checkpoint {path} is missing; the run dir is incomplete.")
        out[name] = path
    return out


def reexport(
    run_dir: str | Path, names: list[str] | None = None, threads: int | None = None, quantize: str | None = None
) -> dict[str, Any]:
    """Export the final models of the run in ``run_dir`` and re-time them; return the updated results.

    Each exported model's int8 copy (``<name>-int8``) is made again as ``quantize`` says; an
    earlier int8 entry of an exported model is dropped first (its latency came from other rounds).

    Args:
        run_dir: a finished run's dir.
        names: models to export (default: every final model).
        threads: threads for timing (default: the run's ``threads``).
        quantize: ``none``, ``dynamic`` or ``static`` (default: the run's ``export.quantize``;
            ``dynamic`` for runs made before the setting existed).

    Raises:
        MissingFileError, RunDirError, ConfigError: see :func:`load_run` and :func:`final_models`;
            ConfigError also for a bad ``quantize``.
    """
    from pipelines.quantize import check_settings, int8_name

    run_dir = Path(run_dir).resolve()
    cfg, results = load_run(run_dir)
    if quantize is not None:
        cfg.export.quantize = quantize
    check_settings(cfg.export)
    if threads is not None:
        cfg.threads = threads
        OmegaConf.update(cfg, "latency.threads", threads, force_add=True)  # timing reads latency.threads
    cfg.export.enabled = True
    checkpoints = final_models(results, names, run_dir)
    module_cls = get_class(cfg.model.module._target_)
    modules = {name: module_cls.load_from_checkpoint(str(path), map_location="cpu") for name, path in checkpoints.items()}
    if "dense" not in modules:  # speedups are relative to the dense model
        modules = {"dense": module_cls.load_from_checkpoint(str(final_models(results, ["dense"], run_dir)["dense"]), map_location="cpu"), **modules}
    for name in modules:
        results.pop(int8_name(name), None)
    task = build_task(cfg)
    serve_and_time(cfg, task, run_dir, results, {k: m.served_model() for k, m in modules.items()}, task.build_data(cfg))
    return results
