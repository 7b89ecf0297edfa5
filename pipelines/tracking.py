"""Experiment tracking through Lightning's loggers: what a run shows in W&B (or TensorBoard) after it ends.

Every run (a single run, or one job of a multirun) is one W&B *group*, named after the task
and the run dir (``<task>-<run dir name>``; in a multirun ``<task>-<sweep dir name>-<job num>``;
``logger.wandb.group`` overrides it). The group holds

* one W&B run per fit phase (``dense``, ``pruned``, each baseline; job type = the phase) with
  the phase's ``train/*``, ``val/*`` and ``pruner/*`` curves and, reopened after the fit, the
  ``test/*`` metrics of that phase's final model (text runs; a stream's metrics are
  prequential, in the curves) (:func:`build_loggers`, :func:`phase_test_loggers`);
* one ``results`` run (:func:`log_results`, job type ``results``) whose summary holds the
  headline figures (:func:`pipelines.sweep.headline_figures`, the sweep summary's columns:
  test metrics, drop, MACs reduction, speedups by batch size in PyTorch and ONNX Runtime,
  int8 figures where present, sparsity, target_met, wall clock), with ``results.json`` as a
  file, every plot the run wrote as a ``wandb.Image``, the latency figures and kept tokens
  per layer (and by token kind) as ``wandb.Table`` s, and each served folder
  (``served/<name>/``) as an artifact of type ``model`` with its ``litprune.json`` as metadata.

Every W&B run's config is the whole composed config, resolved. Runs are named
``<task>-<phase>`` (a multirun job: ``<overrides>-<phase>``) and, in a multirun, tagged
``sweep-<sweep dir name>``, so the run table can put the jobs of one sweep side by side
(the sweep's own run, :func:`log_sweep`, holds its summary table and Pareto front).

W&B runs offline unless ``logger.wandb.offline=false`` (files under the run dir; ``wandb
sync`` uploads them later). Run ids are kept in the run dir (:data:`IDS_FILE`), so
``resume=DIR`` continues the same W&B runs (``resume="allow"``) instead of starting new
ones. Only rank 0 creates W&B runs and logs the results (Lightning's loggers are rank-zero;
:func:`log_results` returns on other ranks).

``logger=tensorboard`` (Lightning's ``TensorBoardLogger``) gets the same phases under
``tensorboard/<phase>/`` and the headline figures as hparams metrics of ``tensorboard/results``,
with the whole config as its hparams.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modules.core.files import write_json
from modules.lit.distributed import is_global_zero
from pipelines.sweep import get_path, headline_figures, multirun_job


#: W&B run ids of the run, by phase (and ``results``), in the run dir: a resumed run reuses them
IDS_FILE = "wandb_ids.json"
RESULTS = "results"
#: results.json keys holding a model's latency in ms by batch size, by runtime
LATENCY_KEYS = {"latency_ms": "pytorch", "latency_ms_onnxruntime": "onnxruntime"}


def is_wandb(node: Any) -> bool:
    """True when a logger node builds Lightning's ``WandbLogger``."""
    return node is not None and "WandbLogger" in str(node.get("_target_", ""))


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The whole composed config as a plain dict, interpolations resolved (``???`` stays as it is).

    Raises:
        omegaconf.errors.InterpolationResolutionError: an interpolation cannot be resolved.
    """
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def run_group(cfg: DictConfig) -> str:
    """The W&B group of this run: ``logger.wandb.group`` when set, else ``<task>-<run dir name>``
    (a multirun job: ``<task>-<sweep dir name>-<job num>``)."""
    node = (cfg.get("logger") or {}).get("wandb")
    if node is not None and node.get("group"):
        return str(node.group)
    out = Path(str(cfg.paths.output_dir))
    job = multirun_job()
    return f"{cfg.task_name}-{job['group']}-{out.name}" if job else f"{cfg.task_name}-{out.name}"


def run_id(out_dir: str | Path, key: str) -> str | None:
    """The W&B run id of ``key`` (a phase, or ``results``) in this run dir: the one recorded in
    :data:`IDS_FILE`, else a new one recorded there (None on ranks above 0, which create no runs)."""
    if not is_global_zero():
        return None
    path = Path(out_dir) / IDS_FILE
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if key not in ids:
        from wandb.sdk.lib.runid import generate_id

        ids[key] = generate_id()
        write_json(path, ids, indent=1)
    return ids[key]


def wandb_kwargs(cfg: DictConfig, node: DictConfig, key: str) -> dict[str, Any]:
    """Constructor arguments of the ``WandbLogger`` of run ``key`` (a phase, or ``results``) beyond
    ``node``: name, group, job type, tags, id (resume="allow", Lightning's default) and the config.

    Sets ``WANDB_MODE=offline`` unless ``node.offline`` is false.
    """
    if node.get("offline", True):
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    job = multirun_job()
    return {
        "name": f"{job['name'] if job else cfg.task_name}-{key}",
        "group": run_group(cfg),
        "job_type": key,
        "tags": [f"sweep-{job['group']}"] if job else [],
        "id": run_id(cfg.paths.output_dir, key),
        "resume": "allow",
        "config": resolved_config(cfg),
    }


def build_loggers(cfg: DictConfig, key: str) -> list:
    """Instantiate the loggers of ``cfg.logger`` (a dict keyed by name) for run ``key`` (a phase, or ``results``).

    Args:
        cfg: the run's config.
        key: the phase name (``dense``, ``pruned``, a baseline) or ``results``; a W&B logger
            gets :func:`wandb_kwargs`, any other its ``name``.
    """
    from hydra.utils import instantiate

    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None or "_target_" not in node:
            continue
        if is_wandb(node):
            loggers.append(wandb_logger(cfg, node, key))
        else:
            loggers.append(instantiate(node, name=key))
    return loggers


def wandb_logger(cfg: DictConfig, node: DictConfig, key: str):
    """The ``WandbLogger`` of ``node`` for run ``key`` (:func:`wandb_kwargs` passed to it directly, so
    Hydra never instantiates the ``_target_`` nodes inside the config it logs)."""
    from hydra.utils import instantiate

    return instantiate(node, _partial_=True)(**wandb_kwargs(cfg, node, key))


def phase_test_loggers(cfg: DictConfig, phase: str) -> list:
    """Loggers for the test of ``phase``'s final model: its W&B run reopened (same id) and its
    TensorBoard folder (version ``test``); CSV is left out (the test metrics are in results.json)."""
    from hydra.utils import instantiate

    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if node is None or "_target_" not in node:
            continue
        if is_wandb(node):
            loggers.append(wandb_logger(cfg, node, phase))
        elif "TensorBoardLogger" in node._target_:
            loggers.append(instantiate(node, name=phase, version="test"))
    return loggers


def finish_loggers(loggers: list) -> None:
    """Close logger runs (W&B ``finish``) so the next phase or multirun job starts its own."""
    for logger in loggers:
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()  # the logger's run, when it started one (a no-op otherwise, and on ranks above 0)


# ----------------------------------------------------------------------------- results run
def plot_files(out_dir: Path, results: dict) -> dict[str, Path]:
    """Every plot the run wrote, by name: the PNGs results.json lists under ``files`` and any
    other ``*.png`` directly in the run dir."""
    plots = {role: out_dir / rel for role, rel in (results.get("files") or {}).items() if str(rel).endswith(".png")}
    known = {p.resolve() for p in plots.values()}
    for path in sorted(out_dir.glob("*.png")):
        if path.resolve() not in known:
            plots[path.stem] = path
    return {k: p for k, p in plots.items() if p.is_file()}


def model_entries(results: dict) -> list[str]:
    """Names of the final models in results (entries with ``metrics``: dense, pruned, baselines, int8 copies)."""
    return [k for k, v in results.items() if isinstance(v, dict) and isinstance(v.get("metrics"), dict)]


def latency_rows(results: dict) -> list[list[Any]]:
    """Rows ``[model, runtime, batch size, ms per batch, speedup vs dense in that runtime]`` of every
    model's latency figures (PyTorch and ONNX Runtime)."""
    rows = []
    for name in model_entries(results):
        for key, runtime in LATENCY_KEYS.items():
            dense = get_path(results, f"dense.{key}") or {}
            for bs, ms in (results[name].get(key) or {}).items():
                ref = dense.get(bs)
                rows.append([name, runtime, int(bs), ms, ref / ms if ref and ms else None])
    return rows


def kept_token_rows(results: dict) -> tuple[list[str], list[list[Any]]]:
    """(columns ``layer`` + one per model, one row per layer) of the mean kept tokens per layer on
    the test split; no rows when no model records them."""
    names = [n for n in model_entries(results) if results[n].get("kept_tokens_per_layer")]
    if not names:
        return [], []
    layers = max(len(results[n]["kept_tokens_per_layer"]) for n in names)
    rows = [[i, *[(results[n]["kept_tokens_per_layer"] + [None] * layers)[i] for n in names]] for i in range(layers)]
    return ["layer", *names], rows


def kept_token_kind_rows(results: dict) -> list[list[Any]]:
    """Rows ``[model, layer, kind, mean tokens per sentence]`` of what each layer reads on the test split, by
    token kind (results' ``kept_token_kinds_per_layer``: [CLS], [SEP], punctuation, subword pieces, words)."""
    return [[name, layer, kind, tokens]
            for name in model_entries(results)
            for layer, kinds in enumerate(results[name].get("kept_token_kinds_per_layer") or [])
            for kind, tokens in kinds.items()]


def served_folders(out_dir: Path) -> dict[str, Path]:
    """``served/<name>/`` folders of the run that hold a ``litprune.json``, by name."""
    from serving.runtime import META_FILE

    root = out_dir / "served"
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / META_FILE).is_file()} if root.is_dir() else {}


