"""Sequence classification with the prunable BERT (``model=bert``): :class:`TextClassificationTask`.

Final models are tested on the test split (``trainer.test``: accuracy, F1, ..., MACs per
sample on each sentence's real length); the dense model is checked against the
majority-class rate before any pruner starts from it (:mod:`pipelines.teacher`); latency and
ONNX Runtime parity run on the first test examples, padded per batch as the test loader pads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from modules.served.served_bert import ExportableBert
from modules.data.text_data import TextClassificationDataModule
from pipelines.common import build, build_trainer
from pipelines.tasks.base import DenseCheck, Task
from pipelines.tracking import finish_loggers, phase_test_loggers

MACS_PROTOCOL = (
    "analytic encoder MACs per test sample on its real (unpadded) length, counting the tokens each layer "
    "actually computed on and the heads and FFN neurons present: 4NHW + 2N^2W + 2NHI per layer "
    "(W = width of the heads present), plus pooler and classifier"
)


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


def _numpy(feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors to arrays, by name."""
    return {k: v.numpy() for k, v in feeds.items()}


class TextClassificationTask(Task):
    """A BERT sequence classifier (:class:`modules.lit.bert_classifier.BertClassifier`) on text data.

    Batches are the text data module's collated dicts (``input_ids``, ``attention_mask``, ``labels``, ...).
    Each pruner phase starts from a copy of the previous phase's kept checkpoint (the first from
    the dense one); every final model is reloaded from its kept checkpoint.
    """

    data_needs = "text data (data=rotten_tomatoes, data=text_csv or data=glue)"
    data_base = TextClassificationDataModule

    def build_data(self, cfg: DictConfig) -> TextClassificationDataModule:
        """``cfg.data``, set up for fitting."""
        datamodule = build(cfg.data)
        datamodule.setup("fit")
        return datamodule

    def build_module(self, cfg: DictConfig, datamodule) -> L.LightningModule:
        """``cfg.model.module`` with the data's label count and metrics."""
        return build(cfg.model.module, num_labels=datamodule.num_labels, metrics=list(datamodule.metrics))

    def describe(self, cfg: DictConfig, datamodule) -> dict[str, Any]:
        """``data`` (its ``_target_``) and ``splits`` (examples per split)."""
        return {"data": OmegaConf.select(cfg, "data._target_"), "splits": {s: len(d) for s, d in datamodule.datasets.items()}}

    def dense_check(self, cfg: DictConfig, datamodule, checkpoint: str, score: float | None) -> DenseCheck:
        """The dense model's validation accuracy against the majority-class rate (:func:`pipelines.teacher.teacher_check`)."""
        from pipelines.teacher import teacher_check

        served = self.start_module(cfg, datamodule, checkpoint).served_model()
        figures = teacher_check(cfg, served, datamodule, score, cfg.model.monitor)
        return DenseCheck(figures=figures, usable=bool(figures["beats_majority_class"]))

    def act_on_dense_check(self, cfg: DictConfig, check: DenseCheck, prunes: bool, run_dir: Path) -> None:
        """:func:`pipelines.teacher.act_on_teacher_check` (``allow_majority_class_teacher``).

        Raises:
            pipelines.teacher.MajorityClassTeacherError: a pruner would start from a model at the majority class.
        """
        from pipelines.teacher import act_on_teacher_check

        act_on_teacher_check(check.figures, prunes=prunes, allowed=bool(cfg.get("allow_majority_class_teacher")),
                             run_dir=str(run_dir))

    def evaluate(self, cfg: DictConfig, datamodule, phase: str, module: L.LightningModule,
                 served: torch.nn.Module) -> dict[str, Any]:
        """``metrics`` on the test split (:func:`evaluate_test_split`, logged to the phase's loggers) and, for a
        pruned model, the tokens each layer kept (:func:`kept_tokens_per_layer`)."""
        entry: dict[str, Any] = {"metrics": evaluate_test_split(cfg, served, datamodule, phase)}
        if phase != "dense":
            entry.update(kept_tokens_per_layer(served, datamodule))
        return entry

    def figures(self, cfg: DictConfig, datamodule, results: dict[str, Any], modules: dict[str, L.LightningModule],
                served: dict[str, torch.nn.Module]) -> None:
        """MACs per sample (measured on the test split), parameters, MACs reduction and accuracy drops.

        With a pruned model, the dense entry also gets the tokens its layers read, for comparison.
        """
        if "pruned" in results:
            results["dense"].update(kept_tokens_per_layer(served["dense"], datamodule))
        for name, model in served.items():
            entry = results[name]
            entry["macs_per_sample"] = entry["metrics"].pop("macs_per_sample")
            entry["metrics"].pop("dense_macs_per_sample", None)
            entry["params"] = sum(p.numel() for p in model.model.parameters())
        results["macs_protocol"] = MACS_PROTOCOL
        d = results["dense"]
        for name in served:
            if name != "dense":
                results[name]["macs_reduction"] = d["macs_per_sample"] / results[name]["macs_per_sample"]
        if "pruned" in results:
            p = results["pruned"]
            results["macs_reduction"] = p["macs_reduction"]
            results["accuracy_drop_points"] = 100.0 * (d["metrics"]["accuracy"] - p["metrics"]["accuracy"])
            for name in served:
                if name not in ("dense", "pruned"):
                    results[f"pruned_minus_{name}_points"] = 100.0 * (p["metrics"]["accuracy"] - results[name]["metrics"]["accuracy"])

    def exportable(self, served: torch.nn.Module) -> ExportableBert:
        """``served.exportable()``."""
        return served.exportable()

    def served_meta(self, name: str, exportable: torch.nn.Module, results: dict[str, Any]) -> dict[str, Any]:
        """``kind: text``, inputs and outputs, and the pruning summary with the model's measured
        ``kept_tokens_per_layer`` and MACs ``sparsity`` on the test split (when the results hold them)."""
        pruning = exportable.summary()
        measured = results.get(name, {})
        if "kept_tokens_per_layer" in measured:
            pruning["kept_tokens_per_layer_test_mean"] = measured["kept_tokens_per_layer"]
        if "sparsity" in measured.get("metrics", {}):
            pruning["macs_sparsity_test"] = measured["metrics"]["sparsity"]
        return {"kind": "text", **exportable.io_meta(), "pruning": pruning}

    def logits(self, served: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, C)`` class logits."""
        return served(batch).logits

    def feeds(self, exportable: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`modules.served.served_bert.ExportableBert.feeds`."""
        return ExportableBert.feeds(batch)

    def latency_batches(self, cfg: DictConfig, datamodule, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Consecutive test batches covering the first ``max(latency.examples, batch_size)`` test examples."""
        return latency_batches(datamodule, batch_size, int(cfg.latency.examples))

    def latency_what(self, cfg: DictConfig) -> str:
        """The classifier's forward pass per batch, on the first ``latency.examples`` test examples."""
        return (
            f"forward pass of the classifier (embeddings to logits) per batch, averaged over the batches of the "
            f"first {int(cfg.latency.examples)} test examples (or one batch if larger) in test order, padded to the longest in each "
            "batch; served models: pruned tokens physically removed (gathered out) before each pruning layer, "
            "masked heads and FFN neurons physically removed; models measured interleaved in one process"
        )

    def parity_batches(self, cfg: DictConfig, datamodule) -> list[dict[str, torch.Tensor]]:
        """The first ``export.parity_examples`` test examples in batches of 32, padded per batch."""
        return latency_batches(datamodule, 32, int(cfg.export.parity_examples))

    def calibration(self, cfg: DictConfig, datamodule, exportable: torch.nn.Module) -> tuple[list[dict[str, np.ndarray]], str]:
        """The first ``export.calibration_examples`` training examples in order, batches of 32 padded per batch."""
        batches = latency_batches(datamodule, 32, int(cfg.export.calibration_examples), split="train")
        n = sum(int(b["input_ids"].shape[0]) for b in batches)
        return [_numpy(self.feeds(exportable, b)) for b in batches], f"the first {n} training examples in order, batches of 32 padded per batch"

    def onnx_test_split(self, datamodule) -> tuple[list[Any], list[torch.Tensor], str]:
        """The whole test split, in the test loader's batches."""
        batches = list(datamodule.test_dataloader())
        return batches, [b["labels"] for b in batches], "whole test split"

    def onnx_scores(self, datamodule, fp32: list[np.ndarray], int8: list[np.ndarray],
                    labels: list[torch.Tensor]) -> dict[str, Any]:
        """``metrics``: the data's metrics of the int8 predictions (argmax) on the test split."""
        from modules.lit.bert_classifier import build_metrics

        # rank 0 alone scores the int8 models (the other ranks are done): no sync across ranks
        metrics = build_metrics(list(datamodule.metrics), datamodule.num_labels, sync_on_compute=False)
        if int8:
            metrics.update(torch.from_numpy(np.concatenate(int8)).argmax(dim=-1), torch.cat(labels))
        return {"metrics": {k: float(v) for k, v in metrics.compute().items()}}
