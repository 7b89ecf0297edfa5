"""SwiftPruner: latency-budgeted evolutionary search of layer-wise structured sparsity (arXiv 2209.00625).

The published method (Sec. 3 of the paper; facts in ../shared/notes/algorithms.md section 3)
searches a sparsity per layer of BERT with an evolutionary algorithm whose mutations
come from a *reinforced mutator* (a policy rewarded by a latency-aware reward), with
latency predicted rather than measured for every candidate. No code is public; this
module implements the project's specification:

* units that really lower CPU latency: attention heads and FFN neurons per layer
  (masks while training, physically removed for measurement, ``modules.structured``);
* a candidate = per layer, the number of heads kept and of FFN neurons kept, from
  configured choices; it keeps the layer's most important units by first-order Taylor
  importance of the fine-tuned dense model on training examples (2,048 by default, the
  sample size of Kwon et al. 2022, arXiv 2204.09656, whose mask search also scores units on
  training examples; a few hundred select a noticeably different set of units each time);
* latency predicted by a per-layer lookup table measured on this machine
  (:class:`pruners.latency_table.LatencyTable`) and, after the search, checked by a
  direct measurement of every evaluated candidate's physically shrunk model;
* quality from a fast proxy: the masks applied to the dense model (optionally a few
  recovery steps) scored on another held-out validation subset (accuracy or ROC AUC);
* the reward ``quality * (latency / budget)^w`` (MnasNet, arXiv 1807.11626 Eq. 2) and
  evolution with a REINFORCE-trained or a random mutator (:mod:`pruners.evolution`);
* the best candidate whose *measured* latency is within the budget is fine-tuned with
  task loss + distillation from the dense model (:class:`MaskedDistillation`), and so
  is the best uniform configuration within the same measured budget (the baseline).

The search runs in ``on_fit_start`` of the fine-tuning fit (the LightningModule holds
the dense fine-tuned weights then), is seeded, logs its progress per generation, and
its state (importance, lookup table, population, policy, history, choices) is saved in
checkpoints; a resumed fit does not search again.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from modules.structured import UnitImportance, shrink_structured, taylor_importance, top_unit_masks
from pruners.base import PrunerConfigError, check_choice, check_positive_int, check_range
from pruners.distillation import TeacherPruner, kd_loss
from pruners.swiftpruner.evolution import GENERIC_ACTION_FEATURE_NAMES, GENERIC_ACTION_FEATURES, EvolutionarySearch, RandomMutator, ReinforcedMutator, SearchSpace
from pruners.swiftpruner.latency_table import LatencyTable, measure_model_ms
from pruners.mask_tuning import dense_targets, tune_unit_scales

log = logging.getLogger(__name__)

MUTATORS = ("reinforced", "random")
PROXY_METRICS = ("accuracy", "auroc")


class MaskedDistillation(TeacherPruner):
    """Fine-tune a BERT under fixed head/neuron masks with task loss + logits distillation.

    The masks (from a search, or a uniform baseline) are set on the module's model at
    the start of fit; parameter shapes stay put. The loss is ``task_weight * CE +
    kd_weight * KL(teacher || student)`` at temperature ``kd_temperature`` (Hinton et al.
    2015, arXiv 1503.02531), the teacher being the frozen dense model. Checkpoints are
    selected by ``val/accuracy`` (the masks, hence the MACs, are fixed).

    Args:
        head_masks: (L, A) float 0/1 per layer and head; None keeps the model's masks.
        neuron_masks: (L, I) float 0/1 per layer and FFN neuron; None keeps them.
        teacher_ckpt: checkpoint of the fine-tuned dense ``BertClassifier``; None lets
            the pipeline fine-tune one first (``teacher_epochs``).
        teacher_epochs: epochs of that in-run dense fine-tuning.
        finetune_epochs: epochs of fine-tuning under the masks.
        kd_weight, task_weight: loss weights (>= 0).
        kd_temperature: distillation temperature (> 0).
        model_lr: peak learning rate of the model while fine-tuning; None keeps ``model.lr``.
        name: metric and state name.

    Raises:
        PrunerConfigError: a setting out of range (the message names it).
    """

    name = "masked_kd"
    monitor = "val/accuracy"

    def __init__(
        self,
        head_masks: torch.Tensor | None = None,
        neuron_masks: torch.Tensor | None = None,
        teacher_ckpt: str | None = None,
        teacher_epochs: int = 1,
        finetune_epochs: int = 1,
        kd_weight: float = 1.0,
        task_weight: float = 1.0,
        kd_temperature: float = 2.0,
        model_lr: float | None = None,
        name: str = "masked_kd",
    ):
        super().__init__()
        self.head_masks = None if head_masks is None else torch.as_tensor(head_masks, dtype=torch.float32)
        self.neuron_masks = None if neuron_masks is None else torch.as_tensor(neuron_masks, dtype=torch.float32)
        self.teacher_ckpt = teacher_ckpt
        self.teacher_epochs = check_positive_int("pruner.teacher_epochs", teacher_epochs)
        self.finetune_epochs = check_positive_int("pruner.finetune_epochs", finetune_epochs)
        self.kd_weight = check_range("pruner.kd_weight", kd_weight, 0.0, math.inf)
        self.task_weight = check_range("pruner.task_weight", task_weight, 0.0, math.inf)
        self.kd_temperature = check_range("pruner.kd_temperature", kd_temperature, 0.0, math.inf, low_open=True)
        self.model_lr = None if model_lr is None else check_range("pruner.model_lr", model_lr, 0.0, math.inf, low_open=True)
        self.name = name
        self.teacher: nn.Module | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Load the teacher (fit only); checkpoints count at any sparsity (the masks are fixed)."""
        if stage != "fit":
            return
        self.ensure_teacher()
        pl_module.checkpoint_sparsity_floor = None

    def apply_masks(self, pl_module: L.LightningModule) -> None:
        """Set this pruner's masks on ``pl_module.model`` (nothing to do when it holds none)."""
        if self.head_masks is not None or self.neuron_masks is not None:
            pl_module.model.set_structured_masks(self.head_masks, self.neuron_masks)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply the masks before the first step."""
        self.apply_masks(pl_module)

    def training_loss(self, pl_module, batch, outputs, task_loss):
        """``task_weight * task + kd_weight * KL`` against the frozen dense teacher's logits."""
        with torch.no_grad():
            teacher_logits = self.teacher(
                batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")
            ).logits
        loss, kd = self.distillation_loss(task_loss, outputs.logits, teacher_logits)
        return loss, {"kd_loss": kd.detach()}

    def distillation_loss(self, task_loss: torch.Tensor, logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``task_weight * task_loss + kd_weight * KL``, the KL term) for student ``logits`` and
        ``teacher_logits`` of shape (batch, classes) at ``kd_temperature`` (:func:`kd_loss`)."""
        kd = kd_loss(logits, teacher_logits, self.kd_temperature)
        return self.task_weight * task_loss + self.kd_weight * kd, kd

    def state_dict(self) -> dict[str, Any]:
        """The masks (tensors) and the teacher checkpoint path."""
        return {"head_masks": self.head_masks, "neuron_masks": self.neuron_masks, "teacher_ckpt": self.teacher_ckpt}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the masks saved by :meth:`state_dict`."""
        self.head_masks = state_dict.get("head_masks")
        self.neuron_masks = state_dict.get("neuron_masks")
        self.teacher_ckpt = state_dict.get("teacher_ckpt") or self.teacher_ckpt


