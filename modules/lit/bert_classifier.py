"""LightningModule for sequence classification with the prunable BERT.

Task loss is cross-entropy; metrics come from torchmetrics (accuracy, F1, and MCC
where the task reports it); AdamW with linear warm-up then linear decay. Pruners
change the training objective through ``Pruner.training_loss`` and may attach token
gates (``self.token_gates``, :class:`modules.nn.gates.TokenGates`), which are part of the
module's state dict, so ``BertClassifier.load_from_checkpoint(path)`` restores the pruned
model; :meth:`BertClassifier.served_model` builds the copy that is tested, timed and served.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from transformers import BertConfig

from modules.nn.bert import EncoderOutput, PrunableBertForSequenceClassification, layer_macs
from modules.core.errors import ConfigError
from modules.nn.gates import TokenGates
from modules.lit.objective import objectives_of, log_objective_metrics
from modules.nn.structured import keep_lowest_layers, shrink_structured

if TYPE_CHECKING:  # the annotation only; the method imports it when called
    from modules.served.served_bert import ExportableBert

METRICS = ("accuracy", "f1", "mcc")


def build_metrics(
    names: tuple[str, ...] | list[str], num_labels: int, sync_on_compute: bool = True
) -> torchmetrics.MetricCollection:
    """A MetricCollection with the named torchmetrics (binary for 2 labels, else macro multiclass).

    ``sync_on_compute=False`` for figures one process computes alone (rank 0 scoring an
    exported model): with True, ``compute()`` under DDP waits for every rank.

    Raises:
        ValueError: an unknown metric name.
    """
    task = "binary" if num_labels == 2 else "multiclass"
    kw = {"task": task, "sync_on_compute": sync_on_compute}
    if task == "multiclass":
        kw.update(num_classes=num_labels, average="macro")
    makers = {
        "accuracy": lambda: torchmetrics.Accuracy(**{k: v for k, v in kw.items() if k != "average"}),
        "f1": lambda: torchmetrics.F1Score(**kw),
        "mcc": lambda: torchmetrics.MatthewsCorrCoef(task=task, num_classes=num_labels, sync_on_compute=sync_on_compute),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {sorted(makers)}.")
    return torchmetrics.MetricCollection({n: makers[n]() for n in names})


class BertClassifier(L.LightningModule):
    """Fine-tunes (and hosts the pruning of) a BERT sequence classifier.

    Args:
        pretrained: local Hugging Face BERT folder; ignored when ``bert_config`` is given.
        num_labels: number of classes.
        lr: peak learning rate of the encoder and head (AdamW).
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm).
        warmup_fraction: fraction of training steps with linear LR warm-up.
        metrics: metric names, from ``accuracy``, ``f1``, ``mcc``.
        bert_config: a ``BertConfig`` dict to build a randomly initialised model
            (tiny test models; also how checkpoints rebuild without reloading weights).
        remove_pruned_at_eval: at evaluation, and in training once the token gates are
            frozen, gather out pruned tokens (real speedup); False only masks them (for
            the removal = masking check).

    Raises:
        ValueError: neither ``pretrained`` nor ``bert_config``; unknown metric; bad lr.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        num_labels: int = 2,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        metrics: tuple[str, ...] | list[str] = ("accuracy", "f1"),
        bert_config: dict | None = None,
        remove_pruned_at_eval: bool = True,
    ):
        super().__init__()
        if lr <= 0 or not 0 <= warmup_fraction < 1:
            raise ConfigError(f"model.module.lr={lr} must be > 0 and model.module.warmup_fraction={warmup_fraction} in [0, 1).")
        if bert_config is not None:
            self.model = PrunableBertForSequenceClassification(BertConfig(**{**bert_config, "num_labels": num_labels}))
        elif pretrained is not None:
            self.model = PrunableBertForSequenceClassification.from_pretrained(pretrained, num_labels)
            bert_config = self.model.config.to_dict()
        else:
            raise ConfigError("BertClassifier needs model.pretrained (a local BERT folder) or a bert_config.")
        self.save_hyperparameters({**locals_to_hparams(locals()), "bert_config": bert_config})
        self.token_gates: torch.nn.Module | None = None
        self.val_metrics = build_metrics(list(metrics), num_labels).clone(prefix="val/")
        self.test_metrics = build_metrics(list(metrics), num_labels).clone(prefix="test/")
        # MACs per sample of the model as run (pruned) and of the dense model, same inputs
        self.val_macs = torchmetrics.MetricCollection(
            {"macs_per_sample": torchmetrics.MeanMetric(), "dense_macs_per_sample": torchmetrics.MeanMetric()}
        ).clone(prefix="val/")
        self.test_macs = self.val_macs.clone(prefix="test/")

    # ----------------------------------------------------------------- forward
    def forward(
        self, batch: dict[str, torch.Tensor], return_scores: bool = False, return_kept_masks: bool = False
    ) -> EncoderOutput:
        """Run the classifier on a batch of (B, N) ``input_ids``/``attention_mask``/``token_type_ids``
        (``return_scores``, ``return_kept_masks``: see :class:`modules.nn.bert.EncoderOutput`)."""
        return self.model(
            batch["input_ids"],
            batch.get("attention_mask"),
            batch.get("token_type_ids"),
            token_pruner=self.token_gates,
            remove_pruned=self._remove_pruned(),
            return_scores=return_scores,
            return_kept_masks=return_kept_masks,
        )

    def _remove_pruned(self) -> bool:
        # Evaluation gathers pruned tokens out (the real speedup). Training does too once
        # the gates are frozen: their masks are then hard, and removal computes exactly
        # what masking does, on shorter sequences.
        if self.token_gates is None or not self.hparams.remove_pruned_at_eval:
            return False
        return not self.training or bool(getattr(self.token_gates, "frozen", False))

    # ------------------------------------------------------- pruning decisions
    def attach_token_gates(self, gates: torch.nn.Module) -> None:
        """Make ``gates`` (a :class:`modules.nn.gates.TokenGates`) the model's token gates, saved in its state dict.

        The gates are left out of DDP's gradient reduction (frozen gates receive no gradient,
        which DDP's reducer refuses): whoever trains them averages their gradients over the
        ranks itself (ToP's ``on_before_optimizer_step``).
        """
        self.token_gates = gates
        self._ddp_params_and_buffers_to_ignore = [f"token_gates.{n}" for n, _ in gates.named_parameters()]

    def freeze_embeddings(self) -> None:
        """Stop training the embedding layer (word, position, segment embeddings and their LayerNorm)."""
        self.model.bert.embeddings.requires_grad_(False)

    def keep_lowest_layers(self, k: int) -> None:
        """Remove every encoder layer above the lowest ``k`` (:func:`modules.nn.structured.keep_lowest_layers`);
        checkpoints record the layers kept and reload into a ``k``-layer model."""
        keep_lowest_layers(self.model, k)

    def dense_macs_per_sample(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) MACs of the unpruned model on each sample's real (unpadded) length."""
        n = batch["attention_mask"].sum(dim=1).to(torch.float32)
        c = self.model.config
        dropped = c.num_hidden_layers - len(self.model.bert.encoder.layer)  # layers a layer-dropping pruner removed
        return self.model.macs([n] * len(self.model.bert.encoder.layer)) + dropped * layer_macs(n, c.hidden_size, c.intermediate_size)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on (B,) labels, turned into the pruning objective by every attached pruner."""
        objectives = objectives_of(self.trainer)
        out = self(batch, return_scores=self.token_gates is not None)
        loss = F.cross_entropy(out.logits, batch["labels"])
        self.log("train/task_loss", loss, prog_bar=not objectives)
        for objective in objectives:
            loss, logs = objective.training_loss(self, batch, out, loss)
            log_objective_metrics(self, logs)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics, macs) -> None:
        out = self(batch)
        metrics.update(out.logits.argmax(dim=-1), batch["labels"])
        prefix = macs.prefix
        macs[f"{prefix}macs_per_sample"].update(self.model.macs(out.kept_lengths))
        macs[f"{prefix}dense_macs_per_sample"].update(self.dense_macs_per_sample(batch))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Update validation metrics and MACs (pruned tokens removed, as served)."""
        self._eval_step(batch, self.val_metrics, self.val_macs)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Update test metrics and MACs (pruned tokens removed, as served)."""
        self._eval_step(batch, self.test_metrics, self.test_macs)

    def _log_eval(self, metrics, macs, stage: str) -> dict[str, torch.Tensor]:
        values = {**metrics.compute(), **macs.compute()}
        values[f"{stage}/sparsity"] = 1.0 - values[f"{stage}/macs_per_sample"] / values[f"{stage}/dense_macs_per_sample"]
        for key, value in values.items():
            self.log(key, value, prog_bar=key.endswith("/accuracy"))
        metrics.reset()
        macs.reset()
        return values

    def on_validation_epoch_end(self) -> None:
        """Log val metrics, MACs and sparsity, then what each attached training objective derives from
        them (:meth:`modules.lit.objective.TrainingObjective.validation_metrics`, e.g. a pruner's checkpoint metric)."""
        values = self._log_eval(self.val_metrics, self.val_macs, "val")
        for objective in objectives_of(self._trainer):
            for key, value in objective.validation_metrics(self, values).items():
                self.log(key, value)

    def on_test_epoch_end(self) -> None:
        """Log test metrics, MACs per sample and sparsity."""
        self._log_eval(self.test_metrics, self.test_macs, "test")

    # --------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warm-up and decay over the model's trainable weights, plus the
        training objectives' own parameter groups (``TrainingObjective.param_groups``, the pruners') at constant learning rates."""
        decay, no_decay = [], []
        for p in self.model.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim == 1 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay, "name": "model/decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "model/no_decay"},
        ]
        extra = [g for objective in objectives_of(self._trainer) for g in objective.param_groups(self)]
        opt = torch.optim.AdamW(groups + extra, lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.warmup_steps()

        def schedule(step: int) -> float:
            """LR factor: linear warm-up to 1, then linear decay to 0."""
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        lambdas = [schedule] * len(groups) + [lambda step: 1.0] * len(extra)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``trainer.gradient_clip_val`` clips the model's weights only (the ``model/*`` groups of
        :meth:`configure_optimizers`), never the training objectives' groups (token gates' log_alpha,
        Lagrange multipliers), as ToP's reference code clips (arXiv 2306.14393). Clipped jointly, the
        Lagrangian's gate gradients would count in the norm and shrink every model update.

        Raises:
            ValueError: an unknown ``gradient_clip_algorithm`` (Lightning's are ``norm`` and ``value``).
        """
        if not gradient_clip_val:
            return
        params = [p for g in optimizer.param_groups if str(g.get("name", "")).startswith("model/") for p in g["params"]]
        params = [p for p in params if p.grad is not None]
        algorithm = gradient_clip_algorithm or "norm"
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val))
        elif algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
        else:
            raise ValueError(f"trainer.gradient_clip_algorithm={algorithm!r}: use 'norm' or 'value'.")

    def warmup_steps(self) -> int:
        """Optimizer steps of the linear LR warm-up of this fit: ``int(warmup_fraction * estimated_stepping_batches)``.

        Read by :meth:`configure_optimizers` and by the dense phase's early stopping
        (``pipelines.teacher.EarlyStoppingAfterMinimum``), which never ends a fit before it.

        Raises:
            RuntimeError: the module is not attached to a trainer (Lightning's ``self.trainer``).
        """
        return int(self.hparams.warmup_fraction * max(1, int(self.trainer.estimated_stepping_batches)))

    # ----------------------------------------------------------------- serving
    def served_model(self) -> "BertClassifier":
        """The model as served, in eval mode: what testing, latency, MACs and export run.

        The same contract as every LightningModule here (``DLRMModule.served_model``): a
        :class:`BertClassifier` in eval mode whose ``.model`` is the served network, a plain
        ``nn.Module``. Masked attention heads and FFN neurons are physically removed
        (:func:`modules.nn.structured.shrink_structured`, on a copy; the module itself is
        unchanged), and the token gates, if any, run deterministically with pruned tokens
        gathered out before each pruning layer (``remove_pruned_at_eval``). With nothing
        masked, the module itself is returned (switched to eval mode). The served model gives the masked model's
        logits (tested).

        Returns:
            a :class:`BertClassifier` in eval mode; ``.model`` is the served
            :class:`modules.nn.bert.PrunableBertForSequenceClassification`.
        """
        layers = self.model.bert.encoder.layer
        if not any(l.attention.self.head_mask_applied or l.intermediate.neuron_mask_applied for l in layers):
            return self.eval()
        served = copy.deepcopy(self)
        served.model = shrink_structured(self.model)
        return served.eval()

    def exportable(self) -> "ExportableBert":
        """The served model as one plain tensor function for ONNX export
        (:class:`modules.served.served_bert.ExportableBert`: token selection inside the graph)."""
        from modules.served.served_bert import ExportableBert

        served = self.served_model()
        return ExportableBert(served.model, served.token_gates)

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the token gates' constructor arguments, and the encoder layers present when fewer than
        the architecture's (a layer-dropped model), so the module can rebuild them on load."""
        if self.token_gates is not None:
            checkpoint["token_gates_config"] = self.token_gates.config()
        if len(self.model.bert.encoder.layer) < self.model.config.num_hidden_layers:
            checkpoint["encoder_layers"] = len(self.model.bert.encoder.layer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the layers a layer-dropped checkpoint lacks and rebuild the token gates (if the checkpoint
        has them) before the state dict is loaded."""
        if "encoder_layers" in checkpoint:
            keep_lowest_layers(self.model, int(checkpoint["encoder_layers"]))
        # Rebuild the gates before Lightning loads the state dict, so load_from_checkpoint
        # returns the pruned model.
        if "token_gates_config" in checkpoint and self.token_gates is None:
            self.attach_token_gates(TokenGates(**checkpoint["token_gates_config"]))


def locals_to_hparams(local_vars: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments as plain values (lists instead of tuples) for save_hyperparameters."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    skip = {"self", "__class__", "bert_config"}
    out = {}
    for k, v in local_vars.items():
        if k in skip:
            continue
        if isinstance(v, (ListConfig, DictConfig)):  # torch's weights_only loading rejects OmegaConf objects
            v = OmegaConf.to_container(v, resolve=True)
        out[k] = list(v) if isinstance(v, tuple) else v
    return out
