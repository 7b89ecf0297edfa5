"""Adaptive dense-to-sparse (D2S) pruning of a DLRM trained on a stream (arXiv 2010.08655).

The paper (Wang et al., "Adaptive Dense-to-Sparse Paradigm for Pruning Online
Recommendation System with Non-Stationary Data", section 3) keeps training a dense
model on the stream and periodically derives the serving sparse model from it, with
per-layer sparsity learned rather than hand-set. No public code exists; this project
specifies it as (``../shared/notes/algorithms.md`` section 2):

* Target sparsity ramps from ``initial_sparsity`` to ``target_sparsity`` with the cubic
  schedule of Zhu & Gupta 2017 (arXiv 1710.01878, equation 1):
  ``s_t = s_f + (s_0 - s_f) (1 - (t - t_0) / n)^3`` for ``t_0 <= t <= t_0 + n``.
* Every ``update_every`` optimizer steps the masks are recomputed from *recent* data:
  importance is the weight magnitude (``importance=magnitude``) or the magnitude times
  an exponential moving average of the recent gradient magnitude
  (``importance=taylor``, first-order Taylor, Molchanov et al. 2017 arXiv 1611.06440
  eq. 8 applied per weight). With ``allocation=global`` all MLP weights (or neurons) are
  ranked together, so each layer's sparsity falls out of the ranking (learned, not
  set); ``allocation=uniform`` ranks within each layer (the same sparsity everywhere).
* The forward uses the masked weights; gradients reach every *dense shadow* weight
  (straight-through), so pruned weights keep learning and grow back when their
  importance overtakes a kept weight's after the data shifts. With
  ``dense_loss_weight > 0`` (default 1) each step also adds the click loss of the dense
  model (masks off), so the dense model keeps training on the stream and the sparse
  serving model is periodically re-derived from it, as in the paper's dense-to-sparse
  paradigm (section 3); the period is ``update_every``.
* ``mode=static`` is the prune-once baseline: masks at the final target are computed
  once, at the first optimizer step of the stream (importance from that first
  minibatch), pruned weights are zeroed and never receive a gradient again.
* ``granularity=neuron`` removes whole hidden neurons: the consuming layer's input
  column is masked (its producer row keeps learning), and ``modules.nn.dlrm.export_served``
  physically drops the neuron. ``target_sparsity`` is then the fraction of removable
  hidden neurons removed; the resulting weight sparsity is reported as well.

Masks live in the model (buffers ``mask`` / ``bias_mask`` of ``MaskedLinear``), so
they are part of every checkpoint's ``state_dict``; the dense shadows are the
parameters; the pruner's own state (step, gradient averages, history) is saved by
:meth:`D2SPruner.state_dict`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from modules.core.plots import pyplot, save_figure
from modules.lit.distributed import mean_
from modules.lit.dlrm import DLRMModule
from modules.nn.dlrm import neuron_alive
from pruners.base import Pruner, PrunerConfigError, check_choice, check_positive_int, check_range


def cubic_sparsity(step: int, target: float, start_step: int, ramp_steps: int, initial: float = 0.0) -> float:
    """Sparsity at ``step`` on the cubic ramp of Zhu & Gupta 2017 (arXiv 1710.01878, eq. 1).

    ``s_t = s_f + (s_0 - s_f) (1 - (t - t_0) / n)^3``, held at ``s_0`` before ``t_0`` and at
    ``s_f`` after ``t_0 + n`` (``n = ramp_steps``; ``n = 0`` jumps to ``s_f`` at ``t_0``).

    Returns:
        A fraction in ``[initial, target]``.
    """
    if step < start_step:
        return float(initial)
    if ramp_steps <= 0 or step >= start_step + ramp_steps:
        return float(target)
    frac = (step - start_step) / ramp_steps
    return float(target + (initial - target) * (1.0 - frac) ** 3)


def keep_top(scores: torch.Tensor, keep: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``keep`` highest ``scores`` (1-D); ``forced`` entries are kept first.

    Ties are broken by position (stable), so the mask has exactly ``keep`` True entries.
    """
    keep = max(0, min(int(keep), scores.numel()))
    s = scores.detach().float().clone()
    if forced is not None:
        s[forced] = math.inf
    idx = torch.topk(s, keep, sorted=False).indices if keep else torch.zeros(0, dtype=torch.long, device=s.device)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=s.device)
    mask[idx] = True
    return mask


