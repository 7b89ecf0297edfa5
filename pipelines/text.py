"""The text classification pipeline: fine-tune a dense model, prune it, test and time every final model.

Phases (each a Lightning fit with its own checkpoints under ``checkpoints/<phase>`` and
its own logger run, :func:`pipelines.common.fit_phase`):

1. ``dense``: fine-tune the dense model for at least its warm-up and
   ``callbacks.early_stopping.min_epochs``, then until its validation metric converges
   (``callbacks.early_stopping``, :class:`pipelines.teacher.EarlyStoppingAfterMinimum`), for at
   most the pruner's teacher epochs (:meth:`~pruners.base.Pruner.teacher_plan`), or
   ``trainer.max_epochs`` without a pruner; skipped when the plan names a checkpoint
   (``pruner.teacher_ckpt``). Its validation accuracy is compared with the majority-class rate
   (:func:`pipelines.teacher.teacher_check`; ``dense.beats_majority_class``): a dense model that
   does not beat it stops the run before the pruning phase
   (:class:`pipelines.teacher.MajorityClassTeacherError`) unless ``allow_majority_class_teacher``.
2. the pruner's phases (:meth:`~pruners.base.Pruner.phases`): ``pruned`` for a plain
   pruner, one per stage for a composite (``pruners.composite``), in order; each starts from
   a copy of the previous phase's kept checkpoint (the first from the dense one), has its
   pruner attached as a callback and is fitted as that pruner's
   :meth:`~pruners.base.Pruner.fit_plan` says. The last phase's model is the pruned model
   (``pruned`` in the results); an earlier phase's model is a final model of its own, under
   the phase's name (``results["phases"]``: phase -> results entry, in order).
3. one phase per baseline the pruner names (:meth:`~pruners.base.Pruner.baselines`, e.g.
   SwiftPruner's ``uniform``), run the same way.

The pipeline asks the pruner only through the protocol of ``pruners.base``. Every final
model is reloaded from its checkpoint, turned into its served copy by the module
(``served_model()``: pruned tokens gathered out, masked heads and FFN neurons removed),
tested on the test split and timed in this process on the same test inputs. Under several
ranks, each rank's digest of its masks and gates (``results["distributed"]``) is taken from the
models it holds in memory after each fit, before any checkpoint (written by rank 0) is reloaded.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from modules.served.latency import measure_latency_rounds, protocol
from modules.served.served_bert import ExportableBert
from modules.data.text_data import TextClassificationDataModule
from pipelines.common import build, build_trainer, check_data_kind, fit_phase, run_relative
from pipelines.export import add_runtime_speedups, export_models, max_abs_diff, onnxruntime_version, write_served_folder
from pipelines.sweep import multirun_job
from pipelines.teacher import act_on_teacher_check, teacher_check
from pipelines.teacher_cache import dense_teacher
from pipelines.threads import latency_threads
from pipelines.tracking import finish_loggers, phase_test_loggers
from serving.runtime import graph_feeds
from pipelines.distributed import distributed_summary, is_global_zero, memory_digest
from pruners.base import FitPlan, Pruner

log = logging.getLogger(__name__)


def evaluate_test_split(cfg: DictConfig, module: L.LightningModule, datamodule, phase: str | None = None) -> dict[str, float]:
    """Test-split metrics by name (``accuracy``, ``f1``, ..., ``macs_per_sample``, ``sparsity``).

    Under several ranks every rank tests the whole split (no distributed sampler, so no padded
    duplicates) and torchmetrics syncs the counts: the figures equal one process's.

    Args:
        phase: the phase whose final model this is: its logger runs (its W&B run, reopened)
            get the ``test/*`` metrics (``pipelines.tracking.phase_test_loggers``); None logs nothing.
    """
    loggers = phase_test_loggers(cfg, phase) if phase is not None else []
    try:
        trainer = build_trainer(cfg, "test", [], loggers, enable_checkpointing=False, enable_progress_bar=False,
                                use_distributed_sampler=False)
        (raw,) = trainer.test(module, datamodule=datamodule, verbose=False)
    finally:
        finish_loggers(loggers)
    return {k.removeprefix("test/"): float(v) for k, v in raw.items()}


def latency_batches(datamodule, batch_size: int, examples: int, split: str = "test") -> list[dict[str, torch.Tensor]]:
    """Consecutive batches of ``batch_size`` covering the first ``max(examples, batch_size)`` examples of ``split``."""
    ds = datamodule.datasets[split]
    n = min(len(ds), max(examples, batch_size))
    return [datamodule.collate([ds[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)]


def time_models_rounds(
    models: dict[str, L.LightningModule],
    datamodule,
    batch_sizes: list[int],
    warmup: int,
    repeats: int,
    threads: int | None,
    examples: int = 32,
    sessions: dict[str, Any] | None = None,
) -> tuple[dict, dict]:
    """Latency (ms per batch) of each model per batch size in every round, measured interleaved on the same inputs.

    Args:
        models: name -> served module; each runs in eval mode (pruned tokens removed).
        datamodule: a set-up text data module; inputs come from its test split.
        batch_sizes: batch sizes to time.
        warmup, repeats, threads: see :func:`modules.served.latency.measure_latency_rounds`.
        examples: inputs are the first ``max(examples, batch size)`` test examples.
        sessions: name -> ONNX Runtime session of the exported model, timed in the same
            rounds on the same inputs under the key ``<name>@onnxruntime``.

    Returns:
        (name -> {batch size as str -> ``repeats`` ms per batch, one per round}, the protocol dict).
    """
    sessions = sessions or {}
    rounds: dict[str, dict[str, list[float]]] = {name: {} for name in [*models, *(f"{n}@onnxruntime" for n in sessions)]}
    for m in models.values():
        m.eval()
    for bs in batch_sizes:
        batches = latency_batches(datamodule, int(bs), examples)

        def make(m: L.LightningModule):
            """A zero-argument call running ``m`` on every latency batch."""

            def call():
                """Run every latency batch once."""
                for b in batches:
                    m(b)

            return call

        def make_ort(session, feeds: list[dict]):
            """A zero-argument call running the ONNX Runtime session on every latency batch."""

            def call():
                """Run every latency batch once."""
                for f in feeds:
                    session.run(None, f)

            return call

        calls = {name: make(m) for name, m in models.items()}
        for name, session in sessions.items():
            feeds = [graph_feeds(session, {k: v.numpy() for k, v in ExportableBert.feeds(b).items()}) for b in batches]
            calls[f"{name}@onnxruntime"] = make_ort(session, feeds)
        for name, ms in measure_latency_rounds(calls, warmup, repeats, threads).items():
            rounds[name][str(bs)] = [v / len(batches) for v in ms]
    proto = protocol(
        threads=threads or torch.get_num_threads(),
        warmup=warmup,
        repeats=repeats,
        what=(
            f"forward pass of the classifier (embeddings to logits) per batch, averaged over the batches of the "
            f"first {examples} test examples (or one batch if larger) in test order, padded to the longest in each "
            "batch; served models: pruned tokens physically removed (gathered out) before each pruning layer, "
            "masked heads and FFN neurons physically removed; models measured interleaved in one process"
        ),
    )
    return rounds, proto


def median_ms(rounds: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Median over the rounds of :func:`time_models_rounds`' timings: name -> {batch size -> ms per batch}."""
    return {name: {bs: statistics.median(v) for bs, v in per.items()} for name, per in rounds.items()}


@torch.no_grad()
def kept_tokens_per_layer(module: L.LightningModule, datamodule) -> dict[str, Any]:
    """What each layer reads, over the test split: how many tokens, and of which kinds.

    Returns:
        ``kept_tokens_per_layer``: per layer, the mean tokens per sentence (CLS included,
        padding excluded) its attention computes on; ``kept_token_kinds_per_layer``: per
        layer, ``{kind: mean tokens per sentence}`` for the kinds of
        :meth:`modules.data.text_data.TextClassificationDataModule.token_kinds` ([CLS], [SEP],
        punctuation, subword pieces, other words), summing to the layer's kept tokens.
    """
    module.eval()
    kinds_of = datamodule.token_kinds()
    names = datamodule.TOKEN_KINDS
    lengths: torch.Tensor | None = None  # (L,) summed kept tokens
    kinds: torch.Tensor | None = None  # (L, kinds) summed kept tokens by kind
    count = 0
    for batch in datamodule.test_dataloader():
        out = module(batch, return_kept_masks=True)
        ids_kind = kinds_of[batch["input_ids"].cpu()]  # (B, N)
        per = torch.stack([n.sum().cpu().double() for n in out.kept_lengths])
        by_kind = torch.stack([
            torch.bincount(ids_kind[m.cpu()], minlength=len(names)).double() for m in out.kept_masks
        ])
        lengths = per if lengths is None else lengths + per
        kinds = by_kind if kinds is None else kinds + by_kind
        count += batch["input_ids"].shape[0]
    if lengths is None:
        return {"kept_tokens_per_layer": [], "kept_token_kinds_per_layer": []}
    return {
        "kept_tokens_per_layer": (lengths / count).tolist(),
        "kept_token_kinds_per_layer": [
            {k: float(v) for k, v in zip(names, row / count)} for row in kinds
        ],
    }


def export_text_models(
    cfg: DictConfig, out_dir: Path, models: dict[str, L.LightningModule], datamodule, results: dict[str, Any] | None = None
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Export each served model to ``served/<name>/`` and check ONNX Runtime against PyTorch.

    Parity inputs: the first ``export.parity_examples`` test examples in batches of 32,
    padded per batch as the test loader pads.

    ``results`` (the run's, when given) adds each model's measured ``kept_tokens_per_layer``
    and MACs ``sparsity`` on the test split to the pruning summary in litprune.json.

    Returns:
        (name -> results ``served`` entry, name -> ONNX Runtime session); see :mod:`pipelines.export`.
    """
    batches = latency_batches(datamodule, 32, int(cfg.export.parity_examples))
    folders, parity = {}, {}
    for name, module in models.items():
        exportable = module.exportable()
        pruning = exportable.summary()
        measured = (results or {}).get(name, {})
        if "kept_tokens_per_layer" in measured:
            pruning["kept_tokens_per_layer_test_mean"] = measured["kept_tokens_per_layer"]
        if "sparsity" in measured.get("metrics", {}):
            pruning["macs_sparsity_test"] = measured["metrics"]["sparsity"]
        meta = {"kind": "text", **exportable.io_meta(), "pruning": pruning}
        folders[name] = partial(
            write_served_folder, out_dir, name, exportable, exportable.feeds(batches[0]), exportable.dynamic_axes(),
            meta, datamodule.write_serving_files, int(cfg.export.opset),
        )
        with torch.no_grad():
            reference = [module(b).logits for b in batches]
        feeds = [{k: v.numpy() for k, v in exportable.feeds(b).items()} for b in batches]
        parity[name] = partial(max_abs_diff, feeds=feeds, reference=reference)
    return export_models(cfg, out_dir, folders, parity)


def quantize_text_models(
    cfg: DictConfig, out_dir: Path, results: dict[str, Any], served: dict[str, dict], sessions: dict[str, Any], datamodule
) -> dict[str, Any]:
    """Make the int8 copy of every exported model (``export.quantize``) and score it on the whole test split.

    Static calibration uses the first ``export.calibration_examples`` training examples in
    batches of 32, padded per batch. Each int8 model's results entry (``<name>-int8``) holds
    ``quantized_from``, ``quantization`` (litprune.json's record), ``served`` (folder,
    ``onnx_bytes``, ``size_vs_fp32``: int8 bytes / fp32 bytes), ``metrics`` (test split, from
    ONNX Runtime's logits, the run's metrics) and ``agreement`` with its fp32 model in ONNX
    Runtime on the same test batches (:func:`pipelines.quantize.agreement`). Models ONNX Runtime
    cannot quantize go to ``results["quantize_errors"]``.

    Returns:
        int8 name -> ONNX Runtime session (timed with the others).
    """
    from modules.lit.bert_classifier import build_metrics
    from pipelines.quantize import agreement, int8_entry, quantize_served, record_failures, run_batches
    from serving.runtime import MODEL_FILE, make_session

    calibration, source = None, None
    if cfg.export.quantize == "static":
        batches = latency_batches(datamodule, 32, int(cfg.export.calibration_examples), split="train")
        calibration = [{k: v.numpy() for k, v in ExportableBert.feeds(b).items()} for b in batches]
        n = sum(int(b["input_ids"].shape[0]) for b in batches)
        source = f"the first {n} training examples in order, batches of 32 padded per batch"
    folders, errors = quantize_served(cfg, out_dir, served, calibration, source)
    record_failures(results, errors)
    if not folders:
        return {}
    feeds, labels = [], []
    for b in datamodule.test_dataloader():
        feeds.append({k: v.numpy() for k, v in ExportableBert.feeds(b).items()})
        labels.append(b["labels"])
    labels_t = torch.cat(labels)
    out = {}
    for name, folder in folders.items():
        source_name = name.removesuffix("-int8")
        entry = int8_entry(source_name, folder, out_dir, served[source_name]["onnx_bytes"])
        session = make_session(folder / MODEL_FILE, latency_threads(cfg))
        fp32_logits, int8_logits = run_batches(sessions[source_name], feeds), run_batches(session, feeds)
        # rank 0 alone scores the int8 models (the other ranks are done): no sync across ranks
        metrics = build_metrics(list(datamodule.metrics), datamodule.num_labels, sync_on_compute=False)
        metrics.update(torch.from_numpy(int8_logits).argmax(dim=-1), labels_t)
        entry["metrics"] = {k: float(v) for k, v in metrics.compute().items()}
        entry["agreement"] = {**agreement(fp32_logits, int8_logits), "with": f"{source_name} in ONNX Runtime, whole test split"}
        results[name] = entry
        out[name] = session
    return out


def serve_and_time(cfg: DictConfig, out_dir: Path, results: dict[str, Any], models: dict[str, L.LightningModule], datamodule) -> None:
    """Export the served models (when ``export.enabled``), time them in PyTorch and ONNX Runtime, record it all.

    Fills, per model, ``served`` (:func:`export_text_models`), ``latency_ms`` and
    ``latency_ms_onnxruntime`` (by batch size), ``speedup`` (dense / model, PyTorch),
    ``speedup_onnxruntime`` and ``speedup_vs_dense_torch``
    (:func:`pipelines.export.add_runtime_speedups`), and the top-level ``latency_protocol``,
    ``speedup`` (of ``pruned``). With ``export.quantize``, each model's int8 copy is a model of
    its own (``<name>-int8``, :func:`quantize_text_models`), timed in ONNX Runtime in the same
    rounds. Used by a run and by ``export.py`` on a finished run.
    """
    sessions, int8 = {}, {}
    if cfg.export.enabled:
        served, sessions = export_text_models(cfg, out_dir, models, datamodule, results)
        for name, entry in served.items():
            results[name]["served"] = entry
        int8 = quantize_text_models(cfg, out_dir, results, served, sessions, datamodule)
        sessions = {**sessions, **int8}
    rounds, proto = time_models_rounds(
        models,
        datamodule,
        list(cfg.latency.batch_sizes),
        warmup=int(cfg.latency.warmup),
        repeats=int(cfg.latency.repeats),
        threads=latency_threads(cfg),
        examples=int(cfg.latency.examples),
        sessions=sessions,
    )
    latency = median_ms(rounds)
    for name in models:
        entry = results[name]
        entry["latency_ms"] = latency[name]
        if name in sessions:
            entry["latency_ms_onnxruntime"] = latency[f"{name}@onnxruntime"]
    for name in int8:
        results[name]["latency_ms_onnxruntime"] = latency[f"{name}@onnxruntime"]
    if sessions:
        proto["onnxruntime"] = (
            "ONNX Runtime CPU session of served/<name>/model.onnx (graph optimisations ORT_ENABLE_ALL, "
            f"sequential, intra-op threads = threads, no spinning), onnxruntime {onnxruntime_version()}; "
            "timed in the same interleaved rounds on the same batches (int8 copies, served/<name>-int8/, too)"
        )
    results["latency_protocol"] = proto
    d = results["dense"]
    for name in models:
        if name != "dense":
            results[name]["speedup"] = {bs: d["latency_ms"][bs] / results[name]["latency_ms"][bs] for bs in d["latency_ms"]}
    if "pruned" in results:
        results["speedup"] = results["pruned"]["speedup"]
    add_runtime_speedups(results, [*models, *int8])


def prune_phase(
    cfg: DictConfig, phase: str, pruner: Pruner, dense_ckpt: str, teacher: torch.nn.Module, datamodule, out_dir: Path
) -> tuple[dict[str, Any], L.LightningModule, str]:
    """Prune a copy of a checkpoint with ``pruner`` in its own phase; test its served copy.

    Args:
        cfg: the run's config.
        phase: phase name (``pruned``, a composite's stage or a baseline's name).
        pruner: the pruner (a callback), asked through its protocol only.
        dense_ckpt: the checkpoint the student starts from: the dense one, or the previous
            phase's (a composite's later stage starts from the model, and the decisions, of the one before).
        teacher: the dense network, handed over when the pruner asks for a teacher.
        datamodule: a set-up text data module.
        out_dir: the run dir (checkpoint paths are recorded relative to it).

    Returns:
        (the results entry: checkpoint, whether it met the pruner's criterion, test metrics,
        kept tokens per layer, the pruner's results; the served model; the digest of the fitted
        model as this rank holds it, :func:`pipelines.distributed.memory_digest`).
    """
    module_cls = get_class(cfg.model.module._target_)
    student = module_cls.load_from_checkpoint(dense_ckpt, map_location="cpu")
    plan = pruner.fit_plan()
    if plan.model_lr:
        student.hparams.lr = plan.model_lr
    if pruner.teacher_plan() is not None:
        pruner.set_teacher(teacher)
    path, score = fit_phase(cfg, phase, student, datamodule, plan, extra_callbacks=[pruner])
    digest = memory_digest(student)  # this rank's own decisions, before the checkpoint rank 0 wrote is reloaded
    del student
    served = module_cls.load_from_checkpoint(path, map_location="cpu").served_model()
    entry = {
        "checkpoint": run_relative(path, out_dir),
        "checkpoint_met_target": score is not None and score >= 0,
        "metrics": evaluate_test_split(cfg, served, datamodule, phase),
        **kept_tokens_per_layer(served, datamodule),
        "pruner": pruner.results(),
    }
    return entry, served, digest


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run the text pipeline and return the results dict (see the module docstring and README).

    Raises:
        pruners.base.PrunerConfigError: the pruner cannot prune this model or data (before any training).
        modules.core.errors.DataError: unusable data.
        pipelines.teacher.MajorityClassTeacherError: the dense model does not beat the majority-class
            rate and a pruner would start from it (after the dense phase, before the pruning phase).
    """
    started = time.time()
    check_data_kind(cfg, TextClassificationDataModule, "text data (data=rotten_tomatoes, data=text_csv or data=glue)")
    pruner: Pruner | None = build(cfg.pruner) if cfg.pruner.get("_target_") else None  # validates settings first
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    module_kwargs = {"num_labels": datamodule.num_labels, "metrics": list(datamodule.metrics)}
    module_cls = get_class(cfg.model.module._target_)
    dense_module = build(cfg.model.module, **module_kwargs)
    if pruner is not None:
        pruner.check(dense_module, datamodule)

    teacher_plan = pruner.teacher_plan() if pruner is not None else None
    cached = None  # the teacher cache's record (pipelines.teacher_cache), when it is used
    fitted: dict[str, float | None] = {}  # the dense phase's best monitored value, when it ran or was restored
    checks: list[dict[str, Any]] = []  # teacher_check of each dense checkpoint looked at, in order

    def check(path: str) -> dict[str, Any]:
        """The dense checkpoint at ``path`` against the majority-class rate (pipelines.teacher.teacher_check)."""
        model = module_cls.load_from_checkpoint(path, map_location="cpu").served_model()
        checks.append(teacher_check(cfg, model, datamodule, fitted.get("score"), cfg.model.monitor))
        return checks[-1]

    if teacher_plan is not None and teacher_plan.checkpoint is not None:
        dense_ckpt = teacher_plan.checkpoint
    else:
        epochs = teacher_plan.epochs if teacher_plan is not None else None
        plan = FitPlan(max_epochs=epochs, monitor=cfg.model.monitor)

        def fit() -> str:
            """Fit the dense phase; remember its best monitored score."""
            path, fitted["score"] = fit_phase(cfg, "dense", dense_module, datamodule, plan)
            return path

        # only a teacher that beats the majority class is stored in the cache or served from it
        dense_ckpt, cached = dense_teacher(cfg, out_dir, epochs, cfg.model.monitor, fit, multirun_job() is not None,
                                           usable=lambda path: check(path)["beats_majority_class"])
    digests = {"dense": memory_digest(dense_module)}  # (no pruning decisions: shapes only)
    del dense_module
    # the cache checks the teacher it serves or stores (a hit under the entry's path), so its last check is this one
    dense_check = checks[-1] if checks else check(dense_ckpt)
    # before anything else is written: a pruner would start from (and distil from) this model
    act_on_teacher_check(dense_check, prunes=pruner is not None, allowed=bool(cfg.get("allow_majority_class_teacher")),
                         run_dir=str(out_dir))
    dense = module_cls.load_from_checkpoint(dense_ckpt, map_location="cpu").served_model()
    results: dict[str, Any] = {
        "task": cfg.task_name,
        "data": OmegaConf.select(cfg, "data._target_"),
        "splits": {s: len(d) for s, d in datamodule.datasets.items()},
        "dense": {"checkpoint": run_relative(dense_ckpt, out_dir), "metrics": evaluate_test_split(cfg, dense, datamodule, "dense")},
    }
    results["dense"].update(dense_check)
    if cached is not None:
        results["teacher_cache"] = cached
    models = {"dense": dense}
    files: dict[str, str] = {}

    if pruner is not None:
        start, phases, met = dense_ckpt, pruner.phases(), True
        for i, (phase, stage) in enumerate(phases):
            name = "pruned" if i == len(phases) - 1 else phase
            results[name], models[name], digests[name] = prune_phase(cfg, phase, stage, start, dense.model, datamodule, out_dir)
            results[name].pop("pruner")  # the pruner's results (a composite's: every stage's) come once, below
            start = str(Path(out_dir) / results[name]["checkpoint"])  # the next phase starts from this one's model
            met = met and results[name]["checkpoint_met_target"]
        if len(phases) > 1:
            results["phases"] = {p: ("pruned" if i == len(phases) - 1 else p) for i, (p, _) in enumerate(phases)}
        results["dense"].update(kept_tokens_per_layer(dense, datamodule))
        results["pruner"] = pruner.results()
        results["target_met"] = met and results["pruner"].get("target_met", True)
        if is_global_zero():
            files.update(pruner.write_files(out_dir))
        for name, baseline in pruner.baselines().items():
            results[name], models[name], digests[name] = prune_phase(
                cfg, name, baseline, dense_ckpt, dense.model, datamodule, out_dir)

    results["distributed"] = distributed_summary(digests)
    if not is_global_zero():  # rank 0 times, exports and writes; the others are done
        return results
    for name, model in models.items():
        entry = results[name]
        entry["macs_per_sample"] = entry["metrics"].pop("macs_per_sample")
        entry["metrics"].pop("dense_macs_per_sample", None)
        entry["params"] = sum(p.numel() for p in model.model.parameters())
    results["macs_protocol"] = (
        "analytic encoder MACs per test sample on its real (unpadded) length, counting the tokens each layer "
        "actually computed on and the heads and FFN neurons present: 4NHW + 2N^2W + 2NHI per layer "
        "(W = width of the heads present), plus pooler and classifier"
    )
    d = results["dense"]
    for name in models:
        if name != "dense":
            results[name]["macs_reduction"] = d["macs_per_sample"] / results[name]["macs_per_sample"]
    if "pruned" in results:
        p = results["pruned"]
        results["macs_reduction"] = p["macs_reduction"]
        results["accuracy_drop_points"] = 100.0 * (d["metrics"]["accuracy"] - p["metrics"]["accuracy"])
        for name in models:
            if name not in ("dense", "pruned"):
                results[f"pruned_minus_{name}_points"] = 100.0 * (p["metrics"]["accuracy"] - results[name]["metrics"]["accuracy"])
    if pruner is not None:
        figures = pruner.served_figures(models["pruned"], dense)  # e.g. the final model against a latency budget
        if figures:
            results["pruner"]["final_served"] = figures
    serve_and_time(cfg, out_dir, results, models, datamodule)
    if files:
        results["files"] = files
    results["wall_clock_s"] = math.floor(time.time() - started)
    return results
