"""One run flow for every model: fit the dense model, prune it, then serve, test, time, export, quantize, report.

:func:`run` asks what differs between models of its task (``model.task``, a
:class:`pipelines.tasks.base.Task` named by ``_target_``) and of its pruner (the protocol of
``pruners.base``), and nothing else. Phases (each a Lightning fit with its own checkpoints
under ``checkpoints/<phase>`` and its own logger run, :func:`pipelines.common.fit_phase`):

1. ``dense``: the dense model, fitted for the pruner's teacher epochs
   (:meth:`~pruners.base.Pruner.teacher_plan`; ``trainer.max_epochs`` without a pruner) with
   the checkpoint chosen by ``model.monitor``, or taken from the teacher cache
   (``pipelines.teacher_cache``) or from the plan's checkpoint (``pruner.teacher_ckpt``). The
   task may check it before any pruner starts from it (text: against the majority-class rate,
   :mod:`pipelines.teacher`), and tests it.
2. the pruner's phases (:meth:`~pruners.base.Pruner.phases`): ``pruned`` for a plain pruner,
   one per stage for a composite (``pruners.composite``), in order; each starts from the
   previous phase's kept checkpoint (the first from the dense one) as the task says
   (:meth:`~pipelines.tasks.base.Task.start_module`: a copy of it for text, a fresh model for
   a stream), has its pruner attached as a callback and is fitted as that pruner's
   :meth:`~pruners.base.Pruner.fit_plan` says. The last phase's model is the pruned model
   (``pruned`` in the results); an earlier phase's model is a final model of its own, under
   the phase's name (``results["phases"]``: phase -> results entry, in order).
3. one phase per baseline the pruner names (:meth:`~pruners.base.Pruner.baselines`, e.g.
   SwiftPruner's ``uniform``), from the dense checkpoint, run the same way.

Then, on rank 0: each final model's served copy (``served_model()``) gets the task's figures
(MACs, parameters, ...), is exported to ``served/<name>/`` with an ONNX Runtime parity check,
copied to int8 (``export.quantize``), and timed with every other model in interleaved rounds
(:func:`serve_and_time`); the task adds its last figures and plots. ``target_met`` is one
rule: every pruner phase whose plan monitors a metric kept a checkpoint that met its
criterion (``checkpoint_met_target``), and the pruner's own ``target_met`` (when it reports one).

Under several ranks every rank fits and tests; each rank's digest of its masks and gates
(``results["distributed"]``) is taken from the models it holds in memory after each fit,
before any checkpoint (written by rank 0) is reloaded.
"""

from __future__ import annotations

import logging
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from modules.core.errors import ConfigError
from modules.served.latency import measure_latency_rounds, protocol
from pipelines.common import build, check_data_kind, check_settings_apply, fit_phase, run_relative
from pipelines.distributed import distributed_summary, is_global_zero, memory_digest
from pipelines.export import add_runtime_speedups, export_models, max_abs_diff, onnxruntime_version, write_served_folder
from pipelines.sweep import multirun_job
from pipelines.tasks.base import DenseCheck, Task
from pipelines.teacher_cache import dense_teacher
from pipelines.threads import latency_threads
from pruners.base import FitPlan, Pruner
from serving.runtime import graph_feeds

log = logging.getLogger(__name__)


def build_task(cfg: DictConfig) -> Task:
    """The run's task: ``cfg.model.task`` instantiated.

    Raises:
        ConfigError: the model config names no task, or its ``_target_`` is not a :class:`~pipelines.tasks.base.Task`.
    """
    node = OmegaConf.select(cfg, "model.task")
    if node is None or not node.get("_target_"):
        raise ConfigError(f"model={cfg.model.get('name')} names no task: set model.task._target_ in its config "
                          "(e.g. pipelines.tasks.text_classification.TextClassificationTask, as conf/model/bert.yaml does).")
    task = build(node)
    if not isinstance(task, Task):
        raise ConfigError(f"model.task._target_={node._target_} is not a task: it must name a subclass of "
                          "pipelines.tasks.base.Task.")
    return task