def collated(datamodule, dataset, indices: Sequence[int], batch_size: int) -> list[dict]:
    """``dataset[indices]`` in order, cut into batches of ``batch_size`` and collated by the text
    data module (dicts of (B, N) padded tensors and (B,) ``labels``)."""
    return [datamodule._collate([dataset[i] for i in indices[s : s + batch_size]]) for s in range(0, len(indices), batch_size)]


def proxy_score(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    """Proxy quality of a candidate from its held-out logits.

    Args:
        logits: (B, C) float.
        labels: (B,) int class indices.
        metric: ``accuracy`` (fraction correct) or ``auroc`` (ROC AUC of the class-1
            probability for C = 2, macro one-vs-rest AUC otherwise; torchmetrics).

    Returns:
        the score in [0, 1].

    Raises:
        ValueError: an unknown metric.
    """
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    if metric == "accuracy":
        return float((logits.argmax(dim=-1) == labels).float().mean())
    if metric == "auroc":
        probs = logits.float().softmax(dim=-1)
        if probs.shape[1] == 2:
            return float(binary_auroc(probs[:, 1], labels))
        return float(multiclass_auroc(probs, labels, num_classes=probs.shape[1]))
    raise ValueError(f"proxy metric {metric!r} is not supported; choose one of {list(PROXY_METRICS)}.")


def unit_action_features(
    space: SearchSpace,
    predict_ms: Callable[[list[int], list[int]], float],
    importance: UnitImportance,
    budget_ms: float,
) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """Problem-specific features of every mutation action, for the reinforced mutator (arXiv 2209.00625 Sec. 3).

    For genes ``g`` and action ``a`` (:meth:`SearchSpace.apply` of ``[a]``), row ``a`` is

    * ``mass``: the Taylor importance mass the step adds (> 0) or removes (< 0): the sum of
      the importance of the units that enter or leave (a candidate keeps each layer's most
      important units, :func:`modules.structured.top_unit_masks`) divided by the total
      importance of that kind (heads or neurons) in the whole model;
    * ``mass / max(|latency change| / budget_ms, 1e-3)``, clipped to [-10, 10]: importance
      gained per budget fraction of latency added (up) or lost per fraction saved (down, < 0),
      the latency change by ``predict_ms`` (the lookup table).

    Clamped (no-op) steps get zeros. Pass the result as ``action_feature_fn`` of
    :class:`~pruners.evolution.ReinforcedMutator` (which adds the generic features, the latency
    change among them).

    Args:
        space: the search space (kept counts per choice index).
        predict_ms: ``(heads_kept, neurons_kept) -> ms``, e.g. :meth:`LatencyTable.predict_ms`.
        importance: heads (L, A) and neurons (L, I), non-negative (negative values count as 0).
        budget_ms: the latency budget, ms (> 0).

    Returns:
        ``genes -> (4L, 2)`` float32 tensor.

    Raises:
        ValueError: ``budget_ms <= 0``, importance shapes that do not match the space's layers
            or choices, or an all-zero importance of a kind.
    """
    if not budget_ms > 0:
        raise ValueError(f"budget_ms={budget_ms} must be > 0.")
    cumulative = []  # per kind: (L, units + 1) kept mass of the top-k units / total of the kind
    for name, scores, choices in (("heads", importance.heads, space.head_choices), ("neurons", importance.neurons, space.neuron_choices)):
        scores = torch.as_tensor(scores, dtype=torch.float64).clamp_min(0)
        if scores.dim() != 2 or scores.shape[0] != space.num_layers or scores.shape[1] < choices[-1]:
            raise ValueError(
                f"importance.{name} has shape {tuple(scores.shape)}; expected ({space.num_layers}, >= {choices[-1]})."
            )
        total = float(scores.sum())
        if total <= 0:
            raise ValueError(f"importance.{name} is all zero; the importance features would be undefined.")
        top = scores.sort(dim=1, descending=True).values.cumsum(dim=1)
        cumulative.append(torch.cat([torch.zeros(space.num_layers, 1, dtype=torch.float64), top], dim=1) / total)
    L = space.num_layers

    def features(genes: tuple[int, ...]) -> torch.Tensor:
        heads, neurons = space.decode(genes)
        base = predict_ms(heads, neurons)
        rows = []
        for a in range(space.num_actions):
            child = space.apply(genes, [a])
            if child == tuple(genes):
                rows.append([0.0, 0.0])  # clamped step
                continue
            g, _ = space.action_gene(a)
            kind, layer = int(g >= L), g % L
            choices = space.neuron_choices if kind else space.head_choices
            before, after = choices[genes[g]], choices[child[g]]
            ch, cn = space.decode(child)
            mass = cumulative[kind][layer]
            dlat = (predict_ms(ch, cn) - base) / budget_ms
            dmass = float(mass[after] - mass[before])
            rows.append([dmass, max(min(dmass / max(abs(dlat), 1e-3), 10.0), -10.0)])
        return torch.tensor(rows, dtype=torch.float32)

    return features


#: prior weight against the log excess over the budget after a step (-50 x 0.02 = -1 for 2% over)
EXCESS_WEIGHT = 50.0


def policy_prior() -> list[float]:
    """Initial weights of the reinforced mutator's linear scorer over its 12 action features.

    The 10 generic features of :func:`pruners.evolution.action_features` then the 2 of
    :func:`unit_action_features`: +2 for "the step ends within the budget",
    ``-EXCESS_WEIGHT`` (-50) for the log excess over the budget after the step, +1 for the
    importance mass per budget fraction of latency, all others 0. Read as a rule: over the
    budget, prefer the steps that cut the excess most; within it, those that stay within;
    among those, the steps that add the most importance per millisecond added or lose the
    least per millisecond saved. REINFORCE then adapts all weights from the rewards. Multiplied by ``pruner.policy_prior`` (0: a uniform
    start, i.e. the random mutator's first proposals).
    """
    weights = [0.0] * (GENERIC_ACTION_FEATURES + 2)
    weights[GENERIC_ACTION_FEATURE_NAMES.index("within_budget_after")] = 2.0
    weights[GENERIC_ACTION_FEATURE_NAMES.index("excess_after")] = -EXCESS_WEIGHT  # log excess over the budget
    weights[GENERIC_ACTION_FEATURES + 1] = 1.0  # importance per latency
    return weights


class SwiftPruner(MaskedDistillation):
    """SwiftPruner (arXiv 2209.00625) as a Lightning callback: search, then fine-tune the chosen model.

    At ``on_fit_start`` (unless restored from a checkpoint) it runs :meth:`run_search` on
    the module's dense fine-tuned model, sets the chosen candidate's masks, and the fit
    then fine-tunes it with task loss + distillation (:class:`MaskedDistillation`).
    :meth:`uniform_pruner` gives the same fine-tuning for the uniform baseline.

    Args:
        latency_budget_ms: latency budget in ms per batch of ``latency_batch_size`` x
            ``latency_seq_len`` tokens on this machine; None uses ``budget_fraction``.
        budget_fraction: budget as a fraction of the dense model's directly measured
            latency at that shape, in (0, 1]; used when ``latency_budget_ms`` is None.
        latency_margin: fraction of the budget, in [0, 1), held back against timing noise:
            the evolution, the feasibility of candidates, the re-measurement and the uniform
            baseline all use the search budget ``budget x (1 - latency_margin)``. The pick
            is the best of many candidates each timed on a noisy machine, so it tends to be
            one whose timings came out low (a winner's curse); in the benchmark without a
            margin (9 seeds, budget 0.5 of dense), 4 of 9 searched picks re-timed
            independently at 0.502-0.510 of dense; with 0.03 (seeds 0-2) all 3 re-timed
            within (0.470-0.486), while 2 of 3 uniform picks re-timed at 0.511-0.518 on a
            noisy machine. Default 0.03.
        head_choices: kept-head counts a layer may take; None = 0, 2, 4, ..., A.
        ffn_fractions: kept fractions of the FFN neurons a layer may take (rounded to
            whole neurons), each in [0, 1].
        latency_batch_size, latency_seq_len: the shape the budget refers to.
        latency_warmup, latency_repeats: untimed / timed calls per latency measurement.
        lut_layers: ``shared`` (measure one layer, all layers have the same shapes) or
            ``each``.
        mutator: ``reinforced`` (policy trained with REINFORCE) or ``random``.
        mutations: actions (layer, heads/FFN, up/down) per child.
        policy_lr, policy_hidden, entropy_weight, policy_steps: the reinforced mutator's
            Adam learning rate, hidden width of its MLP branch (0: a linear scorer), entropy
            bonus and Adam steps per generation.
        policy_prior: scale (>= 0) of the reinforced mutator's initial scorer,
            :func:`policy_prior` (0: start uniform, as the random mutator).
        population_size, parents, generations: the evolution's sizes.
        reward_alpha, reward_beta: exponent w of the reward within / over budget
            (alpha <= 0, beta < 0).
        proxy_metric: ``auroc`` (default; threshold-free: it ignores the shift of the
            decision threshold that pruning causes and the fine-tuning quickly undoes) or
            ``accuracy``.
        proxy_examples: held-out validation examples scoring each candidate.
        importance_examples: examples for the Taylor importance (a seeded subset of
            ``importance_split``; with ``validation`` they are disjoint from the proxy's and at
            most half the split).
        importance_split: ``train`` (default) or ``validation``: where the importance examples
            come from. Why train and 2,048: on the benchmark's teacher, the importance from
            disjoint sets of 256 validation sentences (the old default) agreed on only 64-89% of
            the kept heads and 58-73% of the kept neurons of the uniform configurations at 50%
            latency (4x768 to 10x192); from sets of 2,048 training sentences on 86-94% and
            84-89%, for about 17 s per estimate on 2 cores
            (``benchmarks/swiftpruner_importance_stability.py``).
        proxy_batch_size: batch size of proxy scoring and importance.
        proxy_recovery_steps: training steps (AdamW at ``model_lr``, train batches) on a shrunk
            copy before scoring, with the fine-tuning's loss (task + distillation from the
            dense model's logits); 0 = none. About 0.5 s per step for the 6-layer BERT on 2 cores.
        rerank_top_k: after the search, the ``rerank_top_k`` best searched candidates (by
            proxy) that stay within the search budget when re-timed and, alike, the
            ``rerank_top_k`` best such uniform ones are scored again with
            ``rerank_recovery_steps`` recovery steps, and the pick of each is the best by that
            score (:meth:`_pick`). 0 = off. Why: the proxy without recovery
            barely ranks configurations by their accuracy after fine-tuning
            (``benchmarks/swiftpruner_proxy_study.py`` on 24 benchmark picks: Spearman 0.27 for
            AUROC; 0.13-0.47 after 100 recovery steps, depending on the score), and recovery
            for every candidate costs too much (about 50 s per candidate at 100 steps).
        rerank_recovery_steps: recovery steps (as ``proxy_recovery_steps``) of the re-scoring.
        mask_tuning: ``none`` or ``lsq``. With ``lsq`` each candidate's shrunk copy gets
            least-squares mask tuning before it is scored (and before any recovery steps):
            the kept heads' and neurons' outputs are rescaled, layer by layer, to reproduce
            the dense model's sublayer outputs on ``mask_tuning_examples`` training
            sentences (Kwon et al. 2022, arXiv 2204.09656 section 4.3;
            :func:`pruners.mask_tuning.tune_unit_scales`). Deterministic; candidates took
            about 2 s each, scoring included, in the benchmark on 2 cores. Only the proxy
            sees the scales: the fine-tuning starts from the plain masks. Why: on the 24
            benchmark picks the proxy's rank correlation with test accuracy after
            fine-tuning rose from 0.27 to 0.44 (AUROC; ``benchmarks/swiftpruner_proxy_study.py``).
            Default ``none``: the benchmark with it (seeds 0-2) picked no better models (searched 0.8119, uniform
            0.8091 test accuracy, against 0.8156 and 0.8122 in the re-ranking benchmark on
            the same seeds).
        mask_tuning_examples: training sentences of the mask tuning's calibration set.
        mask_tuning_damping: its ridge weight towards scale 1, a fraction of the Gram
            matrix's mean diagonal (> 0).
        calibration_models: random configurations whose shrunk models are measured
            directly before the search to refit the lookup table's scale and fixed part
            by least squares (:meth:`LatencyTable.refit`); 0 keeps the two-anchor fit.
        latency_reference: ``none`` or ``dense``. With ``dense`` every direct timing of a
            candidate comes right after a timing of the dense model and is reported as
            ``candidate ms / dense ms now * dense ms at the start of the search``: the
            candidate's latency at the machine speed of the search's start. On a machine
            whose speed drifts (this one's batch-1 timings drift by +-30% over minutes) the
            ratio to a model timed moments apart is much steadier than the absolute time.
            It doubles the timing cost. Default ``dense``: in the benchmark (9 seeds, budget 0.5
            of dense) the searched picks then re-timed independently (15 rounds) at 0.47-0.51
            of dense, where absolute timings against one budget in ms had let picks through at
            0.30-0.65.
        verify_rounds: the chosen and the uniform candidate are re-measured this many times
            (each a median over ``latency_repeats`` forwards) before they are accepted; the
            median of the rounds must be within the search budget, else the next candidate by proxy
            quality is tried. Picking the best of many candidates each timed once favours
            those whose timing happened to come out low (on this machine one model's
            batch-1 timings vary by +-30% over minutes), so the pick is checked by timings
            independent of it. 0 accepts the single search-time timing.
        latency_table: path of a ``latency_table.json`` written by an earlier run on this
            machine (same choices and shape) to reuse instead of measuring; None
            measures. Two searches with one table rank candidates by the same predictions
            (e.g. the mutator comparison of the benchmark).
        search_seed: seed of the subsets, the evolution and the policy.
        search_only: the pipeline stops after the search (no fine-tuning).
        Other arguments: see :class:`MaskedDistillation`.

    Raises:
        PrunerConfigError: a setting out of range (at construction), or a budget below
            the smallest achievable latency (at search time; the message gives it).
    """

    name = "swiftpruner"

    def __init__(
        self,
        latency_budget_ms: float | None = None,
        budget_fraction: float = 0.5,
        latency_margin: float = 0.03,
        head_choices: Sequence[int] | None = None,
        ffn_fractions: Sequence[float] = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
        latency_batch_size: int = 1,
        latency_seq_len: int = 64,
        latency_warmup: int = 5,
        latency_repeats: int = 20,
        lut_layers: str = "shared",
        mutator: str = "reinforced",
        mutations: int = 2,
        policy_lr: float = 0.01,
        policy_hidden: int = 0,
        entropy_weight: float = 0.05,
        policy_steps: int = 1,
        policy_prior: float = 1.0,
        population_size: int = 16,
        parents: int = 4,
        generations: int = 10,
        reward_alpha: float = 0.0,
        reward_beta: float = -1.0,
        proxy_metric: str = "auroc",
        proxy_examples: int = 512,
        importance_examples: int = 2048,
        importance_split: str = "train",
        proxy_batch_size: int = 64,
        proxy_recovery_steps: int = 0,
        rerank_top_k: int = 0,
        rerank_recovery_steps: int = 100,
        mask_tuning: str = "none",
        mask_tuning_examples: int = 256,
        mask_tuning_damping: float = 0.01,
        calibration_models: int = 16,
        verify_rounds: int = 5,
        latency_reference: str = "dense",
        latency_table: str | None = None,
        search_seed: int = 0,
        search_only: bool = False,
        teacher_ckpt: str | None = None,
        teacher_epochs: int = 1,
        finetune_epochs: int = 1,
        kd_weight: float = 1.0,
        task_weight: float = 1.0,
        kd_temperature: float = 2.0,
        model_lr: float | None = None,
        name: str = "swiftpruner",
    ):
        super().__init__(
            teacher_ckpt=teacher_ckpt,
            teacher_epochs=teacher_epochs,
            finetune_epochs=finetune_epochs,
            kd_weight=kd_weight,
            task_weight=task_weight,
            kd_temperature=kd_temperature,
            model_lr=model_lr,
            name=name,
        )
        self.latency_budget_ms = (
            None
            if latency_budget_ms is None
            else check_range("pruner.latency_budget_ms", latency_budget_ms, 0.0, math.inf, low_open=True)
        )
        self.budget_fraction = check_range("pruner.budget_fraction", budget_fraction, 0.0, 1.0, low_open=True, high_open=False)
        self.latency_margin = check_range("pruner.latency_margin", latency_margin, 0.0, 1.0)
        if head_choices is not None:
            head_choices = [check_positive_int("pruner.head_choices[...]", int(h), minimum=0) for h in head_choices]
            if not head_choices:
                raise PrunerConfigError("pruner.head_choices is empty; give kept-head counts, e.g. [0, 4, 8, 12].")
        self.head_choices = None if head_choices is None else sorted(set(head_choices))
        fractions = [check_range("pruner.ffn_fractions[...]", f, 0.0, 1.0, high_open=False) for f in ffn_fractions]
        if not fractions:
            raise PrunerConfigError("pruner.ffn_fractions is empty; give kept fractions, e.g. [0, 0.25, 0.5, 1].")
        self.ffn_fractions = sorted(set(fractions))
        self.latency_batch_size = check_positive_int("pruner.latency_batch_size", latency_batch_size)
        self.latency_seq_len = check_positive_int("pruner.latency_seq_len", latency_seq_len)
        self.latency_warmup = check_positive_int("pruner.latency_warmup", latency_warmup, minimum=0)
        self.latency_repeats = check_positive_int("pruner.latency_repeats", latency_repeats)
        self.lut_layers = check_choice("pruner.lut_layers", lut_layers, ("shared", "each"))
        self.mutator = check_choice("pruner.mutator", mutator, MUTATORS)
        self.mutations = check_positive_int("pruner.mutations", mutations)
        self.policy_lr = check_range("pruner.policy_lr", policy_lr, 0.0, math.inf, low_open=True)
        self.policy_hidden = check_positive_int("pruner.policy_hidden", policy_hidden, minimum=0)
        self.policy_steps = check_positive_int("pruner.policy_steps", policy_steps)
        self.policy_prior = check_range("pruner.policy_prior", policy_prior, 0.0, math.inf)
        self.entropy_weight = check_range("pruner.entropy_weight", entropy_weight, 0.0, math.inf)
        self.population_size = check_positive_int("pruner.population_size", population_size, minimum=2)
        self.parents = check_positive_int("pruner.parents", parents)
        if self.parents >= self.population_size:
            raise PrunerConfigError(
                f"pruner.parents={parents} must be smaller than pruner.population_size={population_size}."
            )
        self.generations = check_positive_int("pruner.generations", generations, minimum=0)
        self.reward_alpha = check_range("pruner.reward_alpha", reward_alpha, -math.inf, 0.0, high_open=False)
        self.reward_beta = check_range("pruner.reward_beta", reward_beta, -math.inf, 0.0)
        self.proxy_metric = check_choice("pruner.proxy_metric", proxy_metric, PROXY_METRICS)
        self.proxy_examples = check_positive_int("pruner.proxy_examples", proxy_examples)
        self.importance_examples = check_positive_int("pruner.importance_examples", importance_examples)
        self.importance_split = check_choice("pruner.importance_split", importance_split, ("train", "validation"))
        self.proxy_batch_size = check_positive_int("pruner.proxy_batch_size", proxy_batch_size)
        self.proxy_recovery_steps = check_positive_int("pruner.proxy_recovery_steps", proxy_recovery_steps, minimum=0)
        self.rerank_top_k = check_positive_int("pruner.rerank_top_k", rerank_top_k, minimum=0)
        self.rerank_recovery_steps = check_positive_int("pruner.rerank_recovery_steps", rerank_recovery_steps)
        self.mask_tuning = check_choice("pruner.mask_tuning", mask_tuning, ("none", "lsq"))
        self.mask_tuning_examples = check_positive_int("pruner.mask_tuning_examples", mask_tuning_examples)
        self.mask_tuning_damping = check_range("pruner.mask_tuning_damping", mask_tuning_damping, 0.0, math.inf, low_open=True)
        self.calibration_models = check_positive_int("pruner.calibration_models", calibration_models, minimum=0)
        self.verify_rounds = check_positive_int("pruner.verify_rounds", verify_rounds, minimum=0)
        self.latency_reference = check_choice("pruner.latency_reference", latency_reference, ("none", "dense"))
        #: (dense model, its ms at the search's start) while a search with latency_reference=dense runs
        self._timing_reference: tuple[Any, float] | None = None
        self.latency_table = None if latency_table is None else str(latency_table)
        self.search_seed = int(search_seed)
        self.search_only = bool(search_only)
        #: everything the search found (None until it ran); saved in checkpoints
        self.result: dict[str, Any] | None = None
        self.search: EvolutionarySearch | None = None
        #: the evolution's state restored from a checkpoint (kept so that a later save keeps it)
        self._search_state: dict[str, Any] | None = None

    # ------------------------------------------------------------ the search
    def _space(self, model) -> SearchSpace:
        heads, neurons = model.layer_structure()[0]
        head_choices = self.head_choices if self.head_choices is not None else list(range(0, heads + 1, 2))
        if head_choices[-1] > heads:
            raise PrunerConfigError(f"pruner.head_choices={head_choices}: a layer has only {heads} heads.")
        neuron_choices = sorted({round(f * neurons) for f in self.ffn_fractions})
        return SearchSpace(len(model.layer_structure()), tuple(head_choices), tuple(neuron_choices))

    def _subsets(self, datamodule) -> tuple[list[dict], list[dict], list[dict]]:
        """(importance batches, proxy batches, recovery batches) from seeded subsets.

        The proxy batches come from the validation split; the importance batches from
        ``importance_split`` (disjoint from the proxy's when that is the validation split too);
        the recovery batches from the train split, as many as the larger of
        ``proxy_recovery_steps`` and, with re-ranking on, ``rerank_recovery_steps``; each use
        takes a prefix of them.

        Raises:
            ValueError: the validation split has fewer than 2 examples, or the train split is
                empty while the importance needs it.
        """
        val = datamodule.datasets["validation"]
        if len(val) < 2:
            raise ValueError("SwiftPruner needs at least 2 validation examples for importance and the proxy.")
        g = torch.Generator().manual_seed(self.search_seed)
        order = torch.randperm(len(val), generator=g).tolist()
        if self.importance_split == "validation":
            n_imp = min(self.importance_examples, len(val) // 2)
            imp_split, imp, order = val, order[:n_imp], order[n_imp:]
        else:
            imp_split = datamodule.datasets["train"]
            if len(imp_split) == 0:
                raise ValueError("pruner.importance_split=train, but the train split is empty; use importance_split=validation.")
            # Own generator: the other subsets do not depend on the importance's size.
            g_imp = torch.Generator().manual_seed(self.search_seed + 104729)
            imp = torch.randperm(len(imp_split), generator=g_imp)[: self.importance_examples].tolist()
        proxy = order[: self.proxy_examples]
        # Length-sorted batches: little padding.
        proxy.sort(key=lambda i: len(val[i]["input_ids"]))
        imp.sort(key=lambda i: len(imp_split[i]["input_ids"]))

        recovery: list[dict] = []
        steps = max(self.proxy_recovery_steps, self.rerank_recovery_steps if self.rerank_top_k else 0)
        if steps:
            train = datamodule.datasets["train"]
            pick = torch.randperm(len(train), generator=g)[: steps * datamodule.batch_size].tolist()
            recovery = collated(datamodule, train, pick, datamodule.batch_size)
        bs = self.proxy_batch_size
        return collated(datamodule, imp_split, imp, bs), collated(datamodule, val, proxy, bs), recovery

    def _calibration(self, datamodule) -> list[dict]:
        """The mask tuning's calibration batches: ``mask_tuning_examples`` seeded training sentences,
        length-sorted (little padding); empty with ``mask_tuning=none``."""
        if self.mask_tuning == "none":
            return []
        train = datamodule.datasets["train"]
        # Own generator: turning mask tuning on leaves the other subsets as they were.
        g = torch.Generator().manual_seed(self.search_seed + 7919)
        idx = torch.randperm(len(train), generator=g)[: self.mask_tuning_examples].tolist()
        idx.sort(key=lambda i: len(train[i]["input_ids"]))
        return collated(datamodule, train, idx, self.proxy_batch_size)

    def _quality_fn(self, model, importance: UnitImportance, proxy: list[dict], recovery: list[dict],
                    calibration: Sequence[dict] = ()) -> Callable:
        """genes -> proxy quality of the candidate (the masks applied to a copy of the dense model),
        after mask tuning on ``calibration`` when it is given, then ``recovery`` steps."""
        work = copy.deepcopy(model).eval()
        labels = torch.cat([b["labels"] for b in proxy])
        targets = dense_targets(work, calibration) if calibration else None  # before any mask is set
        # Recovery uses the final fine-tuning's loss (task + distillation from the dense model), so the
        # proxy scores what fine-tuning can recover; the dense logits are computed once, by the
        # still-unmasked eval copy.
        with torch.inference_mode():
            dense_logits = [work(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).logits for b in recovery]

        def quality(space: SearchSpace, genes: tuple[int, ...]) -> float:
            heads, neurons = space.decode(genes)
            hm, nm = top_unit_masks(importance, heads, neurons)
            work.set_structured_masks(hm, nm)
            small = shrink_structured(work)
            if targets is not None:
                tune_unit_scales(small, targets, calibration, self.mask_tuning_damping)
            if recovery:
                self.recover(small, recovery, dense_logits)
            with torch.inference_mode():
                logits = torch.cat([small(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).logits for b in proxy])
            return proxy_score(logits, labels, self.proxy_metric)

        return quality

    def recover(self, model: nn.Module, batches: list[dict], teacher_logits: list[torch.Tensor]) -> None:
        """A few recovery steps of a masked or shrunk model, in place: one AdamW step per batch.

        The loss is the final fine-tuning's (task cross-entropy + distillation, :meth:`distillation_loss`)
        at ``model_lr`` (5e-5 if unset); the model is left in eval mode.

        Args:
            model: a :class:`~modules.bert.PrunableBertForSequenceClassification`.
            batches: training batches (``input_ids``, ``attention_mask``, ``labels``; (B, N)).
            teacher_logits: the dense teacher's (B, C) logits on each batch, in order.
        """
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=self.model_lr or 5e-5)
        for b, teacher in zip(batches, teacher_logits):
            logits = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).logits
            loss, _ = self.distillation_loss(F.cross_entropy(logits, b["labels"]), logits, teacher)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()

    def _load_table(self, space: SearchSpace) -> LatencyTable:
        """The lookup table saved by an earlier run (``pruner.latency_table``), checked against this search.

        Raises:
            FileNotFoundError: the file does not exist.
            PrunerConfigError: the file is not a table, or its choices or shape differ from this search's.
        """
        path = Path(self.latency_table)
        if not path.is_file():
            raise FileNotFoundError(
                f"pruner.latency_table={path} does not exist; give the latency_table.json of an earlier SwiftPruner "
                "run, or null to measure the table."
            )
        try:
            table = LatencyTable.from_state_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as err:
            raise PrunerConfigError(f"pruner.latency_table={path} is not a latency table: {err}") from None
        expected = (list(space.head_choices), list(space.neuron_choices), space.num_layers, self.latency_batch_size, self.latency_seq_len)
        found = (table.head_choices, table.neuron_choices, table.num_layers, table.batch_size, table.seq_len)
        if found != expected:
            raise PrunerConfigError(
                f"pruner.latency_table={path} holds (head choices, FFN choices, layers, batch size, seq len) {found}, "
                f"but this search needs {expected}; measure a new table (pruner.latency_table=null)."
            )
        log.info("SwiftPruner: latency table loaded from %s", path)
        return table

    def _refit_table(self, table: LatencyTable, work, importance: UnitImportance, space: SearchSpace) -> LatencyTable:
        """The table refitted (:meth:`LatencyTable.refit`) to ``calibration_models`` random whole models measured directly.

        The configurations are drawn uniformly from the search space with a generator
        seeded by ``search_seed + 1`` (the evolution's own random stream is untouched).
        """
        if not self.calibration_models:
            return table
        g = torch.Generator().manual_seed(self.search_seed + 1)
        sizes = [len(space.head_choices)] * space.num_layers + [len(space.neuron_choices)] * space.num_layers
        samples = []
        for _ in range(self.calibration_models):
            genes = tuple(int(torch.randint(n, (1,), generator=g)) for n in sizes)
            heads, neurons = space.decode(genes)
            samples.append((heads, neurons, self._measure(work, importance, space, genes)))
        refit = table.refit(samples)
        log.info(
            "SwiftPruner: latency table refitted to %d measured models: scale %.3f -> %.3f, fixed %.3f -> %.3f ms",
            refit.calibration_points, table.scale, refit.scale, table.fixed_ms, refit.fixed_ms,
        )
        return refit

    def _pick(self, candidates: list[dict], work, importance: UnitImportance, space: SearchSpace, budget: float,
              rescore: Callable[[], Callable], kind: str) -> tuple[dict | None, list[dict], list[dict]]:
        """The pick among ``candidates``: re-timed within ``budget`` (ms), then best by re-ranked or plain proxy.

        Candidates (dicts with ``genes``, ``quality``, ``measured_ms``) are tried in order of
        proxy quality (ties: lower timing; one per configuration). Each is timed
        ``verify_rounds`` more times (:meth:`_measure`) and passes if the median
        (``verified_ms``, ms, stored in the dict with the rounds in ``verify_rounds_ms``) is
        within budget; with ``verify_rounds`` 0 every candidate passes as it is. Without
        re-ranking the first that passes is the pick. With ``rerank_top_k`` = k the first k
        that pass are scored again by ``rescore()`` (the proxy after ``rerank_recovery_steps``
        recovery steps, stored as ``rerank_quality``) and the pick is the best by that score.
        Re-timing comes first so that the recovery steps are spent only on candidates that can
        be picked.

        Returns:
            (the pick or None, the rejected candidates: genes, heads, FFN neurons, proxy,
            measured and verified ms; the re-scored ones: genes, heads, FFN neurons, proxy
            before and after recovery, measured and verified ms).
        """
        wanted = self.rerank_top_k or 1
        passed, rejected, seen = [], [], set()
        for cand in sorted(candidates, key=lambda r: (-r["quality"], r["measured_ms"])):
            genes = tuple(cand["genes"])
            if genes in seen:
                continue
            seen.add(genes)
            if self.verify_rounds:
                rounds = [self._measure(work, importance, space, cand["genes"]) for _ in range(self.verify_rounds)]
                cand["verify_rounds_ms"] = rounds
                cand["verified_ms"] = statistics.median(rounds)
                if cand["verified_ms"] > budget:
                    log.info(
                        "SwiftPruner: heads %s, FFN neurons %s timed %.3f ms in the search but %.3f ms re-measured (search "
                        "budget %.3f ms); trying the next candidate",
                        cand["heads"], cand["ffn_neurons"], cand["measured_ms"], cand["verified_ms"], budget,
                    )
                    rejected.append({k: cand[k] for k in ("genes", "heads", "ffn_neurons", "quality", "measured_ms", "verified_ms")})
                    continue
            passed.append(cand)
            if len(passed) == wanted:
                break
        if not self.rerank_top_k or not passed:
            return (passed[0] if passed else None), rejected, []
        started = time.time()
        score = rescore()
        for cand in passed:
            cand["rerank_quality"] = score(space, tuple(cand["genes"]))
            log.info(
                "SwiftPruner re-rank (%s): heads %s, FFN neurons %s: proxy %s %.4f -> %.4f after %d recovery steps",
                kind, cand["heads"], cand["ffn_neurons"], self.proxy_metric, cand["quality"], cand["rerank_quality"],
                self.rerank_recovery_steps,
            )
        log.info("SwiftPruner: re-ranked %d %s candidates in %.0f s", len(passed), kind, time.time() - started)
        keys = ("genes", "heads", "ffn_neurons", "quality", "rerank_quality", "measured_ms", "verified_ms")
        rescored = [{k: c[k] for k in keys if k in c} for c in passed]
        return max(passed, key=lambda r: (r["rerank_quality"], r["quality"])), rejected, rescored

    def _measure(self, work, importance: UnitImportance, space: SearchSpace, genes) -> float:
        """Direct latency (ms) of the candidate's physically shrunk model at the budget's shape.

        ``work`` is a scratch copy of the dense model whose masks this call overwrites. With a
        timing reference (``latency_reference=dense``, set during :meth:`run_search`) the dense
        model is timed just before, and the result is ``candidate ms / dense ms now * dense ms
        at the search's start``.
        """
        heads, neurons = space.decode(genes)
        work.set_structured_masks(*top_unit_masks(importance, heads, neurons))
        if self._timing_reference is None:
            return self._time(shrink_structured(work))
        dense, dense_at_start = self._timing_reference
        dense_now = self._time(dense)
        return self._time(shrink_structured(work)) / dense_now * dense_at_start

    def _time(self, model) -> float:
        """:func:`measure_model_ms` of ``model`` at the budget's shape with the configured warmup and repeats (ms)."""
        return measure_model_ms(
            model, self.latency_batch_size, self.latency_seq_len, warmup=self.latency_warmup, repeats=self.latency_repeats
        )

    def _no_pick(self, message: str) -> None:
        """Nothing passed the budget: a RuntimeError, or (``search_only``, which still reports its history) a warning."""
        if not self.search_only:
            raise RuntimeError(message)
        log.warning("SwiftPruner: %s", message)

    def build_mutator(self, space: SearchSpace, table: LatencyTable | None = None, importance: UnitImportance | None = None, budget_ms: float | None = None):
        """The configured mutator (``pruner.mutator``) for ``space``.

        The reinforced mutator sees the lookup table's latency change of every action
        (``table``) and the Taylor importance mass it adds or removes (``importance``,
        :func:`unit_action_features`); its initial scorer is :func:`policy_prior` times
        ``pruner.policy_prior``. Without ``table``/``importance``/``budget_ms`` it sees only the
        generic features and starts uniform.
        """
        if self.mutator == "random":
            return RandomMutator(mutations=self.mutations)
        informed = table is not None and importance is not None and budget_ms is not None
        feature_fn = unit_action_features(space, table.predict_ms, importance, budget_ms) if informed else None
        predict = (lambda genes: table.predict_ms(*space.decode(genes))) if table is not None else None
        prior = [self.policy_prior * w for w in policy_prior()] if informed and self.policy_prior else None
        return ReinforcedMutator(
            space,
            hidden=self.policy_hidden,
            lr=self.policy_lr,
            entropy_weight=self.entropy_weight,
            mutations=self.mutations,
            seed=self.search_seed,
            steps=self.policy_steps,
            action_feature_fn=feature_fn,
            predict_ms=predict,
            initial_weights=prior,
        )

    def run_search(self, model, datamodule, quality_cache: dict | None = None) -> dict[str, Any]:
        """Importance, lookup table, evolution, direct measurement, choice of the searched and uniform models.

        Args:
            model: the dense fine-tuned :class:`~modules.bert.PrunableBertForSequenceClassification`
                (unmasked, full size); it is not modified (copies are masked).
            datamodule: a set-up text data module (its validation split gives the proxy
                subset, its train split the importance (by default) and recovery batches).
            quality_cache: genes tuple -> proxy quality, read and filled by this search; pass
                one dict to several searches of the same model, seed and settings (e.g. both
                mutators of the benchmark) so that no candidate is scored twice. None: a
                private cache.

        Returns:
            :attr:`result`: budget, dense latency, lookup table, every evaluated candidate
            (genes, heads/neurons per layer, proxy quality, predicted and measured ms,
            reward), the chosen and the uniform candidate, predictor error.

        Raises:
            PrunerConfigError: the budget is below the smallest achievable latency.
            RuntimeError: no evaluated candidate's measured latency is within budget, or none
                stays within it when re-measured (``verify_rounds``; with ``search_only`` the
                result has ``chosen`` None instead).
        """
        started = time.time()
        space = self._space(model)
        imp_batches, proxy_batches, recovery = self._subsets(datamodule)
        log.info("SwiftPruner: Taylor importance on %d %s examples", sum(len(b["labels"]) for b in imp_batches), self.importance_split)
        importance = taylor_importance(model, imp_batches)
        work = copy.deepcopy(model).eval()  # scratch copy: its masks are set per measured candidate
        dense_ms = self._time(model)
        self._timing_reference = (model, dense_ms) if self.latency_reference == "dense" else None
        if self.latency_table is not None:
            table = anchor_table = self._load_table(space)
        else:
            log.info("SwiftPruner: measuring the latency lookup table (%d head x %d FFN choices)", len(space.head_choices), len(space.neuron_choices))
            table = LatencyTable.measure(
                model,
                list(space.head_choices),
                list(space.neuron_choices),
                batch_size=self.latency_batch_size,
                seq_len=self.latency_seq_len,
                warmup=self.latency_warmup,
                repeats=self.latency_repeats,
                layers=self.lut_layers,
            )
            anchor_table = table
            table = self._refit_table(table, work, importance, space)
        requested = self.latency_budget_ms if self.latency_budget_ms is not None else self.budget_fraction * dense_ms
        # Everything below searches and picks under the budget less its safety margin.
        budget = requested * (1.0 - self.latency_margin)
        smallest = table.min_ms()
        if budget < smallest:
            raise PrunerConfigError(
                f"pruner.latency_budget_ms={requested:.3f} ms less its margin pruner.latency_margin={self.latency_margin} "
                f"({budget:.3f} ms) is below the smallest achievable latency, {smallest:.3f} ms "
                f"(every layer at {space.head_choices[0]} heads and {space.neuron_choices[0]} FFN neurons; batch "
                f"{self.latency_batch_size} x {self.latency_seq_len} tokens, measured on this machine; the dense model "
                f"takes {dense_ms:.3f} ms). Set pruner.latency_budget_ms (or pruner.budget_fraction) to at least "
                f"{smallest / (1.0 - self.latency_margin):.3f} ms, or lower pruner.latency_margin."
            )
        calibration = self._calibration(datamodule)
        quality = self._quality_fn(model, importance, proxy_batches, recovery[: self.proxy_recovery_steps], calibration)
        qcache: dict[tuple[int, ...], float] = {} if quality_cache is None else quality_cache

        def cached_quality(genes: tuple[int, ...]) -> float:
            if genes not in qcache:
                qcache[genes] = quality(space, genes)
            return qcache[genes]

        def objective(genes: tuple[int, ...]) -> tuple[float, float]:
            heads, neurons = space.decode(genes)
            return cached_quality(genes), table.predict_ms(heads, neurons)

        def progress(summary: dict) -> None:
            log.info(
                "SwiftPruner search (%s mutator) generation %d/%d: %d candidates evaluated, best reward %.4f, "
                "best proxy %s within budget %.4f",
                self.mutator,
                summary.get("generation", -1),
                self.generations,
                summary.get("evaluations", -1),
                summary.get("best_reward", float("nan")),
                self.proxy_metric,
                summary.get("best_feasible_quality") or float("nan"),
            )

        self.search = EvolutionarySearch(
            space,
            objective,
            budget,
            self.build_mutator(space, table, importance, budget),
            population_size=self.population_size,
            parents=self.parents,
            generations=self.generations,
            alpha=self.reward_alpha,
            beta=self.reward_beta,
            seed=self.search_seed,
            progress=progress,
        ).run()
        search_s = time.time() - started

        # Check the predictor: measure every evaluated candidate's shrunk model directly.
        records = []
        for rec in self.search.history:
            genes = tuple(rec["genes"])
            heads, neurons = space.decode(genes)
            records.append(
                {
                    **rec,
                    "heads": heads,
                    "ffn_neurons": neurons,
                    "predicted_ms": rec["latency_ms"],
                    "two_anchor_predicted_ms": anchor_table.predict_ms(heads, neurons),
                    "measured_ms": self._measure(work, importance, space, genes),
                }
            )
        errors = [abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in records]
        anchor_errors = [abs(r["two_anchor_predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in records]
        within = [r for r in records if r["measured_ms"] <= budget]
        if not within:
            self._no_pick(
                f"No evaluated candidate's measured latency is within the search budget {budget:.3f} ms ({requested:.3f} ms "
                f"less the margin pruner.latency_margin={self.latency_margin}; the smallest measured "
                f"was {min(r['measured_ms'] for r in records):.3f} ms). Raise pruner.latency_budget_ms or "
                "pruner.generations."
            )
        # The re-ranking's scorer (a copy of the dense model and its logits on the recovery batches): built
        # once, when the searched or the uniform pick first needs it.
        rescore = functools.cache(
            lambda: self._quality_fn(model, importance, proxy_batches, recovery[: self.rerank_recovery_steps], calibration)
        )

        chosen, rejected, reranked = self._pick(within, work, importance, space, budget, rescore, "searched")
        if within and chosen is None:
            self._no_pick(
                f"None of the {len(within)} candidates timed within the search budget {budget:.3f} ms stayed within it when "
                f"re-measured ({self.verify_rounds} rounds; the smallest median was "
                f"{min(r['verified_ms'] for r in rejected):.3f} ms). Raise pruner.latency_budget_ms or pruner.generations, "
                "or set pruner.verify_rounds=0 to accept single timings."
            )

        # The uniform baseline: every uniform configuration measured directly, the best within budget.
        uniform = []
        for genes in space.uniform_candidates():
            heads, neurons = space.decode(genes)
            ms = self._measure(work, importance, space, genes)
            entry = {"genes": list(genes), "heads": heads, "ffn_neurons": neurons, "measured_ms": ms}
            entry["predicted_ms"] = table.predict_ms(heads, neurons)
            if ms <= budget:
                entry["quality"] = cached_quality(tuple(genes))
            uniform.append(entry)
        best_uniform, rejected_uniform, reranked_uniform = self._pick(
            [u for u in uniform if "quality" in u], work, importance, space, budget, rescore, "uniform"
        )
        del work
        self._timing_reference = None  # timing is over; do not hold on to the dense model
        if best_uniform is None:
            log.warning("SwiftPruner: no uniform configuration is within the search budget %.3f ms; no baseline.", budget)

        self.result = {
            "budget_ms": requested,
            "budget_source": "latency_budget_ms" if self.latency_budget_ms is not None else f"{self.budget_fraction} x dense",
            "latency_margin": self.latency_margin,
            "search_budget_ms": budget,
            "latency_reference": self.latency_reference,
            "dense_ms": dense_ms,
            "min_predicted_ms": smallest,
            "latency_shape": {"batch_size": self.latency_batch_size, "seq_len": self.latency_seq_len},
            "head_choices": list(space.head_choices),
            "neuron_choices": list(space.neuron_choices),
            "mutator": self.mutator,
            "generations": self.generations,
            "evaluations": self.search.evaluations,
            "proxy": {"metric": self.proxy_metric, "examples": sum(len(b["labels"]) for b in proxy_batches),
                      "recovery_steps": self.proxy_recovery_steps},
            "importance": {"heads": importance.heads, "neurons": importance.neurons},
            "lut": table.state_dict(),
            "candidates": records,
            "predictor_error": {
                "mean_abs_pct": 100.0 * sum(errors) / len(errors),
                "max_abs_pct": 100.0 * max(errors),
                "candidates": len(errors),
                "calibration_models": self.calibration_models,
                "two_anchor_fit_mean_abs_pct": 100.0 * sum(anchor_errors) / len(anchor_errors),
            },
            "best_reward_curve": self.search.best_reward_curve(),
            "verification": {"rounds": self.verify_rounds, "rejected": rejected, "rejected_uniform": rejected_uniform},
            "rerank": {"top_k": self.rerank_top_k, "recovery_steps": self.rerank_recovery_steps if self.rerank_top_k else 0,
                       "searched": reranked, "uniform": reranked_uniform},
            "chosen": chosen,
            "uniform_candidates": uniform,
            "uniform": best_uniform,
            "search_seconds": search_s,
            "total_seconds": time.time() - started,
        }
        if chosen is None:
            return self.result
        self.head_masks, self.neuron_masks = self.masks_of(chosen["genes"])
        log.info(
            "SwiftPruner: chose heads %s, FFN neurons %s: predicted %.3f ms, measured %.3f ms, re-measured %s ms (search budget %.3f ms, "
            "dense %.3f ms), proxy %s %.4f; predictor error mean %.1f%%",
            chosen["heads"], chosen["ffn_neurons"], chosen["predicted_ms"], chosen["measured_ms"],
            f"{chosen['verified_ms']:.3f}" if "verified_ms" in chosen else "not", budget, dense_ms,
            self.proxy_metric, chosen["quality"], self.result["predictor_error"]["mean_abs_pct"],
        )
        return self.result

    def masks_of(self, genes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, A) head and (L, I) neuron masks of a candidate's genes (after :meth:`run_search`)."""
        if self.result is None:
            raise RuntimeError("SwiftPruner.masks_of needs the search's importance; run the search first.")
        space = SearchSpace(
            len(self.result["importance"]["heads"]), tuple(self.result["head_choices"]), tuple(self.result["neuron_choices"])
        )
        heads, neurons = space.decode(tuple(genes))
        imp = UnitImportance(self.result["importance"]["heads"], self.result["importance"]["neurons"])
        return top_unit_masks(imp, heads, neurons)

    def uniform_pruner(self) -> MaskedDistillation | None:
        """The uniform baseline's fine-tuning: same teacher and loss, the best uniform masks (None if none)."""
        if self.result is None or self.result["uniform"] is None:
            return None
        return self.masked_finetuner(*self.masks_of(self.result["uniform"]["genes"]), name="uniform")

    def masked_finetuner(self, head_masks: torch.Tensor, neuron_masks: torch.Tensor, name: str) -> MaskedDistillation:
        """A :class:`MaskedDistillation` with these masks and this pruner's fine-tuning settings
        (teacher checkpoint, epochs, loss weights, temperature, learning rate); it shares this
        pruner's teacher when one is loaded.

        Args:
            head_masks: (L, A) float 0/1; neuron_masks: (L, I) float 0/1.
            name: the fine-tuning's metric and state name.
        """
        finetuner = MaskedDistillation(
            head_masks,
            neuron_masks,
            teacher_ckpt=self.teacher_ckpt,
            teacher_epochs=self.teacher_epochs,
            finetune_epochs=self.finetune_epochs,
            kd_weight=self.kd_weight,
            task_weight=self.task_weight,
            kd_temperature=self.kd_temperature,
            model_lr=self.model_lr,
            name=name,
        )
        finetuner.teacher = self.teacher
        return finetuner

    # ------------------------------------------------------- Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Search (unless restored from a checkpoint), log the history table, apply the chosen masks."""
        if self.result is None:
            datamodule = trainer.datamodule
            if datamodule is None or not getattr(datamodule, "datasets", None):
                raise RuntimeError("SwiftPruner searches on the fit's datamodule; call trainer.fit(module, datamodule=...).")
            self.run_search(pl_module.model, datamodule)
            self.log_history_table(trainer)
        self.apply_masks(pl_module)

    def history_table(self) -> tuple[list[str], list[list[Any]]]:
        """(columns, rows) of every evaluated candidate, for a W&B table."""
        columns = ["evaluation", "generation", "heads", "ffn_neurons", "quality", "predicted_ms", "measured_ms", "reward", "feasible"]
        rows = [
            [r["evaluation"], r["generation"], str(r["heads"]), str(r["ffn_neurons"]), r["quality"], r["predicted_ms"],
             r["measured_ms"], r["reward"], r["measured_ms"] <= self.result.get("search_budget_ms", self.result["budget_ms"])]
            for r in (self.result or {}).get("candidates", [])
        ]
        return columns, rows

    def log_history_table(self, trainer: L.Trainer) -> None:
        """Log the search history as a W&B table ``search/history`` (when a W&B logger is attached)."""
        from lightning.pytorch.loggers import WandbLogger

        columns, rows = self.history_table()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="search/history", columns=columns, data=rows)

    # ----------------------------------------------------------------- state
    def summary(self) -> dict[str, Any]:
        """The search's figures for results.json (no importance tensors, no raw table)."""
        if self.result is None:
            return {}
        keep = {k: v for k, v in self.result.items() if k not in ("importance", "lut", "candidates", "uniform_candidates")}
        keep["lut"] = {k: v for k, v in self.result["lut"].items() if k in ("attention_ms", "ffn_ms", "fixed_ms", "head_choices", "neuron_choices")}
        return keep

    def state_dict(self) -> dict[str, Any]:
        """Masks, the search result and the evolution's state (population, policy, history, generator)."""
        state = super().state_dict()
        state["result"] = self.result
        state["search"] = self.search.state_dict() if self.search is not None else self._search_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; a restored pruner does not search again."""
        super().load_state_dict(state_dict)
        self.result = state_dict.get("result")
        self._search_state = state_dict.get("search")