class D2SPruner(Pruner):
    """Adaptive dense-to-sparse pruner of the DLRM MLPs (and optionally embeddings).

    Args:
        target_sparsity: final fraction pruned, in [0, 1).
        granularity: ``unstructured`` (single weights) or ``neuron`` (whole hidden neurons).
        mode: ``adaptive`` (D2S: cubic ramp, masks recomputed every ``update_every`` steps,
            regrowth) or ``static`` (prune once at the start to the target, then train sparse).
        allocation: ``global`` (one ranking over all layers: per-layer sparsity is learned)
            or ``uniform`` (every layer at the same sparsity).
        importance: ``magnitude`` (|w|) or ``taylor`` (|w| times the moving average of |grad|).
        update_every: optimizer steps between mask updates (>= 1).
        ramp_start, ramp_end: start and end of the cubic ramp as fractions of the stream's
            optimizer steps (``0 <= ramp_start <= ramp_end <= 1``).
        initial_sparsity: sparsity at the start of the ramp (``s_0``).
        grad_decay: decay of the gradient moving average, in [0, 1) (recent = about
            ``1 / (1 - grad_decay)`` steps).
        min_density: every layer keeps at least this fraction of its weights (neurons) and at
            least one, so the global ranking never disconnects the network.
        prune_embeddings: also prune the embedding tables (unstructured, one ranking over all
            tables, same schedule and target).
        dense_loss_weight: adaptive mode only: weight of a second loss computed with the masks
            switched off, so the dense model itself keeps training on the stream and the sparse
            model is derived from it (the paper's dense-to-sparse paradigm); 0 trains only the
            sparse forward (the shadows still learn through the straight-through gradient).
        total_steps: optimizer steps of the stream; None reads ``trainer.datamodule.num_optimizer_steps()``.
        name: the pruner's name in configs and metrics.

    Raises:
        PrunerConfigError: any invalid setting (naming it and the allowed values).
    """

    name = "d2s"
    config_name = "d2s"
    prunes_model = "dlrm"
    decisions = frozenset({"weights"})

    def __init__(
        self,
        target_sparsity: float = 0.9,
        granularity: str = "unstructured",
        mode: str = "adaptive",
        allocation: str = "global",
        importance: str = "taylor",
        update_every: int = 50,
        ramp_start: float = 0.0,
        ramp_end: float = 0.5,
        initial_sparsity: float = 0.0,
        grad_decay: float = 0.9,
        min_density: float = 0.01,
        prune_embeddings: bool = False,
        dense_loss_weight: float = 1.0,
        total_steps: int | None = None,
        name: str = "d2s",
    ):
        super().__init__()
        self.target_sparsity = check_range("pruner.target_sparsity", target_sparsity, 0.0, 1.0)
        self.granularity = check_choice("pruner.granularity", granularity, ["unstructured", "neuron"])
        self.mode = check_choice("pruner.mode", mode, ["adaptive", "static"])
        self.allocation = check_choice("pruner.allocation", allocation, ["global", "uniform"])
        self.importance = check_choice("pruner.importance", importance, ["magnitude", "taylor"])
        self.update_every = check_positive_int("pruner.update_every", update_every)
        self.ramp_start = check_range("pruner.ramp_start", ramp_start, 0.0, 1.0, high_open=False)
        self.ramp_end = check_range("pruner.ramp_end", ramp_end, 0.0, 1.0, high_open=False)
        if self.ramp_end < self.ramp_start:
            raise PrunerConfigError(f"pruner.ramp_end={ramp_end} must be >= pruner.ramp_start={ramp_start}.")
        self.initial_sparsity = check_range("pruner.initial_sparsity", initial_sparsity, 0.0, 1.0)
        if self.initial_sparsity > self.target_sparsity:
            raise PrunerConfigError(
                f"pruner.initial_sparsity={initial_sparsity} must be <= pruner.target_sparsity={target_sparsity}."
            )
        self.grad_decay = check_range("pruner.grad_decay", grad_decay, 0.0, 1.0)
        self.min_density = check_range("pruner.min_density", min_density, 0.0, 1.0)
        if not isinstance(prune_embeddings, bool):
            raise PrunerConfigError(f"pruner.prune_embeddings={prune_embeddings!r} must be true or false.")
        self.prune_embeddings = prune_embeddings
        self.dense_loss_weight = check_range("pruner.dense_loss_weight", dense_loss_weight, 0.0, 1e6)
        if total_steps is not None:
            check_positive_int("pruner.total_steps", total_steps)
        self.total_steps = total_steps
        self.name = name
        self.step = 0
        self.grad_ema: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self.regrown_total = 0
        self.model = None
        self._window = -1

    # ------------------------------------------------------------------ wiring
    def attach(self, model: torch.nn.Module) -> None:
        """Bind to a ``modules.nn.dlrm.DLRM`` and set its layers' gradient mode (straight-through unless static).

        Raises:
            PrunerConfigError: the model has no prunable DLRM layers.
        """
        if not hasattr(model, "mlp_layers"):
            raise PrunerConfigError(f"pruner=d2s needs a DLRM model (modules.nn.dlrm.DLRM); got {type(model).__name__}.")
        self.model = model
        for layer in self._tensors().values():
            layer.straight_through = self.mode == "adaptive"

    def check(self, pl_module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        """The model must be a :class:`~modules.lit.dlrm.DLRMModule`.

        Raises:
            PrunerConfigError: another model (e.g. ``model=bert``).
        """
        if not isinstance(pl_module, DLRMModule):
            raise PrunerConfigError(
                f"pruner=d2s prunes the DLRM recommender (model=dlrm), not a {type(pl_module).__name__}; "
                "with model=bert use pruner=top, pruner=swiftpruner or pruner=none."
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Bind to the module's DLRM (see :meth:`attach`)."""
        self.attach(getattr(pl_module, "model", pl_module))

    def _tensors(self) -> dict[str, torch.nn.Module]:
        """Prunable modules by name: MLP layers, then embedding tables when pruned."""
        out: dict[str, torch.nn.Module] = dict(self.model.mlp_layers())
        if self.prune_embeddings:
            out.update(self.model.embedding_tables())
        return out

    def resolve_total_steps(self, trainer: L.Trainer | None) -> int:
        """The stream's optimizer steps (``total_steps`` or the data module's count).

        Raises:
            PrunerConfigError: neither is available.
        """
        if self.total_steps is None:
            dm = getattr(trainer, "datamodule", None) if trainer is not None else None
            if dm is None or not hasattr(dm, "num_optimizer_steps"):
                raise PrunerConfigError("pruner.total_steps is needed: the data module does not report num_optimizer_steps().")
            self.total_steps = int(dm.num_optimizer_steps())
        return self.total_steps

    def ramp_end_step(self) -> int:
        """Optimizer step at which the cubic ramp reaches the target; the masks are updated there too,
        so the target is reached even when the ramp ends between two ``update_every`` updates."""
        return max(1, int(round(self.ramp_end * (self.total_steps or 1))))

    def scheduled_sparsity(self, step: int) -> float:
        """Target sparsity at optimizer step ``step`` (cubic ramp; the final target in static mode)."""
        if self.mode == "static":
            return self.target_sparsity
        total = self.total_steps or 1
        start = int(round(self.ramp_start * total))
        ramp = int(round(self.ramp_end * total)) - start
        return cubic_sparsity(step, self.target_sparsity, start, ramp, self.initial_sparsity)

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resolve_total_steps(trainer)
        if self.mode == "adaptive" and self.step == 0 and not self.history:
            self.update_masks(self.scheduled_sparsity(0))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.importance == "taylor":
            self.accumulate_gradients()
        if self.mode == "static" and self.step == 0 and not self.history:
            self.prune_once()
        self.step += 1
        if self.mode == "adaptive" and (self.step % self.update_every == 0 or self.step == self.ramp_end_step()):
            self.update_masks(self.scheduled_sparsity(self.step))

    def prune_once(self) -> dict[str, Any]:
        """Static baseline: masks at the final target from the first minibatch's importance, pruned
        weights and their gradients zeroed (called before the first optimizer step; never again)."""
        record = self.update_masks(self.target_sparsity)
        with torch.no_grad():
            for layer in self._tensors().values():
                layer.weight.mul_(layer.mask)
                if layer.weight.grad is not None:
                    layer.weight.grad.mul_(layer.mask)
        return record

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._window = int(batch["window"]) if isinstance(batch, dict) and "window" in batch else batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dens = self.layer_densities()
        metrics = {"sparsity": 1.0 - self._overall(dens), "target": self.scheduled_sparsity(self.step)}
        metrics.update({f"sparsity/{k}": 1.0 - v for k, v in dens.items()})
        self.log_metrics(pl_module, metrics, on_step=True, on_epoch=False, batch_size=1)

    def training_loss(self, pl_module, batch, outputs, task_loss):
        """Add ``dense_loss_weight`` x the click loss of the dense model (masks off) on the minibatch.

        Args:
            batch: the minibatch (``dense`` ``(B, K)``, ``sparse`` ``(B, F_s)``, ``multi``, ``label`` ``(B,)``).
            outputs: ``(B,)`` logits of the sparse (masked) forward.
            task_loss: scalar loss of the sparse forward.
        """
        if self.dense_loss_weight == 0 or self.mode != "adaptive" or self.model is None:
            return task_loss, {}
        tensors = list(self._tensors().values())
        for t in tensors:
            t.straight_through = None
        try:
            dense_logits = self.model(batch["dense"], batch["sparse"], batch["multi"])
        finally:
            for t in tensors:
                t.straight_through = True
        dense_loss = torch.nn.functional.binary_cross_entropy_with_logits(dense_logits, batch["label"])
        return task_loss + self.dense_loss_weight * dense_loss, {"dense_loss": dense_loss.detach()}

    # ------------------------------------------------------------------ importance and masks
    def accumulate_gradients(self) -> None:
        """Update the moving average of |grad| of every prunable weight (call after backward)."""
        for name, layer in self._tensors().items():
            g = layer.weight.grad
            if g is None:
                continue
            g = g.detach().abs()
            if name not in self.grad_ema:
                self.grad_ema[name] = g.clone()
            else:
                self.grad_ema[name].mul_(self.grad_decay).add_(g, alpha=1.0 - self.grad_decay)

    def weight_importance(self, name: str, layer: torch.nn.Module) -> torch.Tensor:
        """Importance of each weight of a layer, same shape as the weight (dense shadow values).

        ``magnitude``: |w|. ``taylor``: |w| * EMA(|dL/dw|) (magnitude until a gradient was seen).
        Under several ranks the importance is averaged over them before any mask is derived from it,
        so every rank computes the same masks (DDP's averaged gradients make them equal already; this
        does not rely on it).
        """
        w = layer.weight.detach().abs()
        if self.importance == "taylor" and name in self.grad_ema:
            w = w * self.grad_ema[name]
        mean_([w])
        return w

    def update_masks(self, sparsity: float) -> dict[str, Any]:
        """Recompute every mask at ``sparsity`` from the current importance; record and return the update.

        Returns:
            The history record: ``step``, ``window``, ``target``, ``overall`` (fraction of MLP weights
            absent from the served model, i.e. masked or attached to a removed neuron), ``masked``
            (fraction of MLP mask entries False), ``layers`` (per-layer ``overall``),
            ``neurons_removed``, ``regrown`` (entries unmasked by this update).
        """
        if self.model is None:
            raise PrunerConfigError("D2SPruner.update_masks called before attach(model).")
        old = {n: l.mask.clone() for n, l in self._tensors().items()}
        if self.granularity == "unstructured":
            self._unstructured(self.model.mlp_layers(), sparsity)
        else:
            self._neurons(sparsity)
        if self.prune_embeddings:
            self._unstructured(self.model.embedding_tables(), sparsity)
        regrown = int(sum(int((~old[n] & l.mask).sum()) for n, l in self._tensors().items()))
        self.regrown_total += regrown
        dens = self.layer_densities()
        record = {
            "step": self.step,
            "window": self._window,
            "target": float(sparsity),
            "overall": 1.0 - self._overall(dens),
            "masked": self.masked_sparsity(),
            "layers": {k: 1.0 - v for k, v in dens.items()},
            "neurons_removed": self.neurons_removed(),
            "regrown": regrown,
        }
        if self.prune_embeddings:
            record["embeddings"] = self.embedding_sparsity()
        self.history.append(record)
        return record

    def _min_keep(self, n: int) -> int:
        return max(1, math.ceil(self.min_density * n))

    def _unstructured(self, layers: dict[str, torch.nn.Module], sparsity: float) -> None:
        names = list(layers)
        scores = [self.weight_importance(n, layers[n]).flatten() for n in names]
        sizes = [s.numel() for s in scores]
        if self.allocation == "uniform":
            masks = [keep_top(s, max(self._min_keep(s.numel()), round((1 - sparsity) * s.numel()))) for s in scores]
        else:
            flat = torch.cat(scores)
            forced = torch.cat([keep_top(s, self._min_keep(s.numel())) for s in scores])
            keep = max(int(forced.sum()), round((1 - sparsity) * flat.numel()))
            masks = list(torch.split(keep_top(flat, keep, forced), sizes))
        for n, m in zip(names, masks):
            layers[n].mask.copy_(m.view_as(layers[n].mask))

    def neuron_scores(self) -> dict[str, torch.Tensor]:
        """Importance ``(n_l,)`` of each removable hidden neuron, per producing layer.

        Score of neuron j = sqrt(mean importance of its incoming row x mean importance of its
        outgoing column), divided by the layer's mean score so layers of different widths
        and scales compete on relative importance in the global ranking.
        """
        out = {}
        layers = self.model.mlp_layers()
        for name, (producer, _consumer) in self.model.hidden_neurons().items():
            cname = _consumer_name(name)
            row = self.weight_importance(name, producer).mean(dim=1)
            col = self.weight_importance(cname, layers[cname]).mean(dim=0)
            s = torch.sqrt(row * col + 1e-30)
            out[name] = s / (s.mean() + 1e-30)
        return out

    def _neurons(self, sparsity: float) -> None:
        layers = self.model.mlp_layers()
        scores = self.neuron_scores()
        names = list(scores)
        sizes = [scores[n].numel() for n in names]
        if self.allocation == "uniform":
            keeps = [keep_top(scores[n], max(self._min_keep(k), round((1 - sparsity) * k))) for n, k in zip(names, sizes)]
        else:
            flat = torch.cat([scores[n] for n in names])
            forced = torch.cat([keep_top(scores[n], self._min_keep(k)) for n, k in zip(names, sizes)])
            keep = max(int(forced.sum()), round((1 - sparsity) * flat.numel()))
            keeps = list(torch.split(keep_top(flat, keep, forced), sizes))
        for layer in layers.values():
            layer.mask.fill_(True)
            layer.bias_mask.fill_(True)
        for n, keep in zip(names, keeps):
            layers[_consumer_name(n)].mask[:, ~keep] = False

    # ------------------------------------------------------------------ reporting
    def layer_densities(self) -> dict[str, float]:
        """Fraction of each MLP layer's weights still in the served model (after neuron removal)."""
        layers = self.model.mlp_layers()
        alive_out = {n: torch.ones(l.out_features, dtype=torch.bool, device=l.mask.device) for n, l in layers.items()}
        for name, (producer, _consumer) in self.model.hidden_neurons().items():
            cname = _consumer_name(name)
            alive_out[name] = neuron_alive(producer, layers[cname])
        out = {}
        for name, layer in layers.items():
            mlp, i = name.split(".")
            alive_in = alive_out[f"{mlp}.{int(i) - 1}"] if int(i) > 0 else torch.ones(layer.in_features, dtype=torch.bool, device=layer.mask.device)
            kept = layer.mask & alive_out[name][:, None] & alive_in[None, :]
            out[name] = float(kept.sum()) / kept.numel()
        return out

    def _overall(self, dens: dict[str, float]) -> float:
        layers = self.model.mlp_layers()
        total = sum(layers[n].weight.numel() for n in dens)
        return sum(dens[n] * layers[n].weight.numel() for n in dens) / total

    def masked_sparsity(self) -> float:
        """Fraction of MLP weight-mask entries that are False (what the unstructured schedule controls)."""
        layers = self.model.mlp_layers().values()
        return 1.0 - sum(int(l.mask.sum()) for l in layers) / sum(l.mask.numel() for l in layers)

    def neurons_removed(self) -> float:
        """Fraction of removable hidden neurons whose outgoing column is fully masked."""
        layers = self.model.mlp_layers()
        dead = total = 0
        for name in self.model.hidden_neurons():
            col_alive = layers[_consumer_name(name)].mask.any(dim=0)
            dead += int((~col_alive).sum())
            total += col_alive.numel()
        return dead / total if total else 0.0

    def embedding_sparsity(self) -> float:
        """Fraction of embedding-table entries masked."""
        tables = self.model.embedding_tables().values()
        return 1.0 - sum(int(t.mask.sum()) for t in tables) / sum(t.mask.numel() for t in tables)

    def achieved_sparsity(self) -> float:
        """What ``target_sparsity`` controls: the fraction of masked MLP weights (``unstructured``) or of
        removed hidden neurons (``neuron``)."""
        return self.masked_sparsity() if self.granularity == "unstructured" else self.neurons_removed()

    def target_met(self, tolerance: float = 0.01) -> bool:
        """Whether the achieved sparsity is within ``tolerance`` (a fraction) of ``target_sparsity``."""
        return self.achieved_sparsity() >= self.target_sparsity - tolerance

    def results(self) -> dict[str, Any]:
        """Settings, achieved sparsity (overall / masked / per layer, fractions), neuron removal, regrowth, history."""
        dens = self.layer_densities() if self.model is not None else {}
        out = {
            "method": "adaptive dense-to-sparse (arXiv 2010.08655) with cubic schedule (arXiv 1710.01878)",
            "mode": self.mode,
            "granularity": self.granularity,
            "allocation": self.allocation,
            "importance": self.importance,
            "target_sparsity": self.target_sparsity,
            "update_every": self.update_every,
            "overall": 1.0 - self._overall(dens) if dens else None,
            "masked": self.masked_sparsity() if self.model is not None else None,
            "per_layer": {k: 1.0 - v for k, v in dens.items()},
            "neurons_removed": self.neurons_removed() if self.model is not None else None,
            "mask_updates": len(self.history),
            "target_met": self.target_met() if self.model is not None else None,
            "regrown_total": self.regrown_total,
            "history": self.history,
        }
        if self.prune_embeddings and self.model is not None:
            out["embeddings"] = self.embedding_sparsity()
        return out

    def write_files(self, out_dir: Path) -> dict[str, str]:
        """``sparsity_history.png``: achieved per-layer MLP sparsity and the schedule over the optimizer steps."""
        if not self.history:
            return {}
        plt = pyplot()
        steps = [h["step"] for h in self.history]
        fig, ax = plt.subplots(figsize=(7, 4))
        for layer in self.history[-1]["layers"]:
            ax.plot(steps, [h["layers"][layer] for h in self.history], label=layer)
        ax.plot(steps, [h["overall"] for h in self.history], "k-", lw=2, label="overall")
        ax.plot(steps, [h["target"] for h in self.history], "k:", label="schedule")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("sparsity (fraction of weights)")
        ax.set_title(f"D2S ({self.mode}, {self.granularity}): achieved per-layer sparsity")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = "sparsity_history.png"
        save_figure(fig, Path(out_dir) / name, dpi=100)
        return {"sparsity_history": name}

    def state_dict(self) -> dict[str, Any]:
        """Step, total steps, gradient averages, history and regrowth count (masks and shadows are in the model)."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "grad_ema": {k: v.clone() for k, v in self.grad_ema.items()},
            "history": [dict(r, layers=dict(r["layers"])) for r in self.history],
            "regrown_total": self.regrown_total,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.step = int(state_dict["step"])
        self.total_steps = state_dict["total_steps"]
        self.grad_ema = {k: v.clone() for k, v in state_dict["grad_ema"].items()}
        self.history = [dict(r) for r in state_dict["history"]]
        self.regrown_total = int(state_dict["regrown_total"])


def _consumer_name(name: str) -> str:
    """``top.0`` -> ``top.1``: the layer consuming a layer's neurons."""
    mlp, i = name.split(".")
    return f"{mlp}.{int(i) + 1}"
