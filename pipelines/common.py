"""Pieces every phase of a run shares: loggers, callbacks, trainers, fit phases, and the run's results.json.

A run may fit several times (a dense teacher, then the pruned student, then baselines).
Each fit is a *phase* (:func:`fit_phase`) with its own checkpoint folder
(``checkpoints/<phase>``) and its own logger run (a W&B run in the run's group, a CSV or
TensorBoard version named after the phase; :mod:`pipelines.tracking`), finished at the end of
the phase.
Which checkpoint a phase keeps comes from Lightning's ``ModelCheckpoint`` state (best by
the phase's monitored metric, else the last); a finished phase keeps only that one, as
``final.ckpt`` with a completion record, and a killed run resumes its open phase
(:mod:`pipelines.resume`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from modules.core.files import write_json
from pipelines import resume
from pipelines.tracking import build_loggers, finish_loggers
from pruners.base import FitPlan

RESULTS_FILE = "results.json"

log = logging.getLogger(__name__)


def build(node: DictConfig, **kwargs) -> Any:
    """``hydra.utils.instantiate`` that re-raises a constructor's own error unwrapped.

    Hydra wraps constructor errors in ``InstantiationException``; our config, data and
    file errors already say what is wrong and how to fix it, so they surface as they are.
    """
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from None
        raise


def check_data_kind(cfg: DictConfig, base: type, needs: str) -> None:
    """Raise ConfigError unless ``cfg.data`` builds a ``base`` (text data for BERT, a stream for DLRM), before loading it.

    Args:
        needs: what the model needs, for the message (e.g. ``"text data (data=rotten_tomatoes, ...)"``).
    """
    from hydra.utils import get_class

    from modules.core.errors import ConfigError

    target = OmegaConf.select(cfg, "data._target_")
    if target is None or not issubclass(get_class(target), base):
        raise ConfigError(f"model={cfg.model.name} needs {needs}, but data._target_ is {target}; choose one of those data configs.")


#: callback arguments the run sets itself, by callback key: argument -> why (the schemas in
#: ``pipelines.configs`` leave them unset; :func:`build_callbacks` refuses a value)
RUN_SET_CALLBACK_KEYS: dict[str, dict[str, str]] = {
    "model_checkpoint": {
        "dirpath": "each phase writes its checkpoints to checkpoints/<phase>/ of the run dir",
        "monitor": "each phase's fit plan names the metric its checkpoint is chosen by (the pruner's own, "
                   "model.monitor for the dense phase)",
        "mode": "each phase's fit plan gives the mode of the metric its checkpoint is chosen by",
        "save_top_k": "a phase keeps its one best checkpoint (none when nothing is monitored)",
        "save_last": "the run writes the resumable last.ckpt itself (pipelines.resume.LastCheckpoint)",
        "save_weights_only": "the best checkpoint is kept for its weights; last.ckpt holds the resumable state",
        "save_on_train_epoch_end": "the best is decided at each validation's end, before last.ckpt is written, so a "
                                   "kill between the two cannot lose that decision",
    },
    "early_stopping": {
        "monitor": "the dense phase stops on model.monitor; set that instead",
        "mode": "the dense phase stops on model.monitor, maximised",
    },
}


def check_run_set_callback_keys(cfg: DictConfig) -> None:
    """Refuse a value for a callback argument the run sets itself (:data:`RUN_SET_CALLBACK_KEYS`).

    Raises:
        modules.core.errors.ConfigError: one line naming the key and why the run sets it.
    """
    from modules.core.errors import ConfigError

    for name, keys in RUN_SET_CALLBACK_KEYS.items():
        node = (cfg.get("callbacks") or {}).get(name)
        for key, why in keys.items():
            if node is not None and node.get(key) is not None:
                raise ConfigError(f"callbacks.{name}.{key} is not a setting: {why}; remove the override.")


def user_overrides() -> list[str]:
    """The keys set on the command line of this Hydra run (its task overrides, ``+``/``~`` stripped);
    empty outside a Hydra run (tests, the Python API)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]


