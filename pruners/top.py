"""ToP: constraint-aware, ranking-distilled token pruning (Li et al., KDD 2023, arXiv 2306.14393).

Pieces:

* :class:`modules.nn.gates.TokenGates` - coarse-to-fine hard-concrete gates (Sec. 3.2): one
  gate per *rank bin* per pruning layer, plus one gate per pruning layer deciding whether
  that layer prunes at all. Tokens are ranked by the attention they received in the
  previous layer; pruning is cumulative; [CLS] is never pruned. At evaluation the gates
  are deterministic and closed tokens are removed (gathered out) by the encoder. The
  gates are state the model carries, so they live in ``modules/``; this module trains them.
* :func:`expected_macs` - the analytic MACs constraint from the expected kept length
  of every layer, per sample, on the unpadded length (Sec. 3.3).
* :func:`arp2_loss` - LambdaLoss ARP-2 ranking distillation (Wang et al. 2018; ToP Sec. 3.4).
* :class:`ToPPruner` - the Lightning callback that trains it all: KL logits
  distillation (T = 2) + task loss + Lagrangian ``lambda1 (s - t) + lambda2 (s - t)^2``
  with the multipliers maximised + ranking distillation, target sparsity ``t`` ramped
  linearly over a warm-up.

Unlike the reference code, which only masks tokens, the model this trains really
removes them at inference (see ``modules.nn.bert.gather_tokens``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from modules.nn.bert import layer_macs
from modules.lit.distributed import gather_rows, mean_
from pruners.base import FitPlan, PrunerConfigError, check_positive_int, check_range
from pruners.distillation import TeacherPruner, kd_loss
from modules.nn.gates import TokenGates, bin_of_rank


def expected_macs(gates: TokenGates, lengths: torch.Tensor, hidden: int, intermediate: int) -> torch.Tensor:
    """Expected encoder MACs per sample under the gate distribution (arXiv 2306.14393 Sec. 3.3).

    The expected length of pruning layer ``l`` is ``1 + m_l`` with
    ``m_l = m_{l-1} * keep_ratio_l`` ([CLS] always kept, ``m_0 = length - 1``). Layer i's
    attention is counted on its own length and its feed-forward block on layer i+1's
    (the last layer's on its own), since pruned tokens leave right after the scoring
    layer's attention (as :meth:`modules.nn.bert.PrunableBertForSequenceClassification.macs`
    counts the model it trains; ToP's reference ``calculate_mac_for_encoder``).

    Args:
        gates: the token gates.
        lengths: (B,) real (unpadded) sequence lengths in tokens.
        hidden, intermediate: layer sizes.

    Returns:
        (B,) expected MACs (differentiable in the gates' log_alpha).
    """
    ratio = gates.keep_ratio()
    m = lengths.to(ratio.dtype) - 1.0
    per_layer = []
    for i in range(gates.num_layers):
        if i in gates._slot:
            m = m * ratio[gates._slot[i]]
        per_layer.append(1.0 + m)
    last = len(per_layer) - 1
    return sum(
        layer_macs(n, hidden, intermediate, ffn_len=per_layer[min(i + 1, last)]) for i, n in enumerate(per_layer)
    )


def deterministic_kept_lengths(
    gates: TokenGates, layer_on: torch.Tensor, kept: torch.Tensor, lengths: torch.Tensor
) -> list[torch.Tensor]:
    """Tokens each layer computes on under fixed evaluation gates, computed without running the model.

    Exact, because a sample's rank bins depend only on how many candidates it has: the
    ``m`` non-[CLS] tokens entering a pruning layer fall into bins ``floor(r * B / m)``
    for ranks ``r < m``, whatever the scores (see :func:`modules.nn.gates.rank_bins`).

    Args:
        gates: the token gates (layer layout and bin count).
        layer_on: (P,) bool, which pruning layers prune.
        kept: (P, bin_count) bool, kept rank bins.
        lengths: (S,) real (unpadded) sequence lengths, [CLS] included.

    Returns:
        per encoder layer, (S,) float tokens computed on ([CLS] included), as the
        encoder's ``EncoderOutput.kept_lengths`` at evaluation.
    """
    m = lengths.to(device=kept.device, dtype=torch.long) - 1
    ranks = torch.arange(int(m.max().clamp_min(1)) if m.numel() else 1, device=kept.device)
    out = []
    for i in range(gates.num_layers):
        slot = gates._slot.get(i)
        if slot is not None and bool(layer_on[slot]) and m.numel():
            bins = bin_of_rank(ranks[None, :], m.clamp_min(1)[:, None], gates.bin_count)
            m = (kept[slot][bins] & (ranks[None, :] < m[:, None])).sum(dim=1)
        out.append((1 + m).to(torch.float32))
    return out


def project_to_sparsity(
    gates: TokenGates, lengths: torch.Tensor, macs_fn, target: float
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Evaluation gates moved to a MACs sparsity on ``lengths`` just at or above ``target``.

    The deterministic gates (:meth:`TokenGates.deterministic`) can miss the target either
    way: they round each layer's expected kept bins and switch whole layers on or off,
    while training constrained the *expected* sparsity. Starting from them, when over the
    target, closed bins of the pruning layers are reopened, highest log_alpha first, until
    the next one would take ``1 - MACs(gates) / MACs(dense)`` below ``target``; when under it,
    the open bin with the lowest log_alpha is closed (switching on the off layer with the
    highest layer log_alpha when no layer prunes) until it reaches ``target``. Used when
    the gates are frozen for the final fine-tuning, so the served model meets the target
    without pruning more than it asks for.

    Args:
        gates: the token gates.
        lengths: (S,) real sequence lengths of the samples to measure on (e.g. validation).
        macs_fn: kept lengths per layer -> (S,) MACs (the model's ``macs``).
        target: MACs sparsity to reach, a fraction in [0, 1).

    Returns:
        (layer_on (P,) bool, kept (P, bin_count) bool, sparsity reached (fraction),
        number of gates changed, opened or closed).
    """
    layer_on, kept = (t.clone() for t in gates.deterministic())
    lengths = lengths.to(kept.device)
    dense = macs_fn([lengths.to(torch.float32)] * gates.num_layers).sum()
    token_la = gates.token.log_alpha.detach().view(len(gates.pruning_layers), gates.bin_count)
    layer_la = gates.layer.log_alpha.detach()

    def sparsity_of(on: torch.Tensor, kept_bins: torch.Tensor) -> float:
        return float(1.0 - macs_fn(deterministic_kept_lengths(gates, on, kept_bins, lengths)).sum() / dense)

    changed = 0
    # Over the target: reopen the strongest closed bins of pruning layers while the target still holds.
    while True:
        closed = ~kept & layer_on[:, None]
        if not closed.any():
            break
        trial = kept.clone()
        trial.view(-1)[torch.where(closed, token_la, torch.full_like(token_la, -math.inf)).argmax()] = True
        if sparsity_of(layer_on, trial) < target:
            break
        kept, changed = trial, changed + 1
    # Under the target: close the weakest open bins (or switch a layer on) until it holds.
    while True:
        sparsity = sparsity_of(layer_on, kept)
        if sparsity >= target:
            break
        open_bins = kept & layer_on[:, None]
        if open_bins.any():
            flat = torch.where(open_bins, token_la, torch.full_like(token_la, math.inf)).argmin()
            kept.view(-1)[flat] = False
        elif not layer_on.all():
            layer_on[torch.where(layer_on, torch.full_like(layer_la, -math.inf), layer_la).argmax()] = True
        else:  # every token but [CLS] already pruned
            break
        changed += 1
    return layer_on, kept, sparsity, changed


RANK_RELEVANCES = ("score", "rank")


def arp2_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    top_k: int = 20,
    sigma: float = 1.0,
    relevance: str = "score",
) -> torch.Tensor:
    """LambdaLoss ARP-2 ranking distillation over the teacher's top-K tokens.

    ``sum_{i,j: y_i > y_j} |y_i - y_j| * log2(1 + exp(-sigma (s_i - s_j))) / n^2``, per
    sample, averaged over the batch (Wang et al. 2018, "The LambdaLoss Framework";
    ToP arXiv 2306.14393 Sec. 3.4), over the ``n`` (<= K) tokens ranked. The relevance
    labels ``y`` and student scores ``s``:

    * ``relevance="score"``: ``y`` the teacher's token scores, ``s`` the student's, both
      multiplied by the sample's valid length so they average 1 and do not shrink with
      sequence length, normalised by ``n^2``;
    * ``relevance="rank"`` (ToP's reference code): ``y = K - r`` for the teacher's rank
      ``r`` (0 = best) inside its top-K, ``s`` the student's raw scores, normalised by ``K^2``.

    Args:
        student: (B, N) student scores.
        teacher: (B, N) teacher scores (relevance labels; no gradient).
        valid: (B, N) bool, tokens to rank (no padding, no [CLS]).
        top_k: K.
        sigma: the logistic slope.
        relevance: ``"score"`` or ``"rank"``, as above.

    Returns:
        Scalar loss.

    Raises:
        ValueError: an unknown ``relevance``.
    """
    if relevance not in RANK_RELEVANCES:
        raise ValueError(f"relevance={relevance!r}: use one of {list(RANK_RELEVANCES)}.")
    y_all = teacher.detach().masked_fill(~valid, float("-inf"))
    k = min(top_k, student.shape[1])
    y, idx = torch.topk(y_all, k, dim=1)
    in_list = torch.isfinite(y)
    s = torch.gather(student, 1, idx)
    if relevance == "score":
        n_valid = valid.sum(dim=1, keepdim=True).clamp_min(1).to(student.dtype)
        y = torch.where(in_list, y, torch.zeros_like(y)) * n_valid
        s = s * n_valid
        norm = in_list.sum(dim=1).clamp_min(1).to(student.dtype) ** 2
    else:
        y = (top_k - torch.arange(k, device=y.device, dtype=student.dtype))[None, :].expand(y.shape[0], -1)
        norm = torch.full((y.shape[0],), float(top_k * top_k), dtype=student.dtype, device=y.device)
    pair = (y[:, :, None] > y[:, None, :]) & in_list[:, :, None] & in_list[:, None, :]
    gain = (y[:, :, None] - y[:, None, :]).abs()
    logistic = F.softplus(-sigma * (s[:, :, None] - s[:, None, :])) / math.log(2.0)
    per_sample = (pair * gain * logistic).sum(dim=(1, 2)) / norm
    return per_sample.mean()


def lagrangian(expected_sparsity: torch.Tensor, target: float, lambda1: torch.Tensor, lambda2: torch.Tensor) -> torch.Tensor:
    """``lambda1 (s - t) + lambda2 (s - t)^2`` (arXiv 2306.14393 Eq. 8; Wang et al. 2020 arXiv 1910.04732).

    Minimised by the gates, maximised by the multipliers: while ``s < t`` ascent
    drives ``lambda1`` negative, and the gates' descent then raises ``s``.
    """
    gap = expected_sparsity - target
    return lambda1 * gap + lambda2 * gap * gap


class ToPPruner(TeacherPruner):
    """Token pruning with ToP (arXiv 2306.14393) as a Lightning callback.

    Attaches :class:`TokenGates` to the module (``pl_module.token_gates``, saved in its
    state dict), freezes the embeddings, adds optimizer groups for the gates (descent)
    and the Lagrange multipliers (ascent, ``maximize=True``), and replaces the training
    loss with ``task + kd + Lagrangian + alpha_t * ranking``.

    Args:
        target_sparsity: final MACs sparsity ``1 - MACs_pruned / MACs_dense``, in [0, 1).
        teacher_ckpt: checkpoint of a fine-tuned dense ``BertClassifier`` (a
            ``pruner=none`` run); None lets the pipeline fine-tune one first.
        teacher_epochs: most epochs of that in-run dense fine-tuning; it stops earlier once the
            validation metric has converged (``callbacks.early_stopping``).
        pruning_layers: layers whose tokens are pruned (each ranked by the previous layer's
            attention, and gone from that layer's feed-forward block on); None = 2..L-1 (ToP's
            default, layers 2-11 of 12: the first two layers always run on every token;
            1..L-1 for a model of two layers); why not earlier: benchmarks/top.md.
        distill_layers: layers whose token scores are distilled towards the teacher's
            final-layer ranking; None = the first half of the scoring layers (ToP: 1-3 of 12).
        bin_count: rank bins per pruning layer (ToP: 25 for SST-2).
        warmup_fraction: fraction of training steps over which the target ramps 0 -> target
            and the ranking weight decays alpha -> 0.01 alpha.
        gate_lr: learning rate of the gates' log_alpha.
        multiplier_lr: learning rate of the Lagrange multipliers (gradient ascent).
        rank_alpha: initial weight of the ranking loss.
        rank_top_k: K, teacher tokens ranked.
        rank_relevance: ``score`` (relevance = the teacher's scores, both sides scaled by the
            sentence length) or ``rank`` (ToP's reference: integer rank inside the teacher's
            top-K, raw student scores); see :func:`arp2_loss`.
        kd_temperature: logits distillation temperature.
        kd_weight, task_weight: weights of the KL and task losses.
        model_lr: learning rate of the model weights while pruning; None keeps ``model.lr``.
        finetune_fraction: at the first validation in the last ``finetune_fraction`` of
            training, the gates are frozen at their deterministic evaluation values,
            moved to a validation MACs sparsity just at or above the target
            (:func:`project_to_sparsity`), and the model fine-tunes under exactly the
            pruning it will be served with (the post-pruning fine-tuning of CoFi,
            arXiv 2204.00408 Sec. 3.3; ToP's long schedules let the gates converge
            instead). Only checkpoints from this window are kept. 0 disables it
            (checkpoints then count once validation sparsity is within 0.01 of the target).
        pruning_epochs: epochs of the pruning fit (after the teacher); None uses
            ``trainer.max_epochs``.

    Raises:
        PrunerConfigError: a setting out of range (named, with the allowed range).
    """

    name = "top"
    config_name = "top"
    decisions = frozenset({"tokens"})

    def __init__(
        self,
        target_sparsity: float = 0.51,
        teacher_ckpt: str | None = None,
        teacher_epochs: int = 3,
        pruning_layers: list[int] | None = None,
        distill_layers: list[int] | None = None,
        bin_count: int = 25,
        warmup_fraction: float = 0.3,
        gate_lr: float = 0.05,
        multiplier_lr: float = 0.02,
        rank_alpha: float = 0.01,
        rank_top_k: int = 20,
        rank_relevance: str = "score",
        kd_temperature: float = 2.0,
        kd_weight: float = 1.0,
        task_weight: float = 1.0,
        model_lr: float | None = 3e-5,
        finetune_fraction: float = 0.6,
        pruning_epochs: int | None = 5,
        name: str = "top",
    ):
        super().__init__()
        self.target_sparsity = check_range("pruner.target_sparsity", target_sparsity, 0.0, 1.0)
        self.teacher_ckpt = teacher_ckpt
        self.teacher_epochs = check_positive_int("pruner.teacher_epochs", teacher_epochs)
        self.pruning_layers = list(pruning_layers) if pruning_layers is not None else None
        self.distill_layers = list(distill_layers) if distill_layers is not None else None
        self.bin_count = check_positive_int("pruner.bin_count", bin_count, minimum=2)
        self.warmup_fraction = check_range("pruner.warmup_fraction", warmup_fraction, 0.0, 1.0, high_open=False)
        self.gate_lr = check_range("pruner.gate_lr", gate_lr, 0.0, math.inf, low_open=True)
        self.multiplier_lr = check_range("pruner.multiplier_lr", multiplier_lr, 0.0, math.inf, low_open=True)
        self.rank_alpha = check_range("pruner.rank_alpha", rank_alpha, 0.0, math.inf)
        self.rank_top_k = check_positive_int("pruner.rank_top_k", rank_top_k, minimum=2)
        if rank_relevance not in RANK_RELEVANCES:
            raise PrunerConfigError(f"pruner.rank_relevance={rank_relevance!r}: use one of {list(RANK_RELEVANCES)}.")
        self.rank_relevance = rank_relevance
        self.kd_temperature = check_range("pruner.kd_temperature", kd_temperature, 0.0, math.inf, low_open=True)
        self.kd_weight = check_range("pruner.kd_weight", kd_weight, 0.0, math.inf)
        self.task_weight = check_range("pruner.task_weight", task_weight, 0.0, math.inf)
        self.model_lr = None if model_lr is None else check_range("pruner.model_lr", model_lr, 0.0, math.inf, low_open=True)
        self.finetune_fraction = check_range("pruner.finetune_fraction", finetune_fraction, 0.0, 1.0, high_open=False)
        self.pruning_epochs = None if pruning_epochs is None else check_positive_int("pruner.pruning_epochs", pruning_epochs)
        self.freeze_info: dict[str, Any] | None = None
        self._teacher_cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self._val_lengths: list[torch.Tensor] = []
        self.name = name
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self.teacher: nn.Module | None = None
        self._total_steps = 1
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def check(self, pl_module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
        """A BERT classifier whose layers fit ``pruning_layers``, ``distill_layers`` and ``bin_count``.

        Raises:
            PrunerConfigError: another model, or layer settings the model cannot take (named).
        """
        super().check(pl_module, datamodule)
        n_layers = len(pl_module.model.bert.encoder.layer)
        layers = self.pruning_layers if self.pruning_layers is not None else default_pruning_layers(n_layers)
        try:
            gates = TokenGates(n_layers, layers, self.bin_count)
        except ValueError as err:
            raise PrunerConfigError(str(err)) from None
        self._distill_layers_for(gates)

    def _distill_layers_for(self, gates: TokenGates) -> list[int]:
        """``distill_layers``, or the first half of the layers that score a pruning layer (each
        pruning layer l is scored by layer l - 1).

        Raises:
            PrunerConfigError: a distilled layer scores no pruning layer.
        """
        scoring = [l - 1 for l in gates.pruning_layers]
        layers = self.distill_layers if self.distill_layers is not None else scoring[: max(1, len(scoring) // 2)]
        bad = [l for l in layers if l not in scoring]
        if bad:
            raise PrunerConfigError(
                f"pruner.distill_layers={layers}: layers {bad} do not score any pruning layer; "
                f"choose from {scoring} (each pruning layer l is scored by layer l-1)."
            )
        return layers

    def attach(self, pl_module: L.LightningModule) -> TokenGates:
        """Give the module its token gates (kept if already there, e.g. when resuming).

        On a model an earlier stage pruned (:class:`pruners.composite.CompositePruner`), the
        gates fit the layers it has (a layer-dropped model has fewer), and a layer whose heads
        were all removed scores no token: by default no token pruning follows it.

        Raises:
            PrunerConfigError: ``pruning_layers`` names a layer right after a headless layer,
                or no default pruning layer is left.
        """
        n_layers = len(pl_module.model.bert.encoder.layer)
        if pl_module.token_gates is None:
            heads, _ = pl_module.model.structured_masks()
            headless = {i for i, m in enumerate(heads) if not bool((m != 0).any())}
            if self.pruning_layers is None:
                layers = [l for l in default_pruning_layers(n_layers) if l - 1 not in headless]
                if not layers:
                    raise PrunerConfigError(f"Token pruning: every layer that could score tokens has no attention head "
                                            f"left (layers {sorted(headless)}); keep heads in them (a structure stage's "
                                            "head_choices without 0).")
            else:
                layers = self.pruning_layers
                bad = [l for l in layers if l - 1 in headless]
                if bad:
                    raise PrunerConfigError(f"pruner.pruning_layers={layers}: layers {[l - 1 for l in bad]} have no "
                                            "attention head left to score tokens; choose other pruning layers.")
            # ToP's initialisation (TokenGates' defaults): token gates open, layer gates off.
            pl_module.token_gates = TokenGates(n_layers, layers, self.bin_count)
        gates = pl_module.token_gates
        self.distill_layers = self._distill_layers_for(gates)
        return gates

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Load the teacher, attach the gates, freeze embeddings, set the checkpoint sparsity floor (fit only)."""
        if stage != "fit":
            return
        self.ensure_teacher()
        self.attach(pl_module)  # a resumed fit restores the frozen snapshot with the module's state dict
        pl_module.model.bert.embeddings.requires_grad_(False)  # ToP trains with frozen embeddings
        # DDP leaves the gates alone (they stop receiving gradients once frozen, which DDP's reducer
        # would refuse); :meth:`on_before_optimizer_step` averages their gradients over the ranks instead.
        pl_module._ddp_params_and_buffers_to_ignore = [f"token_gates.{n}" for n, _ in pl_module.token_gates.named_parameters()]
        pl_module.checkpoint_sparsity_floor = self.target_sparsity - 0.01
        # With a fine-tuning window, only models under their final (frozen) pruning are kept.
        pl_module.checkpoint_requires_frozen_gates = self.finetune_fraction > 0

    def param_groups(self, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Gates (descent, ``gate_lr``) and Lagrange multipliers (ascent: ``maximize=True``, ``multiplier_lr``)."""
        return [
            {"params": list(pl_module.token_gates.parameters()), "lr": self.gate_lr, "weight_decay": 0.0,
             "name": "pruner/gates"},
            {"params": [self.lambda1, self.lambda2], "lr": self.multiplier_lr, "weight_decay": 0.0,
             "maximize": True, "name": "pruner/lagrangian"},
        ]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember the total step count for the warm-up schedule; put the teacher and multipliers on the module's device."""
        super().on_fit_start(trainer, pl_module)
        self._total_steps = max(1, int(trainer.estimated_stepping_batches))
        for p in (self.lambda1, self.lambda2):
            p.data = p.data.to(pl_module.device)  # the same Parameter objects the optimizer holds

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        """Average the gates' and multipliers' gradients over the ranks (DDP syncs only the model's other
        parameters), so every rank takes the same step; before gradient clipping. A no-op in one process."""
        gates = pl_module.token_gates
        params = [*(gates.parameters() if gates is not None else []), self.lambda1, self.lambda2]
        mean_(p.grad for p in params)

    # ------------------------------------------------------------- objective
    def schedule(self, step: int) -> tuple[float, float]:
        """(target sparsity, ranking weight) at ``step``: linear ramp 0 -> target and decay alpha -> 0.01 alpha."""
        warm = max(1, int(self.warmup_fraction * self._total_steps))
        frac = min(1.0, step / warm)
        return self.target_sparsity * frac, self.rank_alpha * (1.0 - 0.99 * frac)

    @torch.no_grad()
    def teacher_forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (B, C) logits and (B, N) final-layer token scores on ``batch``, computed now."""
        out = self.teacher(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), return_scores=True)
        return out.logits, out.scores[-1]

    @torch.no_grad()
    def teacher_outputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`teacher_forward`, cached per training sentence.

        The frozen teacher's outputs never change, so rows seen before (same tokens and
        segments) come from the cache and later epochs skip its forward pass; a batch with
        any unseen row runs the teacher and caches every row. Scores at padding positions are
        0 (the ranking loss masks them).

        Returns:
            (B, C) logits and (B, N) scores, on the batch's device.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        types = batch.get("token_type_ids")
        host_ids, host_mask = ids.cpu(), mask.cpu()
        host_types = None if types is None else types.cpu()
        keys = [
            host_ids[i][host_mask[i]].numpy().tobytes()
            + (b"" if host_types is None else host_types[i][host_mask[i]].numpy().tobytes())
            for i in range(ids.shape[0])
        ]
        if not all(k in self._teacher_cache for k in keys):
            logits, scores = self.teacher_forward(batch)
            for i, k in enumerate(keys):
                self._teacher_cache[k] = (logits[i].clone(), scores[i][mask[i]].clone())
        logits = torch.stack([self._teacher_cache[k][0] for k in keys])
        scores = torch.zeros(ids.shape, dtype=logits.dtype, device=logits.device)
        for i, k in enumerate(keys):
            scores[i][mask[i]] = self._teacher_cache[k][1]
        return logits, scores

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Drop the teacher cache; the teacher back to the host."""
        super().on_fit_end(trainer, pl_module)
        self._teacher_cache.clear()

    def training_loss(self, pl_module, batch, outputs, task_loss):
        """ToP objective: task + KL distillation + Lagrangian on expected MACs sparsity + ranking distillation (Sec. 3.3-3.5)."""
        gates: TokenGates = pl_module.token_gates
        cfg = pl_module.model.config
        teacher_logits, teacher_scores = self.teacher_outputs(batch)
        lengths = batch["attention_mask"].sum(dim=1)
        exp_macs = expected_macs(gates, lengths, cfg.hidden_size, cfg.intermediate_size)
        full = expected_macs_dense(lengths, len(pl_module.model.bert.encoder.layer), cfg.hidden_size, cfg.intermediate_size)
        sparsity = 1.0 - exp_macs.sum() / full.sum()
        target, alpha = self.schedule(pl_module.trainer.global_step)
        # Frozen gates get no gradient, so the constraint has nothing left to act on.
        lag = torch.zeros((), device=sparsity.device) if gates.frozen else lagrangian(sparsity, target, self.lambda1, self.lambda2)
        kd = kd_loss(outputs.logits, teacher_logits, self.kd_temperature)
        valid = batch["attention_mask"].bool().clone()
        valid[:, 0] = False
        rank = sum(
            arp2_loss(outputs.scores[l], teacher_scores, valid, self.rank_top_k, relevance=self.rank_relevance)
            for l in self.distill_layers
        )
        loss = self.task_weight * task_loss + self.kd_weight * kd + lag + alpha * rank
        logs = {
            "expected_sparsity": sparsity.detach(),
            "target_sparsity": target,
            "lambda1": self.lambda1.detach(),
            "lambda2": self.lambda2.detach(),
            "lagrangian": lag.detach(),
            "kd_loss": kd.detach(),
            "rank_loss": rank.detach(),
        }
        self._last = {k: float(v) for k, v in logs.items()}
        return loss, logs

    @property
    def frozen_at_step(self) -> int | None:
        """Global step at which the gates were frozen (None: not frozen)."""
        return None if self.freeze_info is None else self.freeze_info["step"]

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start collecting the validation lengths (for the projection at freezing time)."""
        self._val_lengths = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Record each validation sample's real length."""
        self._val_lengths.append(batch["attention_mask"].sum(dim=1).cpu())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """At the first validation in the fine-tuning window, freeze the gates at the target.

        The evaluation gates are first moved, on this validation split's lengths, to a
        MACs sparsity just at or above ``target_sparsity`` (:func:`project_to_sparsity`),
        so the fine-tuned model is served at the target whether the deterministic gates
        fell short of it or overshot it. Checkpoints count only after this (``checkpoint_requires_frozen_gates``).
        """
        gates = pl_module.token_gates
        if trainer.sanity_checking or gates is None or gates.frozen or self.finetune_fraction == 0:
            return
        if trainer.global_step < (1.0 - self.finetune_fraction) * self._total_steps:
            return
        # Every rank saw its shard of the validation split: project on all of them, so every rank freezes alike.
        local = torch.cat(self._val_lengths) if self._val_lengths else torch.zeros(0, dtype=torch.long)
        lengths = gather_rows(local.to(pl_module.device)).cpu()
        if not lengths.numel():
            return
        measured = trainer.callback_metrics.get("val/sparsity")
        layer_on, kept, sparsity, changed = project_to_sparsity(gates, lengths, pl_module.model.macs, self.target_sparsity)
        gates.freeze(layer_on, kept)
        gates.requires_grad_(False)  # no gradient reaches frozen gates; the optimizer skips them
        self.freeze_info = {
            "step": int(trainer.global_step),
            "val_sparsity_before": None if measured is None else float(measured),
            "val_sparsity_frozen": sparsity,
            "gates_changed_by_projection": changed,
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Clamp log_alpha after each optimizer step, as the reference code does."""
        pl_module.token_gates.token.clamp_()
        pl_module.token_gates.layer.clamp_()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log each pruning layer's expected keep ratio and layer-gate probability."""
        gates: TokenGates = pl_module.token_gates
        ratio = gates.keep_ratio().detach()
        on = gates.layer_on_prob().detach()
        for layer, r, p in zip(gates.pruning_layers, ratio, on):
            self.log_metrics(pl_module, {f"keep_ratio/layer{layer}": r, f"layer_on_prob/layer{layer}": p})

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Multipliers, teacher checkpoint path, distilled layers, freeze snapshot, schedule length,
        last step's figures and the teacher cache (plain values, bytes and tensors). The gates
        themselves (and their frozen snapshot) are module state."""
        keys = list(self._teacher_cache)
        return {
            "lambda1": self.lambda1.detach().clone(),
            "lambda2": self.lambda2.detach().clone(),
            "teacher_ckpt": self.teacher_ckpt,
            "distill_layers": self.distill_layers,
            "freeze_info": self.freeze_info,
            "total_steps": self._total_steps,
            "last": dict(self._last),
            "teacher_cache": {"keys": keys, "logits": [self._teacher_cache[k][0].cpu() for k in keys],
                              "scores": [self._teacher_cache[k][1].cpu() for k in keys]},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        with torch.no_grad():
            self.lambda1.copy_(state_dict["lambda1"])
            self.lambda2.copy_(state_dict["lambda2"])
        self.teacher_ckpt = state_dict.get("teacher_ckpt", self.teacher_ckpt)
        self.distill_layers = state_dict.get("distill_layers", self.distill_layers)
        self.freeze_info = state_dict.get("freeze_info")
        self._total_steps = int(state_dict.get("total_steps", self._total_steps))
        self._last = dict(state_dict.get("last", {}))
        cache = state_dict.get("teacher_cache") or {"keys": [], "logits": [], "scores": []}
        self._teacher_cache = {k: (l, s) for k, l, s in zip(cache["keys"], cache["logits"], cache["scores"])}

    def fit_plan(self) -> FitPlan:
        """``pruning_epochs`` at ``model_lr``; the checkpoint is the best ``val/accuracy_at_target``
        (-1 until the validation sparsity is within 0.01 of the target and, with a fine-tuning
        window, the gates are frozen)."""
        return FitPlan(max_epochs=self.pruning_epochs, monitor="val/accuracy_at_target", model_lr=self.model_lr)

    def results(self) -> dict[str, Any]:
        """Settings and final training-time figures of the pruning (for results.json)."""
        return {
            "method": "ToP (arXiv 2306.14393)",
            "target_sparsity": self.target_sparsity,
            "teacher_ckpt": self.teacher_ckpt,
            "gates_frozen_at_step": self.frozen_at_step,
            "freeze": self.freeze_info,
            "last_train_step": self._last,
        }


def default_pruning_layers(num_layers: int) -> list[int]:
    """ToP's default pruning layers for an encoder of ``num_layers`` layers: 2..L-1 (1..L-1 when L <= 2).

    ToP's reference implementation prunes before layers 2-11 of BERT-base's 12 (arXiv 2306.14393):
    layers 0 and 1 see every token, so the first ranking comes from layer 1's attention.

    Raises:
        PrunerConfigError: ``num_layers < 2`` (no layer has scores to prune by).
    """
    if num_layers < 2:
        raise PrunerConfigError(f"Token pruning needs at least 2 encoder layers, the model has {num_layers}.")
    return list(range(2 if num_layers > 2 else 1, num_layers))


def expected_macs_dense(lengths: torch.Tensor, num_layers: int, hidden: int, intermediate: int) -> torch.Tensor:
    """(B,) MACs of the unpruned encoder on each sample's real length (the constraint's denominator)."""
    return num_layers * layer_macs(lengths.to(torch.float32), hidden, intermediate)
