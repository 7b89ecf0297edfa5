"""The text classification pipeline: fine-tune a dense BERT, prune it, test both, time both.

Phases (each a Lightning fit with its own checkpoints under ``checkpoints/<phase>``
and its own logger run):

1. ``dense``: fine-tune the dense model (skipped when ``pruner.teacher_ckpt`` is set;
   for ``pruner=none`` this is the whole job).
2. ``pruned``: load the dense checkpoint, attach the pruner (a callback) and fit
   (``pruner.pruning_epochs`` / ``pruner.finetune_epochs`` when the pruner has them,
   else ``trainer.max_epochs``). SwiftPruner searches at the start of this fit.
3. ``uniform`` (SwiftPruner only): the best uniform configuration within the same
   measured latency budget, fine-tuned the same way (the baseline).

All final models are reloaded from their checkpoints (``load_from_checkpoint``),
served as they would be (pruned tokens gathered out, masked heads and FFN neurons
physically removed), tested on the test split, and timed in this process on the same
test inputs. ``pruner.search_only=true`` (SwiftPruner) stops after the search.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from modules.bert_classifier import BertClassifier
from modules.structured import shrink_structured
from pipelines.common import (
    build,
    build_callbacks,
    build_loggers,
    build_trainer,
    checkpoint_callback,
    finish_loggers,
)
from pipelines.latency import measure_latency_ms, protocol

log = logging.getLogger(__name__)


def fit_phase(
    cfg: DictConfig, phase: str, module: BertClassifier, datamodule, monitor: str, extra_callbacks=(), **trainer_overrides
) -> tuple[str, float | None]:
    """Fit ``module`` in its own phase and return (checkpoint to use, its monitored score).

    The best checkpoint by ``monitor`` is used; if no checkpoint ever scored above -1
    (e.g. a pruner whose sparsity target was never met), the last one is used.
    """
    loggers = build_loggers(cfg, phase)
    callbacks = build_callbacks(cfg, phase, monitor=monitor, has_logger=bool(loggers)) + list(extra_callbacks)
    trainer = build_trainer(cfg, phase, callbacks, loggers, **trainer_overrides)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        finish_loggers(loggers)
    ckpt = checkpoint_callback(trainer)
    score = None if ckpt.best_model_score is None else float(ckpt.best_model_score)
    path = ckpt.best_model_path
    if not path or score is None or score < 0:
        if not ckpt.last_model_path:
            raise RuntimeError(f"The {phase} phase wrote no checkpoint; keep callbacks.model_checkpoint.save_last=true.")
        log.warning("%s: no checkpoint met the monitored criterion %s; using the last checkpoint.", phase, monitor)
        path = ckpt.last_model_path
    return path, score


def evaluate_test_split(cfg: DictConfig, module: BertClassifier, datamodule) -> dict[str, float]:
    """Test-split metrics by name (``accuracy``, ``f1``, ..., ``macs_per_sample``, ``sparsity``)."""
    trainer = build_trainer(cfg, "test", [], [], enable_checkpointing=False, enable_progress_bar=False)
    (raw,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return {k.removeprefix("test/"): float(v) for k, v in raw.items()}


def latency_batches(datamodule, batch_size: int, examples: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive test batches of ``batch_size`` covering the first ``max(examples, batch_size)`` examples."""
    ds = datamodule.datasets["test"]
    n = min(len(ds), max(examples, batch_size))
    return [datamodule._collate([ds[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)]


def time_models(
    models: dict[str, BertClassifier],
    datamodule,
    batch_sizes: list[int],
    warmup: int,
    repeats: int,
    threads: int | None,
    examples: int = 32,
) -> tuple[dict, dict]:
    """Median latency (ms per batch) of each model per batch size, measured interleaved on the same inputs.

    Args:
        models: name -> module; each runs as in evaluation (pruned tokens removed).
        datamodule: a set-up text data module; inputs come from its test split.
        batch_sizes: batch sizes to time.
        warmup, repeats, threads: see :func:`pipelines.latency.measure_latency_ms`.
        examples: inputs are the first ``max(examples, batch size)`` test examples.

    Returns:
        (name -> {batch size as str -> ms per batch}, the protocol dict).
    """
    lat: dict[str, dict[str, float]] = {name: {} for name in models}
    for m in models.values():
        m.eval()
    for bs in batch_sizes:
        batches = latency_batches(datamodule, int(bs), examples)

        def make(m: BertClassifier):
            """A zero-argument call running ``m`` on every latency batch."""

            def call():
                """Run every latency batch once."""
                for b in batches:
                    m(b)

            return call

        ms = measure_latency_ms({name: make(m) for name, m in models.items()}, warmup, repeats, threads)
        for name, v in ms.items():
            lat[name][str(bs)] = v / len(batches)
    proto = protocol(
        threads=threads or torch.get_num_threads(),
        warmup=warmup,
        repeats=repeats,
        what=(
            f"forward pass of the classifier (embeddings to logits) per batch, averaged over the batches of the "
            f"first {examples} test examples (or one batch if larger) in test order, padded to the longest in each "
            "batch; the pruned model physically removes pruned tokens (gathered out) before each pruning layer; "
            "models measured interleaved in one process"
        ),
    )
    return lat, proto


@torch.no_grad()
def kept_tokens_per_layer(module: BertClassifier, datamodule) -> list[float]:
    """Mean tokens (CLS included, padding excluded) each layer computes on, over the test split."""
    module.eval()
    sums: list[float] | None = None
    count = 0
    for batch in datamodule.test_dataloader():
        out = module(batch)
        per = [float(n.sum()) for n in out.kept_lengths]
        sums = per if sums is None else [a + b for a, b in zip(sums, per)]
        count += batch["input_ids"].shape[0]
    return [s / count for s in (sums or [])]


def served_model(module: BertClassifier) -> BertClassifier:
    """The module as served: masked heads and FFN neurons physically removed (unchanged if none is masked).

    The copy gives the same logits as the masked module (``modules.structured``), and its
    analytic MACs and latency are those of the smaller model.
    """
    layers = module.model.bert.encoder.layer
    if not any(l.attention.self.head_mask_applied or l.intermediate.neuron_mask_applied for l in layers):
        return module
    served = copy.deepcopy(module)
    served.model = shrink_structured(module.model)
    return served


def finetune_under_masks(
    cfg: DictConfig, phase: str, teacher_ckpt: str, pruner, datamodule, **trainer_overrides
) -> tuple[str, BertClassifier, dict[str, float]]:
    """Fine-tune the dense checkpoint under a fixed-mask pruner in its own phase; test the served copy.

    Args:
        cfg: the run's config (trainer, callbacks, loggers, paths).
        phase: phase name (checkpoints under ``checkpoints/<phase>``, logger run name).
        teacher_ckpt: the dense ``BertClassifier`` checkpoint the student starts from.
        pruner: a :class:`pruners.swiftpruner.MaskedDistillation` (its masks, loss and
            ``model_lr``; its teacher is loaded from ``teacher_ckpt`` if not set).
        datamodule: a set-up text data module.
        trainer_overrides: e.g. ``max_epochs``.

    Returns:
        (best checkpoint path, the served model from it (masked units physically removed),
        its test-split metrics as in :func:`evaluate_test_split`).
    """
    student = BertClassifier.load_from_checkpoint(teacher_ckpt, map_location="cpu")
    if pruner.model_lr:
        student.hparams.lr = pruner.model_lr
    path, _ = fit_phase(cfg, phase, student, datamodule, pruner.monitor, extra_callbacks=[pruner], **trainer_overrides)
    del student
    served = served_model(BertClassifier.load_from_checkpoint(path, map_location="cpu"))
    return str(path), served, evaluate_test_split(cfg, served, datamodule)


def add_search_results(results: dict[str, Any], pruner, out_dir: Path) -> None:
    """Put a SwiftPruner search into ``results["search"]``, write its full history and its Pareto plot.

    Writes ``search_history.json`` (every evaluated candidate and every uniform
    configuration), ``latency_table.json`` (the lookup table, reusable with
    ``pruner.latency_table``) and ``search_pareto.png`` under ``out_dir``.
    """
    from pipelines.common import json_safe
    from pipelines.pareto import plot_pareto

    results["search"] = results.pop("pruner", None) or pruner.summary()
    history = {k: pruner.result[k] for k in ("budget_ms", "search_budget_ms", "candidates", "uniform_candidates", "chosen", "uniform")}
    path = out_dir / "search_history.json"
    path.write_text(json.dumps(json_safe(history), indent=1))
    results["search"]["history_file"] = str(path)
    table = out_dir / "latency_table.json"  # reusable with pruner.latency_table=PATH
    table.write_text(json.dumps(json_safe(pruner.result["lut"]), indent=1))
    results["search"]["latency_table_file"] = str(table)
    results["search"]["pareto_plot"] = str(plot_pareto(pruner.result, out_dir / "search_pareto.png"))


def search_only_results(results: dict[str, Any], pruner, out_dir: Path, started: float) -> dict[str, Any]:
    """Results of ``pruner.search_only=true``: the dense model's test metrics and the search, no fine-tuning."""
    add_search_results(results, pruner, out_dir)
    results["wall_clock_s"] = math.floor(time.time() - started)
    return results


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run the text pipeline and return the results dict (see module docstring and README)."""
    started = time.time()
    pruner = build(cfg.pruner) if cfg.pruner.get("_target_") else None  # validates settings first
    datamodule = build(cfg.data)
    datamodule.setup("fit")
    module_kwargs = {"num_labels": datamodule.num_labels, "metrics": list(datamodule.metrics)}

    teacher_ckpt = getattr(pruner, "teacher_ckpt", None)
    if teacher_ckpt is None:
        epochs = pruner.teacher_epochs if pruner is not None else cfg.trainer.max_epochs
        dense_module = build(cfg.model.module, **module_kwargs)
        teacher_ckpt, _ = fit_phase(cfg, "dense", dense_module, datamodule, cfg.model.monitor, max_epochs=epochs)
        del dense_module
    dense = BertClassifier.load_from_checkpoint(teacher_ckpt, map_location="cpu")
    results: dict[str, Any] = {
        "task": cfg.task_name,
        "data": OmegaConf.select(cfg, "data._target_"),
        "splits": {s: len(d) for s, d in datamodule.datasets.items()},
        "dense": {"checkpoint": str(teacher_ckpt), "metrics": evaluate_test_split(cfg, dense, datamodule)},
    }
    models = {"dense": dense}

    if pruner is not None:
        student = BertClassifier.load_from_checkpoint(teacher_ckpt, map_location="cpu")
        if getattr(pruner, "model_lr", None):
            student.hparams.lr = pruner.model_lr
        pruner.load_teacher(teacher_ckpt)
        if getattr(pruner, "search_only", False):
            pruner.run_search(student.model, datamodule)
            return search_only_results(results, pruner, out_dir, started)
        epochs = getattr(pruner, "finetune_epochs", None) or getattr(pruner, "pruning_epochs", None)
        overrides = {"max_epochs": epochs} if epochs else {}
        monitor = getattr(pruner, "monitor", "val/accuracy_at_target")
        path, score = fit_phase(cfg, "pruned", student, datamodule, monitor, extra_callbacks=[pruner], **overrides)
        del student
        pruned = served_model(BertClassifier.load_from_checkpoint(path, map_location="cpu"))
        results["pruned"] = {
            "checkpoint": str(path),
            "checkpoint_met_target": score is not None and score >= 0,
            "metrics": evaluate_test_split(cfg, pruned, datamodule),
            "kept_tokens_per_layer": kept_tokens_per_layer(pruned, datamodule),
        }
        results["dense"]["kept_tokens_per_layer"] = kept_tokens_per_layer(dense, datamodule)
        results["pruner"] = pruner.summary()
        models["pruned"] = pruned
        if hasattr(pruner, "uniform_pruner"):  # SwiftPruner: its search, and the uniform baseline fine-tuned alike
            add_search_results(results, pruner, out_dir)
            baseline = pruner.uniform_pruner()
            if baseline is not None:
                path, uniform, metrics = finetune_under_masks(cfg, "uniform", teacher_ckpt, baseline, datamodule, **overrides)
                results["uniform"] = {"checkpoint": path, "metrics": metrics, "search": pruner.result["uniform"]}
                models["uniform"] = uniform

    latency, proto = time_models(
        models,
        datamodule,
        list(cfg.latency.batch_sizes),
        warmup=int(cfg.latency.warmup),
        repeats=int(cfg.latency.repeats),
        threads=int(cfg.threads) if cfg.get("threads") else None,
        examples=int(cfg.latency.examples),
    )
    for name, model in models.items():
        entry = results[name]
        entry["latency_ms"] = latency[name]
        entry["macs_per_sample"] = entry["metrics"].pop("macs_per_sample")
        entry["metrics"].pop("dense_macs_per_sample", None)
        entry["params"] = sum(p.numel() for p in model.model.parameters())
    results["latency_protocol"] = proto
    results["macs_protocol"] = (
        "analytic encoder MACs per test sample on its real (unpadded) length, counting the tokens each layer "
        "actually computed on: 4NH^2 + 2N^2H + 2NHI per layer, plus pooler and classifier"
    )
    if "pruned" in results:
        d, p = results["dense"], results["pruned"]
        results["speedup"] = {bs: d["latency_ms"][bs] / p["latency_ms"][bs] for bs in d["latency_ms"]}
        results["macs_reduction"] = d["macs_per_sample"] / p["macs_per_sample"]
        results["accuracy_drop_points"] = 100.0 * (d["metrics"]["accuracy"] - p["metrics"]["accuracy"])
    if "uniform" in results:
        u = results["uniform"]
        u["speedup"] = {bs: d["latency_ms"][bs] / u["latency_ms"][bs] for bs in d["latency_ms"]}
        u["macs_reduction"] = d["macs_per_sample"] / u["macs_per_sample"]
        results["searched_minus_uniform_points"] = 100.0 * (p["metrics"]["accuracy"] - u["metrics"]["accuracy"])
    results["wall_clock_s"] = math.floor(time.time() - started)
    return results