def check_settings_apply(cfg: DictConfig, pruner: Any | None) -> None:
    """Refuse a command-line setting the chosen model or pruner replaces, naming the setting that applies.

    * ``trainer.<key>`` that the model's own trainer settings set to another value
      (``model.trainer``, e.g. DLRM's one prequential pass): the run uses ``model.trainer.<key>``;
    * ``trainer.max_epochs`` when no phase of the run uses it: the dense teacher fits for
      ``pruner.teacher_epochs`` (or is loaded), and each pruner phase for its plan's epochs
      (:attr:`pruners.base.FitPlan.epochs_setting`, e.g. ToP's ``pruner.pruning_epochs``).

    Args:
        pruner: the run's pruner (a :class:`pruners.base.Pruner`), or None (``pruner=none``).

    Raises:
        modules.core.errors.ConfigError: one line naming the refused key and the setting to use.
    """
    from modules.core.errors import ConfigError

    check_run_set_callback_keys(cfg)
    user = user_overrides()
    model_trainer = cfg.model.get("trainer") or {}
    for key in user:
        inner = key.removeprefix("trainer.")
        if key.startswith("trainer.") and inner in model_trainer and cfg.trainer.get(inner) != model_trainer[inner]:
            raise ConfigError(f"{key} does not apply to model={cfg.model.name}: its fits run model.trainer.{inner}="
                              f"{model_trainer[inner]} (the model needs it); set that instead.")
    if "trainer.max_epochs" not in user or pruner is None:
        return
    teacher = pruner.teacher_plan()
    if teacher is None:
        return  # the dense phase fits for trainer.max_epochs
    settings = [] if teacher.checkpoint is not None else ["pruner.teacher_epochs (the dense teacher)"]
    phases = pruner.phases() + list(pruner.baselines().items())
    for phase, stage in phases:
        plan = stage.fit_plan()
        if plan.max_epochs is None or plan.epochs_setting is None:
            return  # this phase fits for trainer.max_epochs
        nested = len(pruner.phases()) > 1 and phase in dict(pruner.phases())
        name = plan.epochs_setting.replace("pruner.", f"pruner.stages.{phase}.", 1) if nested else plan.epochs_setting
        if name not in settings:
            settings.append(name)
    raise ConfigError(f"trainer.max_epochs does not apply to pruner={cfg.pruner.name}: its phases run "
                      f"{' and '.join(settings)}; set {'that' if len(settings) == 1 else 'those'} instead.")


def build_callbacks(
    cfg: DictConfig, phase: str, monitor: str | None, mode: str = "max", has_logger: bool = True
) -> list[L.Callback]:
    """Instantiate ``cfg.callbacks`` (dict keyed by name); the checkpoint callback gets the phase's folder.

    ``early_stopping`` (Lightning's ``EarlyStopping`` on ``monitor``) applies to the ``dense``
    phase only, when it monitors a metric: the dense model trains until it converges.

    Args:
        monitor: metric that picks the best checkpoint (None: keep only the last).
        has_logger: False drops callbacks that need a logger (LearningRateMonitor).
    """
    check_run_set_callback_keys(cfg)
    callbacks = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if not has_logger and node._target_.endswith("LearningRateMonitor"):
            continue
        if key == "early_stopping":
            if phase == "dense" and monitor is not None:
                callbacks.append(build(node, monitor=monitor, mode=mode))  # a bad setting: its own one-line error
            continue
        if key == "model_checkpoint":
            callbacks.append(
                instantiate(
                    node,
                    dirpath=str(Path(cfg.paths.output_dir) / "checkpoints" / phase),
                    monitor=monitor,
                    mode=mode,
                    save_top_k=1 if monitor else 0,
                    save_last=False,  # the resumable last.ckpt is written by pipelines.resume.LastCheckpoint
                    # the best is kept for its weights only: a phase in progress has one resumable
                    # checkpoint (last.ckpt, with optimizer and loop state), and the best costs a third
                    save_weights_only=True,
                    # decide at each validation's end, before LastCheckpoint writes last.ckpt, never at the
                    # epoch's end: a kill between the two would lose that decision from the resumed run
                    save_on_train_epoch_end=False,
                )
            )
        else:
            callbacks.append(instantiate(node))
    return callbacks


def build_trainer(cfg: DictConfig, phase: str, callbacks: list[L.Callback], loggers: list, **overrides) -> L.Trainer:
    """``cfg.trainer`` instantiated with the phase's callbacks and loggers (``overrides`` win)."""
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


def checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint:
    """The trainer's ModelCheckpoint.

    Raises:
        ValueError: none is configured (``callbacks.model_checkpoint`` is required).
    """
    if trainer.checkpoint_callback is None:
        raise ValueError("callbacks.model_checkpoint is required: the run reloads its final checkpoint.")
    return trainer.checkpoint_callback