def _numpy(feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors to arrays, by name."""
    return {k: v.numpy() for k, v in feeds.items()}


def prune_phase(
    cfg: DictConfig, phase: str, pruner: Pruner, start: str, task: Task, teacher: torch.nn.Module, datamodule,
    out_dir: Path,
) -> tuple[dict[str, Any], L.LightningModule, torch.nn.Module, str]:
    """Fit one pruner phase and test its final model.

    Args:
        cfg: the run's config.
        phase: phase name (``pruned``, a composite's stage or a baseline's name).
        pruner: the pruner (a callback), asked through its protocol only.
        start: the checkpoint the phase starts from: the dense one, or the previous phase's
            (a composite's later stage starts from the model, and the decisions, of the one before).
        task: the run's task (what the phase fits, what it keeps, how it is tested).
        teacher: the dense network, handed over when the pruner asks for a teacher.
        datamodule: the set-up data module.
        out_dir: the run dir (checkpoint paths are recorded relative to it).

    Returns:
        (the results entry: ``checkpoint``, ``checkpoint_met_target`` when the plan monitors a metric,
        the task's test entries, ``pruner``: the pruner's results; the kept module; its served copy;
        the digest of the fitted model as this rank holds it, :func:`pipelines.distributed.memory_digest`).
    """
    student = task.start_module(cfg, datamodule, start)
    plan = pruner.fit_plan()
    if plan.model_lr:
        student.hparams.lr = plan.model_lr
    if pruner.teacher_plan() is not None:
        pruner.set_teacher(teacher)
    path, score = fit_phase(cfg, phase, student, datamodule, plan, extra_callbacks=[pruner],
                            checkpoint_every_batch=task.checkpoint_every_batch)
    digest = memory_digest(student)  # this rank's own decisions, before the checkpoint rank 0 wrote is reloaded
    kept = task.kept_module(cfg, datamodule, phase, student, path, fitted=True)
    del student
    served = kept.served_model()
    entry: dict[str, Any] = {"checkpoint": run_relative(path, out_dir)}
    if plan.monitor is not None:
        entry["checkpoint_met_target"] = score is not None  # the kept checkpoint met the pruner's criterion
    entry.update(task.evaluate(cfg, datamodule, phase, kept, served))
    entry["pruner"] = pruner.results()
    return entry, kept, served, digest


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run every phase of the model's task and pruner; return the results dict (see the module docstring and README).

    Raises:
        ConfigError: no usable task, or data of the wrong kind for the model (before loading it).
        pruners.base.PrunerConfigError: the pruner cannot prune this model or data (before any training).
        modules.core.errors.DataError: unusable data.
        modules.core.errors.UserError: the task's check of the dense model refuses it (text:
            :class:`pipelines.teacher.MajorityClassTeacherError`, after the dense phase, before any pruning phase).
    """
    out_dir = Path(out_dir)
    task = build_task(cfg)
    if task.data_base is not None:
        check_data_kind(cfg, task.data_base, task.data_needs)
    pruner: Pruner | None = build(cfg.pruner, _convert_="all") if cfg.pruner.get("_target_") else None  # validates settings first
    check_settings_apply(cfg, pruner)  # a setting the model or pruner replaces is refused, naming the one that applies
    datamodule = task.build_data(cfg)
    dense_module = task.build_module(cfg, datamodule)
    if pruner is not None:
        pruner.check(dense_module, datamodule)

    teacher_plan = pruner.teacher_plan() if pruner is not None else None
    cached = None  # the teacher cache's record (pipelines.teacher_cache), when it is used
    fitted: dict[str, float | None] = {}  # the dense phase's best monitored value, when it ran or was restored here
    checks: list[DenseCheck] = []  # the task's check of each dense checkpoint looked at, in order

    def check(path: str) -> DenseCheck | None:
        """The task's check of the dense checkpoint at ``path`` (None: the task has none)."""
        found = task.dense_check(cfg, datamodule, path, fitted.get("score"))
        if found is not None:
            checks.append(found)
        return found

    monitor = cfg.model.get("monitor")
    if teacher_plan is not None and teacher_plan.checkpoint is not None:
        dense_ckpt = teacher_plan.checkpoint
    else:
        epochs = teacher_plan.epochs if teacher_plan is not None else None
        plan = FitPlan(max_epochs=epochs, monitor=monitor)

        def fit() -> str:
            """Fit the dense phase; remember its best monitored score."""
            path, fitted["score"] = fit_phase(cfg, "dense", dense_module, datamodule, plan,  # noqa: F821 (called before the del below)
                                              checkpoint_every_batch=task.checkpoint_every_batch)
            return path

        def usable(path: str) -> bool:
            """Whether the teacher cache may store or serve this dense checkpoint."""
            found = check(path)
            return found is None or found.usable

        # only a teacher the task finds usable is stored in the cache or served from it
        dense_ckpt, cached = dense_teacher(cfg, out_dir, epochs, monitor, fit, multirun_job() is not None, usable=usable)
    digests = {"dense": memory_digest(dense_module)}  # (no pruning decisions: shapes only)
    # the cache checks the teacher it serves or stores (a hit under the entry's path), so its last check is this one
    dense_check = checks[-1] if checks else check(dense_ckpt)
    if dense_check is not None:  # before anything else is written: a pruner would start from (and distil from) this model
        task.act_on_dense_check(cfg, dense_check, prunes=pruner is not None, run_dir=out_dir)
    kept = {"dense": task.kept_module(cfg, datamodule, "dense", dense_module, dense_ckpt, fitted="score" in fitted)}
    del dense_module
    served = {"dense": kept["dense"].served_model()}
    results: dict[str, Any] = {"task": cfg.task_name, **task.describe(cfg, datamodule)}
    results["dense"] = {"checkpoint": run_relative(dense_ckpt, out_dir),
                        **task.evaluate(cfg, datamodule, "dense", kept["dense"], served["dense"])}
    if dense_check is not None:
        results["dense"].update(dense_check.figures)
    if cached is not None:
        results["teacher_cache"] = cached
    files: dict[str, str] = {}

    if pruner is not None:
        teacher = task.teacher(served["dense"])
        start, phases, met = dense_ckpt, pruner.phases(), True
        for i, (phase, stage) in enumerate(phases):
            name = "pruned" if i == len(phases) - 1 else phase
            results[name], kept[name], served[name], digests[name] = prune_phase(
                cfg, phase, stage, start, task, teacher, datamodule, out_dir)
            results[name].pop("pruner")  # the pruner's results (a composite's: every stage's) come once, below
            start = str(out_dir / results[name]["checkpoint"])  # the next phase starts from this one's model
            met = met and results[name].get("checkpoint_met_target", True)
        if len(phases) > 1:
            results["phases"] = {p: ("pruned" if i == len(phases) - 1 else p) for i, (p, _) in enumerate(phases)}
        results["pruner"] = pruner.results()
        results["target_met"] = met and results["pruner"].get("target_met", True)
        if is_global_zero():
            files.update(pruner.write_files(out_dir))
        for name, baseline in pruner.baselines().items():
            results[name], kept[name], served[name], digests[name] = prune_phase(
                cfg, name, baseline, dense_ckpt, task, teacher, datamodule, out_dir)
            if is_global_zero():
                files.update({f"{name}/{k}": v for k, v in baseline.write_files(out_dir).items()})

    results["distributed"] = distributed_summary(digests)
    if not is_global_zero():  # rank 0 times, exports and writes; the others are done
        return results
    task.figures(cfg, datamodule, results, kept, served)
    if pruner is not None:
        figures = pruner.served_figures(served["pruned"], served["dense"])  # e.g. the final model against a latency budget
        if figures:
            results["pruner"]["final_served"] = figures
    serve_and_time(cfg, task, out_dir, results, served, datamodule)
    files.update(task.finish(cfg, datamodule, out_dir, results, served))
    if files:
        results["files"] = files
    return results


# ---------------------------------------------------------------------------------------------- serving


def export_served(
    cfg: DictConfig, task: Task, out_dir: Path, served: dict[str, torch.nn.Module], datamodule,
    results: dict[str, Any] | None = None,
) -> tuple[dict[str, dict], dict[str, Any], dict[str, torch.nn.Module]]:
    """Export each served model to ``served/<name>/`` and check ONNX Runtime against PyTorch on the task's
    parity batches (:meth:`~pipelines.tasks.base.Task.parity_batches`).

    ``results`` (the run's, when given) lets the task add measured figures to litprune.json
    (:meth:`~pipelines.tasks.base.Task.served_meta`).

    Returns:
        (name -> results ``served`` entry, name -> ONNX Runtime session, name -> exportable); see :mod:`pipelines.export`.
    """
    batches = task.parity_batches(cfg, datamodule)
    example = task.export_example(cfg, datamodule)
    folders, parity, exportables = {}, {}, {}
    for name, model in served.items():
        exportable = exportables[name] = task.exportable(model)
        meta = task.served_meta(name, exportable, results or {})
        folders[name] = partial(
            write_served_folder, out_dir, name, exportable, task.feeds(exportable, example), exportable.dynamic_axes(),
            meta, datamodule.write_serving_files, int(cfg.export.opset),
        )
        with torch.no_grad():
            reference = [task.logits(model, b) for b in batches]
        feeds = [_numpy(task.feeds(exportable, b)) for b in batches]
        parity[name] = partial(max_abs_diff, feeds=feeds, reference=reference)
    entries, sessions = export_models(cfg, out_dir, folders, parity)
    return entries, sessions, exportables


def _outputs(task: Task, session, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The session's logits on each batch (:meth:`~pipelines.tasks.base.Task.onnx_logits` of its first output)."""
    from pipelines.quantize import run_batches

    return [task.onnx_logits(run_batches(session, [f])) for f in feeds]


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Batches concatenated along the batch axis (an empty float array for none)."""
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def quantize_models(
    cfg: DictConfig, task: Task, out_dir: Path, results: dict[str, Any], exported: dict[str, dict],
    sessions: dict[str, Any], exportables: dict[str, torch.nn.Module], datamodule,
) -> dict[str, Any]:
    """Make the int8 copy of every exported model (``export.quantize``, :mod:`pipelines.quantize`) and score it.

    Static calibration uses the task's calibration feeds (:meth:`~pipelines.tasks.base.Task.calibration`).
    Each int8 model's results entry (``<name>-int8``) holds ``quantized_from``, ``quantization``
    (litprune.json's record), ``served`` (folder, ``onnx_bytes``, ``size_vs_fp32``), the task's
    scores from ONNX Runtime's logits on its test split (:meth:`~pipelines.tasks.base.Task.onnx_scores`:
    ``metrics``, ...) and ``agreement`` with its fp32 model in ONNX Runtime on the same inputs
    (:func:`pipelines.quantize.agreement`). Models ONNX Runtime cannot quantize go to
    ``results["quantize_errors"]``.

    Returns:
        int8 name -> ONNX Runtime session (timed with the others).
    """
    from pipelines.quantize import INT8_SUFFIX, agreement, int8_entry, quantize_served, record_failures
    from serving.runtime import MODEL_FILE, make_session

    if not exported:
        return {}
    first = exportables[next(iter(exported))]  # every served model of a run takes the same inputs
    calibration, source = None, None
    if cfg.export.quantize == "static":
        calibration, source = task.calibration(cfg, datamodule, first)
    folders, errors = quantize_served(cfg, out_dir, exported, calibration, source)
    record_failures(results, errors)
    if not folders:
        return {}
    batches, labels, split = task.onnx_test_split(datamodule)
    feeds = [_numpy(task.feeds(first, b)) for b in batches]
    out = {}
    for name, folder in folders.items():
        source_name = name.removesuffix(INT8_SUFFIX)
        entry = int8_entry(source_name, folder, out_dir, exported[source_name]["onnx_bytes"])
        session = make_session(folder / MODEL_FILE, latency_threads(cfg))
        fp32, int8 = _outputs(task, sessions[source_name], feeds), _outputs(task, session, feeds)
        entry.update(task.onnx_scores(datamodule, fp32, int8, labels))
        entry["agreement"] = {**agreement(_concat(fp32), _concat(int8)), "with": f"{source_name} in ONNX Runtime, {split}"}
        results[name] = entry
        out[name] = session
    return out


def time_models_rounds(
    cfg: DictConfig, task: Task, served: dict[str, torch.nn.Module], datamodule,
    sessions: dict[str, Any] | None = None, exportables: dict[str, torch.nn.Module] | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """Latency (ms per batch) of each model per batch size in every round, measured interleaved on the same inputs.

    Settings: ``cfg.latency`` (``batch_sizes``, ``warmup``, ``repeats``; threads:
    :func:`pipelines.threads.latency_threads`). Each model runs the task's latency batches
    (:meth:`~pipelines.tasks.base.Task.latency_batches`) once per call; its time is per batch.

    Args:
        served: name -> served model (eval mode is set here).
        sessions: name -> ONNX Runtime session, timed in the same rounds under ``<name>@onnxruntime``;
            an int8 copy (``<name>-int8``) takes the inputs of its source's exportable.
        exportables: name -> exportable of each fp32 model with a session (its input names).

    Returns:
        (name -> {batch size as str -> ``repeats`` ms per batch, one per round}, the protocol dict).
        With the task's A/A control (:attr:`~pipelines.tasks.base.Task.latency_aa_control`) the dense
        model is timed twice, the second time as ``dense_again``.
    """
    from pipelines.quantize import INT8_SUFFIX

    lat = cfg.latency
    threads = latency_threads(cfg)
    sessions, exportables = sessions or {}, exportables or {}
    for m in served.values():
        m.eval()
    rounds: dict[str, dict[str, list[float]]] = {}
    for bs in lat.batch_sizes:
        batches = task.latency_batches(cfg, datamodule, int(bs))

        def call_torch(model: torch.nn.Module, batches: list = batches):
            """A zero-argument call running ``model`` on every latency batch."""
            return lambda: [task.logits(model, b) for b in batches]

        def call_ort(session, feeds: list[dict]):
            """A zero-argument call running the ONNX Runtime session on every latency batch."""
            return lambda: [session.run(None, f) for f in feeds]

        calls = {name: call_torch(m) for name, m in served.items()}
        if task.latency_aa_control:
            calls["dense_again"] = call_torch(served["dense"])  # A/A control: the same model timed twice
        for name, session in sessions.items():
            exportable = exportables[name.removesuffix(INT8_SUFFIX)]
            feeds = [graph_feeds(session, _numpy(task.feeds(exportable, b))) for b in batches]
            calls[f"{name}@onnxruntime"] = call_ort(session, feeds)
        for name, ms in measure_latency_rounds(calls, int(lat.warmup), int(lat.repeats), threads).items():
            rounds.setdefault(name, {})[str(bs)] = [v / len(batches) for v in ms]
    proto = protocol(threads=threads, warmup=int(lat.warmup), repeats=int(lat.repeats), what=task.latency_what(cfg))
    if sessions:
        proto["onnxruntime"] = (
            "ONNX Runtime CPU session of served/<name>/model.onnx (graph optimisations ORT_ENABLE_ALL, "
            f"sequential, intra-op threads = threads, no spinning), onnxruntime {onnxruntime_version()}; "
            f"timed in the same interleaved rounds on the same {task.timed_on} (int8 copies, served/<name>-int8/, too)"
        )
    return rounds, proto


def median_ms(rounds: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Median over the rounds of :func:`time_models_rounds`' timings: name -> {batch size -> ms per batch}."""
    return {name: {bs: statistics.median(v) for bs, v in per.items()} for name, per in rounds.items()}


def serve_and_time(
    cfg: DictConfig, task: Task, out_dir: Path, results: dict[str, Any], served: dict[str, torch.nn.Module], datamodule,
) -> None:
    """Export the served models (when ``export.enabled``), time them in PyTorch and ONNX Runtime, record it all.

    Fills, per model, ``served`` (:func:`export_served`), ``latency_ms`` and
    ``latency_ms_onnxruntime`` (by batch size), ``speedup`` (dense / model, PyTorch),
    ``speedup_onnxruntime`` and ``speedup_vs_dense_torch``
    (:func:`pipelines.export.add_runtime_speedups`), and the top-level ``latency_protocol``,
    ``speedup`` (of ``pruned``) and, with the task's A/A control, ``latency_aa_ratio`` (dense /
    dense timed again, by batch size). With ``export.quantize``, each model's int8 copy is a
    model of its own (``<name>-int8``, :func:`quantize_models`), timed in ONNX Runtime in the
    same rounds. Used by a run and by ``export.py`` on a finished run (``served`` must hold ``dense``).
    """
    sessions, int8, exportables = {}, {}, {}
    if cfg.export.enabled:
        exported, sessions, exportables = export_served(cfg, task, out_dir, served, datamodule, results)
        for name, entry in exported.items():
            results[name]["served"] = entry
        int8 = quantize_models(cfg, task, out_dir, results, exported, sessions, exportables, datamodule)
    rounds, proto = time_models_rounds(cfg, task, served, datamodule, {**sessions, **int8}, exportables)
    latency = median_ms(rounds)
    for name in served:
        results[name]["latency_ms"] = latency[name]
        if name in sessions:
            results[name]["latency_ms_onnxruntime"] = latency[f"{name}@onnxruntime"]
    for name in int8:
        results[name]["latency_ms_onnxruntime"] = latency[f"{name}@onnxruntime"]
    if "dense_again" in latency:
        results["latency_aa_ratio"] = {b: latency["dense"][b] / latency["dense_again"][b] for b in latency["dense"]}
    results["latency_protocol"] = proto
    d = results["dense"]
    for name in served:
        if name != "dense":
            results[name]["speedup"] = {b: d["latency_ms"][b] / results[name]["latency_ms"][b] for b in d["latency_ms"]}
    if "pruned" in results:
        results["speedup"] = results["pruned"]["speedup"]
    add_runtime_speedups(results, [*served, *int8])