def artifact_name(text: str) -> str:
    """``text`` with every character W&B refuses in artifact names and aliases replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)


def log_results(cfg: DictConfig, out_dir: str | Path, results: dict) -> None:
    """Log the run's conclusions to every configured logger (rank 0 only; see the module docstring).

    W&B: the ``results`` run of the run's group (same id on resume). TensorBoard: the headline
    figures as hparams metrics of ``tensorboard/results`` with the flattened config. Other
    loggers (CSV): the headline figures as metrics and the config as hyperparameters.
    """
    if not is_global_zero():
        return
    out_dir = Path(out_dir)
    figures = {k: v for k, v in headline_figures(results).items() if v is not None}
    numbers = {k: float(v) for k, v in figures.items() if isinstance(v, (int, float))}
    config = resolved_config(cfg)
    loggers = build_loggers(cfg, RESULTS)
    try:
        for logger in loggers:
            kind = type(logger).__name__
            if kind == "WandbLogger":
                log_wandb_results(logger, cfg, out_dir, results, figures)
            elif kind == "TensorBoardLogger":
                logger.log_hyperparams(config, metrics=numbers)
            else:
                logger.log_hyperparams(config)
                logger.log_metrics(numbers, step=0)
    finally:
        finish_loggers(loggers)


def log_wandb_results(logger, cfg: DictConfig, out_dir: Path, results: dict, figures: dict[str, Any]) -> None:
    """Fill the W&B results run: summary, results.json, plots, tables, served models (see the module docstring)."""
    import wandb

    run = logger.experiment
    run.summary.update(figures)
    results_file = out_dir / "results.json"
    if results_file.is_file():
        run.save(str(results_file), base_path=str(out_dir), policy="now")
    media: dict[str, Any] = {f"plots/{role}": wandb.Image(str(path)) for role, path in plot_files(out_dir, results).items()}
    lat = latency_rows(results)
    if lat:
        media["latency"] = wandb.Table(columns=["model", "runtime", "batch_size", "ms", "speedup_vs_dense"], data=lat)
    columns, rows = kept_token_rows(results)
    if rows:
        media["kept_tokens_per_layer"] = wandb.Table(columns=columns, data=rows)
    kinds = kept_token_kind_rows(results)
    if kinds:
        media["kept_token_kinds_per_layer"] = wandb.Table(columns=["model", "layer", "kind", "tokens"], data=kinds)
    if media:
        run.log(media)
    group = artifact_name(run_group(cfg))
    for name, folder in served_folders(out_dir).items():
        from serving.runtime import META_FILE

        meta = json.loads((folder / META_FILE).read_text())
        artifact = wandb.Artifact(artifact_name(f"{cfg.task_name}-{name}"), type="model", metadata=meta,
                                  description=f"served/{name} of run group {run_group(cfg)} (ONNX model and serving files)")
        # "immutable": the files are referenced where they are, not copied to W&B's staging folder
        artifact.add_dir(str(folder), policy="immutable")
        run.log_artifact(artifact, aliases=["latest", group])


# ----------------------------------------------------------------------------- sweeps
def log_sweep(config: DictConfig, sweep_dir: Path) -> None:
    """The sweep's own W&B run (``<sweep dir name>-sweep``, job type ``sweep``, tagged like its jobs): the
    sweep summary (``summary.csv``) as a table and its Pareto front plot as an image. No-op without a W&B logger."""
    node = (config.get("logger") or {}).get("wandb")
    if not is_wandb(node) or not (sweep_dir / "summary.csv").is_file():
        return
    import csv

    import wandb

    if node.get("offline", True):
        os.environ["WANDB_MODE"] = "offline"
    with (sweep_dir / "summary.csv").open() as f:
        rows = list(csv.reader(f))
    run = wandb.init(
        project=node.get("project"), dir=str(sweep_dir), name=f"{sweep_dir.name}-sweep", group=f"sweep-{sweep_dir.name}",
        job_type="sweep", tags=[f"sweep-{sweep_dir.name}"], reinit="finish_previous",
    )
    try:
        media: dict[str, Any] = {}
        if len(rows) > 1:
            media["sweep/summary"] = wandb.Table(columns=rows[0], data=rows[1:])
        if (sweep_dir / "pareto.png").is_file():
            media["plots/pareto_front"] = wandb.Image(str(sweep_dir / "pareto.png"))
        if media:
            run.log(media)
    finally:
        run.finish()