def fit_phase(
    cfg: DictConfig,
    phase: str,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    plan: FitPlan,
    extra_callbacks: tuple | list = (),
    after_fit=None,
    checkpoint_every_batch: bool = False,
) -> tuple[str, float | None]:
    """Fit ``module`` as its own phase; return (checkpoint to use, its monitored score or None).

    The trainer is ``cfg.trainer`` with the model's own trainer settings
    (``cfg.model.trainer``) and ``plan.max_epochs`` on top. The checkpoint is the best by
    ``plan.monitor``; when no checkpoint had a finite score (the pruner's criterion, e.g.
    its sparsity target, was never met) or nothing is monitored, the last one, with score None.

    Args:
        cfg: the run's config.
        phase: phase name (checkpoint folder, logger run name).
        module: the LightningModule to fit (trained in place).
        datamodule: its data.
        plan: epochs, monitored metric and mode (:class:`pruners.base.FitPlan`).
        extra_callbacks: e.g. the pruner.
        after_fit: ``after_fit(module, loggers)`` runs before the phase's loggers are
            finished (to log plots into the phase's run).
        checkpoint_every_batch: write the resumable checkpoint after every training batch too
            (a stream's window; :attr:`pipelines.tasks.base.Task.checkpoint_every_batch`).

    A finished phase (its completion record says done) is not fitted again: the module and
    the callbacks' state come from its kept checkpoint; a phase in progress continues from
    its newest checkpoint (:mod:`pipelines.resume`).

    Raises:
        RuntimeError: the phase wrote no checkpoint.
        pipelines.resume.NonFiniteLossError: a loss became NaN or infinite.
        pipelines.resume.DiskError: the run dir is not writable or too full.
    """
    loggers = build_loggers(cfg, phase)
    callbacks = build_callbacks(cfg, phase, monitor=plan.monitor, mode=plan.mode, has_logger=bool(loggers))
    callbacks += resume.phase_callbacks(phase, stream=checkpoint_every_batch, seed=cfg.seed,
                                        out_dir=cfg.paths.output_dir)
    model_trainer = cfg.model.get("trainer")
    overrides = OmegaConf.to_container(model_trainer, resolve=True) if model_trainer else {}
    if plan.max_epochs is not None:
        overrides["max_epochs"] = plan.max_epochs
    overrides.setdefault("plugins", [resume.AtomicCheckpointIO()])
    trainer = build_trainer(cfg, phase, callbacks + list(extra_callbacks), loggers, **overrides)
    try:
        path, score, _ = resume.fit_or_restore(
            Path(cfg.paths.output_dir), phase, trainer, module, datamodule, list(extra_callbacks),
            choose=lambda t: chosen_checkpoint(t, phase, plan),
        )
        if after_fit is not None:
            after_fit(module, loggers)
    finally:
        finish_loggers(loggers)
    return path, score


def chosen_checkpoint(trainer: L.Trainer, phase: str, plan: FitPlan) -> tuple[str, float | None]:
    """(path, score) of the checkpoint a fitted phase keeps: the best by ``plan.monitor`` when one met
    the pruner's criterion (a finite score, :class:`pruners.base.FitPlan`), else the last with score None.

    Raises:
        RuntimeError: the phase wrote no checkpoint.
    """
    ckpt = checkpoint_callback(trainer)
    score = None if ckpt.best_model_score is None else float(ckpt.best_model_score)
    path = ckpt.best_model_path
    if score is not None and not math.isfinite(score):
        score = None
    if not path or score is None:
        last = resume.LastCheckpoint.path(trainer)
        if last is None or not last.is_file():
            raise RuntimeError(f"The {phase} phase wrote no checkpoint.")
        if plan.monitor is not None:
            log.warning("%s: no checkpoint met the monitored criterion %s; using the last checkpoint.", phase, plan.monitor)
        path = str(last)
    return path, score


def run_relative(path: str | Path, out_dir: str | Path) -> str:
    """``path`` relative to the run dir when it lies inside it (results.json stays valid if the run dir moves)."""
    try:
        return str(Path(path).resolve().relative_to(Path(out_dir).resolve()))
    except ValueError:
        return str(path)


def json_safe(value: Any) -> Any:
    """Make a value JSON-safe (recursively): tensors and numpy scalars to floats, NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (torch.Tensor, np.generic)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(out_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically (temp file + rename) under the run dir and return its path."""
    return write_json(Path(out_dir) / RESULTS_FILE, json_safe(results), indent=2)


