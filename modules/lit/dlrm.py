"""The LightningModule that trains a DLRM prequentially on a stream of time windows.

:class:`DLRMModule` wraps :class:`modules.nn.dlrm.DLRM`: every window (see
``modules/data/stream_data.py``) is first scored by the model as it stands (eval mode, no
gradient), its metrics recorded (:func:`window_metrics`), and only then trained on in
minibatches. Its served copy is :func:`modules.nn.dlrm.export_served`.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from modules.core.errors import ConfigError
from modules.lit.distributed import gather_rows, global_rank, world_size
from modules.lit.objective import log_objective_metrics, objectives_of
from modules.nn.dlrm import DLRM, export_served

if TYPE_CHECKING:  # the annotation only; the method imports it when called
    from modules.served.served_dlrm import ExportableDLRM


# ----------------------------------------------------------------------------- metrics
def window_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """ROC AUC, log loss and normalized entropy of one window.

    AUC is torchmetrics' ``binary_auroc``; torchmetrics has no log-loss metric, so log loss is
    ``torch.nn.functional.binary_cross_entropy_with_logits`` (mean, natural log).
    NE = log loss / H(p), ``H(p) = -(p log p + (1-p) log(1-p))`` with ``p`` the window's
    click rate (He et al. 2014, "Practical lessons from predicting clicks on ads at
    Facebook", section 2). Natural logarithms; lower is better; 1.0 = predicting the
    window's base rate.

    Args:
        logits: ``(N,)`` click logits.
        labels: ``(N,)`` 0/1 labels.

    Returns:
        ``{"auc", "log_loss", "ne", "rows", "ctr"}``; AUC and NE are NaN when the window has a
        single class.
    """
    labels = labels.float()
    n = int(labels.numel())
    log_loss = float(F.binary_cross_entropy_with_logits(logits.float(), labels)) if n else math.nan
    p = float(labels.mean()) if n else math.nan
    if n and 0.0 < p < 1.0:
        entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        auc = float(binary_auroc(torch.sigmoid(logits.float()), labels.long()))
        ne = log_loss / entropy
    else:
        auc = ne = math.nan
    return {"auc": auc, "log_loss": log_loss, "ne": ne, "rows": n, "ctr": p}


def rank_share(idx: torch.Tensor, ranks: int, rank: int) -> tuple[torch.Tensor, float]:
    """This rank's rows of a minibatch ``idx`` ``(M,)`` and the weight of its loss.

    Rank ``r`` takes rows ``r, r + ranks, ...``; its (mean) loss is weighted by
    ``ranks * rows taken / M``, so the average over the ranks (DDP's gradient) is the whole
    minibatch's mean. A rank left without rows takes the first row at weight 0 (it must still
    run backward for DDP's gradient sync). One rank: ``(idx, 1.0)``.
    """
    if ranks == 1:
        return idx, 1.0
    own = idx[rank::ranks]
    if own.numel() == 0:
        return idx[:1], 0.0
    return own, ranks * own.numel() / idx.numel()


# ----------------------------------------------------------------------------- LightningModule
class DLRMModule(L.LightningModule):
    """Prequential training of a :class:`DLRM` on a stream of time windows.

    Each training batch is one window (from ``modules.data.stream_data``): a dict with ``dense``
    ``(N, K)``, ``sparse`` ``(N, F_s)``, ``multi`` ``(N, F_m, L)``, ``label`` ``(N,)``,
    ``window`` (int) and ``minibatch_size`` (int). ``training_step`` first scores the whole
    window with the model as it stands (eval mode, no gradient) and records the window's
    AUC / log loss / NE in :attr:`window_records`, then trains on it in minibatches (manual
    optimization, one Adam step per minibatch). Pruners (``modules.lit.objective.TrainingObjective``) see every
    optimizer step through Lightning's ``on_before_optimizer_step`` hook and may change the
    loss through ``training_loss`` (called with the minibatch: ``dense``, ``sparse``,
    ``multi``, ``label``).

    Args:
        num_dense, num_embeddings, multi_num_embeddings: feature sizes (from the data module).
        embedding_dim, bottom_mlp, top_mlp: sizes, see :class:`DLRM`.
        lr: Adam learning rate (> 0).
        weight_decay: Adam weight decay (>= 0) on MLP weights.
        shuffle_within_window: train on a window's rows in a seeded random order (the
            whole window has been scored already, so this never uses the future).
        seed: seed of that order.
        keep_predictions: also keep every window's scored logits (for tests).

    Raises:
        ValueError: bad sizes or learning rate.
    """

    def __init__(
        self,
        num_dense: int,
        num_embeddings: list[int],
        multi_num_embeddings: list[int] = (),
        embedding_dim: int = 16,
        bottom_mlp: list[int] = (64, 32),
        top_mlp: list[int] = (256, 128),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        shuffle_within_window: bool = True,
        seed: int = 0,
        keep_predictions: bool = False,
    ):
        super().__init__()
        if lr <= 0 or weight_decay < 0:
            raise ConfigError(f"model.lr={lr} must be > 0 and model.weight_decay={weight_decay} >= 0.")
        self.save_hyperparameters(
            {
                "num_dense": int(num_dense),
                "num_embeddings": [int(n) for n in num_embeddings],
                "multi_num_embeddings": [int(n) for n in multi_num_embeddings],
                "embedding_dim": int(embedding_dim),
                "bottom_mlp": [int(n) for n in bottom_mlp],
                "top_mlp": [int(n) for n in top_mlp],
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "shuffle_within_window": bool(shuffle_within_window),
                "seed": int(seed),
                "keep_predictions": bool(keep_predictions),
            }
        )
        self.model = DLRM(num_dense, num_embeddings, multi_num_embeddings, embedding_dim, bottom_mlp, top_mlp)
        self.automatic_optimization = False
        self.window_records: list[dict[str, Any]] = []
        self.predictions: dict[int, torch.Tensor] = {}

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor, multi: torch.Tensor | None = None) -> torch.Tensor:
        """Click logits ``(B,)``."""
        return self.model(dense, sparse, multi)

    @staticmethod
    def _rows(batch: dict, idx: torch.Tensor | slice) -> tuple:
        multi = batch.get("multi")
        if multi is not None and multi.shape[1] == 0:
            multi = None
        return batch["dense"][idx], batch["sparse"][idx], None if multi is None else multi[idx]

    @torch.no_grad()
    def score(self, batch: dict, chunk: int = 16384) -> torch.Tensor:
        """Logits ``(N,)`` of a window with the model as it stands (eval mode, no gradient)."""
        was_training = self.model.training
        self.model.eval()
        n = batch["label"].shape[0]
        out = torch.cat([self(*self._rows(batch, slice(i, i + chunk))) for i in range(0, n, chunk)]) if n else torch.zeros(0, device=self.device)
        self.model.train(was_training)
        return out

    def score_window(self, batch: dict) -> torch.Tensor:
        """Logits ``(N,)`` of the whole window in row order. Under several ranks each rank scores a
        contiguous share of the rows and the shares are gathered, so every rank gets every row's logit."""
        n, ranks, rank = batch["label"].shape[0], world_size(), global_rank()
        if ranks == 1:
            return self.score(batch)
        a, b = rank * n // ranks, (rank + 1) * n // ranks
        share = {k: v[a:b] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
        return gather_rows(self.score(share).to(batch["label"].device))

    def _check_window_order(self, window: int) -> None:
        """Under several ranks, refuse a window that does not follow the last one (a sharded or shuffled stream)."""
        if world_size() > 1 and self.window_records and window != self.window_records[-1]["window"] + 1:
            raise RuntimeError(
                f"window {window} arrived after window {self.window_records[-1]['window']}: the stream must be "
                "trained on in time order, every window on every rank; keep trainer.use_distributed_sampler=false "
                "(model=dlrm sets it) so that no distributed sampler shards or shuffles the windows."
            )

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """Prequential step on one window: score it (recorded in :attr:`window_records`), then train on it.

        Under several ranks (DDP) every rank receives every window; the scoring is shared
        (:meth:`score_window`) and each minibatch's rows are split across the ranks, each rank's loss
        weighted by its share of the rows, so DDP's averaged gradient is the whole minibatch's: the
        same steps as one process.
        """
        window = int(batch["window"])
        self._check_window_order(window)
        labels = batch["label"].float()
        logits = self.score_window(batch)
        record = {"window": window, "start": float(batch["start"]) if "start" in batch else None, **window_metrics(logits, labels)}
        self.window_records.append(record)
        if self.hparams.keep_predictions:
            self.predictions[window] = logits.clone()
        for key in ("auc", "log_loss", "ne"):
            if not math.isnan(record[key]):
                self.log(f"stream/{key}", record[key], on_step=True, on_epoch=False, batch_size=len(labels))

        opt = self.optimizers()
        n, mb = labels.shape[0], int(batch["minibatch_size"])
        if self.hparams.shuffle_within_window:
            g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + window)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        objectives = objectives_of(self.trainer)
        ranks, rank = world_size(), global_rank()
        for i in range(0, n, mb):
            idx, weight = rank_share(order[i : i + mb], ranks, rank)
            rows = self._rows(batch, idx)
            out = self(*rows)
            loss = F.binary_cross_entropy_with_logits(out, labels[idx])
            minibatch = {"dense": rows[0], "sparse": rows[1], "multi": rows[2], "label": labels[idx]}
            for objective in objectives:
                loss, extra = objective.training_loss(self, minibatch, out, loss)
                if extra:
                    log_objective_metrics(self, extra, on_step=True, on_epoch=False, batch_size=len(idx))
            opt.zero_grad()
            self.manual_backward(loss * weight)
            opt.step()
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=len(labels))

    def served_model(self) -> "DLRMModule":
        """The model as served, in eval mode: what testing, latency, MACs and export run.

        The same contract as every LightningModule here (``BertClassifier.served_model``): a
        :class:`DLRMModule` in eval mode whose ``.model`` is the served network, a plain
        ``nn.Module`` (:func:`modules.nn.dlrm.export_served`: masks folded into plain layers, dead
        hidden neurons physically removed, no gradients). The module itself is unchanged, and
        its training network is not copied, only rebuilt served.

        Returns:
            a :class:`DLRMModule` in eval mode; ``.model`` is the served :class:`modules.nn.dlrm.DLRM`.
        """
        served = copy.deepcopy(self, {id(self.model): None})  # everything but the training network
        served.model = export_served(self.model, remove_neurons=True)
        return served.eval()

    def exportable(self) -> "ExportableDLRM":
        """The served model for ONNX export (:class:`modules.served.served_dlrm.ExportableDLRM`)."""
        from modules.served.served_dlrm import ExportableDLRM

        return ExportableDLRM(self.served_model().model)

    def configure_optimizers(self):
        """Adam over all parameters; weight decay only on MLP weights."""
        decay = [l.weight for l in self.model.mlp_layers().values()]
        ids = {id(p) for p in decay}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return torch.optim.Adam(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the per-window records in the checkpoint (plain values)."""
        checkpoint["window_records"] = [dict(r) for r in self.window_records]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the per-window records."""
        self.window_records = [dict(r) for r in checkpoint.get("window_records", [])]
