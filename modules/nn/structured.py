"""Structured pruning units of the prunable BERT: attention heads and FFN neurons.

Groundwork for SwiftPruner (arXiv 2209.00625), whose layer-wise sparsity must
really lower CPU latency, so the units are whole heads and whole FFN neurons:

* training uses the masks of :class:`modules.nn.bert.PrunableBertForSequenceClassification`
  (``set_structured_masks``), which keep every parameter shape, so the optimizer
  stays valid (style notes, pitfall 6);
* :func:`shrink_structured` returns a physically smaller deep copy for export and
  latency measurement (its ``macs()`` and its latency drop, the masked model's do not);
* :func:`taylor_importance` scores every head and neuron by first-order Taylor
  expansion of the loss (Molchanov et al. 2019, arXiv 1906.10771; Michel et al. 2019,
  arXiv 1905.10650 for heads);
* :func:`top_unit_masks` turns scores and per-layer kept counts into masks.

Shapes: ``L`` encoder layers, ``A`` heads per layer, ``I`` FFN neurons per layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from modules.nn.bert import PrunableBertForSequenceClassification


def shrink_structured(model: PrunableBertForSequenceClassification) -> PrunableBertForSequenceClassification:
    """A deep copy of ``model`` with every masked head and FFN neuron physically removed.

    Per layer, the kept heads' rows of the query/key/value projections and columns of
    the attention output projection are copied, and likewise the kept neurons' rows of
    the intermediate dense layer and columns of the FFN output projection. The copy has
    all-ones masks, ``num_heads`` and ``macs()`` follow the new sizes, and it gives the
    masked model's logits (also with padding and with token removal). A layer with
    every head removed adds only the attention output bias before its LayerNorm (and
    can no longer give token scores); with every neuron removed, only the FFN output
    bias. ``model.config`` is copied unchanged (it describes the unpruned architecture;
    :meth:`~modules.nn.bert.PrunableBertForSequenceClassification.layer_structure` gives
    the new sizes), so the copy is rebuilt from its object, not from the config.

    The original ``model`` is not modified: keep training it (with its optimizer) and
    shrink copies for export or latency measurement.

    Args:
        model: the masked model (any parameter dtype/device).

    Returns:
        the shrunk copy, in the same train/eval mode as ``model``.

    Raises:
        ValueError: a mask holds a value other than 0 or 1 (loaded or edited by hand).
    """
    for i, layer in enumerate(model.bert.encoder.layer):
        for kind, mask in (("head", layer.attention.self.head_mask), ("neuron", layer.intermediate.neuron_mask)):
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"encoder layer {i} {kind} mask must be 0/1 to shrink, got {mask.tolist()}.")
    small = copy.deepcopy(model)
    for layer in small.bert.encoder.layer:
        heads = torch.nonzero(layer.attention.self.head_mask, as_tuple=True)[0]
        neurons = torch.nonzero(layer.intermediate.neuron_mask, as_tuple=True)[0]
        layer.keep_units(heads, neurons)
    return small


def keep_lowest_layers(model: PrunableBertForSequenceClassification, k: int) -> None:
    """Drop every encoder layer above the lowest ``k`` of ``model``, in place (layer dropping).

    The kept layers' parameters, masks and outputs are unchanged; the pooler reads the
    ``k``-th layer's output. ``model.config`` keeps describing the unpruned architecture
    (``num_hidden_layers``; dense MACs are counted from it), and the layer count a checkpoint
    needs to rebuild the model is the number of layers present (``len(model.bert.encoder.layer)``;
    :class:`modules.lit.bert_classifier.BertClassifier` stores it). Layer dropping as the simplest
    structured baseline: Sajjad et al. 2023 (arXiv 2004.03844, "top-layer dropping").

    Args:
        model: the model (full-size or already shrunk); layers ``k, k + 1, ...`` are removed.
        k: layers to keep, 1 <= k <= layers present.

    Raises:
        ValueError: ``k`` out of range.
    """
    layers = model.bert.encoder.layer
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(layers):
        raise ValueError(f"keep {k!r} encoder layers: the model has {len(layers)}; keep between 1 and {len(layers)}.")
    if k < len(layers):
        model.bert.encoder.layer = torch.nn.ModuleList(list(layers)[:k])


class UnitImportance(NamedTuple):
    """First-order Taylor importance of the structured units (larger = more important).

    Attributes:
        heads: (L, A) float32, per layer and head.
        neurons: (L, I) float32, per layer and FFN neuron.
    """

    heads: torch.Tensor
    neurons: torch.Tensor


def taylor_importance(
    model: PrunableBertForSequenceClassification,
    batches: Iterable[dict[str, torch.Tensor]],
    max_batches: int | None = None,
) -> UnitImportance:
    """First-order Taylor importance of every attention head and FFN neuron.

    Uses the mask-gradient form: with a gate m_u multiplying unit u's output (the head's
    context, the neuron's activation), the importance is |dL/dm_u|, the first-order
    estimate of the loss change when the unit is removed. For heads this is the score
    of Michel et al. 2019 (arXiv 1905.10650, head importance score I_h = E_x |dL(x)/dxi_h|); for neurons
    it is the gate form of the group Taylor criterion of Molchanov et al. 2019 (arXiv
    1906.10771), which scores a group by (sum_s w_s dL/dw_s)^2 = (dL/dm)^2; we take the
    absolute value instead of the square (the same order within a batch). At m_u = 1,
    dL/dm_u equals sum of w * dL/dw over the unit's input columns of the next
    projection. As in Michel et al.'s code, |dL/dm| is taken per batch (L = mean
    cross-entropy over the batch) and averaged over batches; no per-layer
    normalisation, so compare units within a layer. Units that are already masked (m_u = 0) still get a score (the
    gradient at 0), so they can be compared with the kept ones.

    The model runs in eval mode (no dropout) and is restored to its mode afterwards;
    parameter ``.grad`` fields are left untouched (gradients are taken w.r.t. the masks
    only), and so are the masks' values.

    Args:
        model: the full-size (possibly masked) model; every layer must have the same
            number of heads and of neurons (do not pass a shrunk copy).
        batches: dicts with (B, N) ``input_ids``, ``attention_mask``,
            ``token_type_ids`` and (B,) ``labels`` (class indices); moved to the
            model's device.
        max_batches: stop after this many batches; None uses them all.

    Returns:
        :class:`UnitImportance` with heads (L, A) and neurons (L, I), float32, on CPU.

    Raises:
        ValueError: layers of different sizes, a batch without ``input_ids`` or
            ``labels``, or no batch at all.
    """
    layers = list(model.bert.encoder.layer)
    sizes = set(model.layer_structure())
    if len(sizes) != 1:
        raise ValueError(
            f"taylor_importance needs the full-size model (equal layers), got per-layer (heads, neurons) "
            f"{model.layer_structure()}; score the masked model, not a shrunk copy."
        )
    masks = [l.attention.self.head_mask for l in layers] + [l.intermediate.neuron_mask for l in layers]
    device = masks[0].device
    heads = torch.zeros(len(layers), layers[0].attention.self.num_heads)
    neurons = torch.zeros(len(layers), layers[0].intermediate.dense.out_features)
    was_training = model.training
    model.eval()
    count = 0
    try:
        for m in masks:
            m.requires_grad_(True)
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            missing = [k for k in ("input_ids", "labels") if k not in batch]
            if missing:
                raise ValueError(f"taylor_importance: batch {count} has no {missing}; it needs input_ids and labels.")
            get = lambda k, batch=batch: batch[k].to(device) if batch.get(k) is not None else None  # noqa: E731
            with torch.enable_grad():  # also when called under torch.no_grad()
                out = model(get("input_ids"), get("attention_mask"), get("token_type_ids"))
                loss = F.cross_entropy(out.logits, get("labels"))
                grads = torch.autograd.grad(loss, masks)
            n = len(layers)
            heads += torch.stack([g.abs().float().cpu() for g in grads[:n]])
            neurons += torch.stack([g.abs().float().cpu() for g in grads[n:]])
            count += 1
    finally:
        for m in masks:
            m.requires_grad_(False)
        model.train(was_training)
    if count == 0:
        raise ValueError("taylor_importance got no batches; pass a non-empty iterable (e.g. a train DataLoader).")
    return UnitImportance(heads / count, neurons / count)


def _top_mask(scores: torch.Tensor, k: int, what: str) -> torch.Tensor:
    """(U,) float 0/1 mask with ones at the k highest scores (ties: lower index first)."""
    if not 0 <= k <= scores.shape[0]:
        raise ValueError(f"{what}: cannot keep {k} units, the layer has {scores.shape[0]}.")
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    mask = torch.zeros(scores.shape[0], dtype=torch.float32)
    mask[order] = 1.0
    return mask


def top_unit_masks(
    importance: UnitImportance, heads_kept: Sequence[int], neurons_kept: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks keeping, in each layer, its most important heads and neurons.

    Args:
        importance: from :func:`taylor_importance`, heads (L, A), neurons (L, I).
        heads_kept: L counts in [0, A], heads kept per layer.
        neurons_kept: L counts in [0, I], FFN neurons kept per layer.

    Returns:
        head masks (L, A) and neuron masks (L, I), float32 0/1 on CPU, with exactly
        ``heads_kept[l]`` / ``neurons_kept[l]`` ones in row l (ties broken towards the
        lower index); ready for ``model.set_structured_masks``.

    Raises:
        ValueError: not L counts, or a count outside [0, units in the layer] (the
            message names the layer).
    """
    n_layers = importance.heads.shape[0]
    for name, kept in (("heads_kept", heads_kept), ("neurons_kept", neurons_kept)):
        if len(kept) != n_layers:
            raise ValueError(f"{name}: got {len(kept)} counts, expected one per encoder layer ({n_layers}).")
    head_masks = torch.stack(
        [_top_mask(importance.heads[i].cpu(), int(k), f"encoder layer {i} heads") for i, k in enumerate(heads_kept)]
    )
    neuron_masks = torch.stack(
        [
            _top_mask(importance.neurons[i].cpu(), int(k), f"encoder layer {i} neurons")
            for i, k in enumerate(neurons_kept)
        ]
    )
    return head_masks, neuron_masks