def _cell(value: Any, fmt: str) -> str:
    """``value`` formatted for the table, ``-`` when it is missing or not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def format_table(results: dict[str, Any]) -> str:
    """A short text table of the headline figures (metrics, MACs, latency, speedup) of every final model.

    int8 copies (``<name>-int8``) are rows of their own, timed in ONNX Runtime only (``-`` where a
    figure does not apply); a line per int8 model gives its agreement with its fp32 model.
    """
    rows = []
    models = [k for k, v in results.items()
              if isinstance(v, dict) and "metrics" in v and ("latency_ms" in v or "latency_ms_onnxruntime" in v)]
    metric_names = sorted({m for k in models for m in results[k].get("metrics", {})})
    batch_sizes = sorted({b for k in models for b in results[k].get("latency_ms", {})}, key=int)
    ort = any("latency_ms_onnxruntime" in results[k] for k in models)
    ort_cols = [f"ort ms@bs{b}" for b in batch_sizes] if ort else []
    header = ["model", *metric_names, "MACs/sample", "params", *[f"ms@bs{b}" for b in batch_sizes], *ort_cols]
    for k in models:
        r = results[k]
        macs = r.get("macs_per_sample")
        params = r.get("params")
        rows.append(
            [
                k,
                *[_cell(r.get("metrics", {}).get(m), ".4f") for m in metric_names],
                f"{macs / 1e6:.1f}M" if macs else "-",
                f"{params / 1e6:.2f}M" if params else "-",
                *[_cell(r.get("latency_ms", {}).get(b), ".1f") for b in batch_sizes],
                *([_cell(r.get("latency_ms_onnxruntime", {}).get(b), ".1f") for b in batch_sizes] if ort else []),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(header), *(line(r) for r in rows)]
    if "speedup" in results:
        out.append("speedup: " + ", ".join(f"bs{b} {v:.2f}x" for b, v in results["speedup"].items()))
    if "speedup_onnxruntime" in results:
        out.append("speedup in ONNX Runtime (dense ORT / pruned ORT): "
                   + ", ".join(f"bs{b} {v:.2f}x" for b, v in results["speedup_onnxruntime"].items()))
        out.append("pruned in ONNX Runtime vs dense in PyTorch eager: "
                   + ", ".join(f"bs{b} {v:.2f}x" for b, v in results["speedup_vs_dense_torch"].items()))
    if "speedup_onnxruntime_int8" in results:
        out.append("pruned-int8 in ONNX Runtime vs dense fp32 in ONNX Runtime: "
                   + ", ".join(f"bs{b} {v:.2f}x" for b, v in results["speedup_onnxruntime_int8"].items()))
    for k in models:
        a = results[k].get("agreement")
        if a and a.get("examples"):
            out.append(f"{k}: same prediction as {results[k]['quantized_from']} on {a['equal_predictions']:.4f} of "
                       f"{a['examples']} examples, max |logit diff| {a['max_abs_logit_diff']:.3g}, "
                       f"{results[k]['served']['onnx_bytes'] / 1e6:.1f} MB")
    for k, msg in (results.get("quantize_errors") or {}).items():
        out.append(f"NOT QUANTIZED: {k}: {msg}")
    for k in models:
        served = results[k].get("served")
        if served and not served.get("parity_ok", True):
            out.append(f"PARITY: {k} in ONNX Runtime differs from PyTorch by {served['max_abs_diff']:.2e} (see results.json).")
    if "macs_reduction" in results:
        out.append(f"MACs reduction: {results['macs_reduction']:.2f}x")
    final = (results.get("pruner") or {}).get("final_served") or {}
    for where, figures in ([("", final)] if "final_model_latency" in final else list(final.items())):
        f = figures.get("final_model_latency") if isinstance(figures, dict) else None
        if f:
            out.append(f"final model against the latency budget{' of ' + where if where else ''}: {f['served_ms']:.3f} ms "
                       f"({f['runtime']}, {f['shape']} tokens; dense {f['dense_ms']:.3f} ms), budget {f['budget_ms']:.3f} ms: "
                       + ("within" if f["within_budget"] else "OVER BUDGET"))
    if results.get("dense", {}).get("beats_majority_class") is False:
        out.append("DENSE MODEL AT THE MAJORITY CLASS: its validation accuracy does not beat always answering the most "
                   "frequent class (see results.json 'dense'); train it longer.")
    if results.get("target_met") is False:
        out.append("TARGET NOT MET: the pruned model did not reach the pruner's target (see results.json 'pruner').")
    return "\n".join(out)
