"""Least-squares mask tuning: rescale the kept heads and neurons so each layer reproduces the dense one.

Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers" (arXiv
2204.09656), section 4.3 (mask tuning): after pruning, the kept units' mask variables are
no longer 0/1 but real scales, chosen layer by layer to minimise the reconstruction error
of the layer's output against the unpruned model's, which is a linear least-squares
problem in the scales. No gradient step, no randomness: it repairs the damage pruning does
to the activations, in about a second for a 6-layer BERT on a few hundred sentences.

Here, for each encoder layer in order, with the *pruned* model's input ``x`` to the layer
and the *dense* model's input ``x'``:

* attention: the sublayer's pre-LayerNorm sum is ``sum_h m_h C_h(x) + b_O + x`` where
  ``C_h`` is head h's context projected by its columns of the output projection; the
  target is the dense model's ``sum_h C_h(x') + b_O + x'``;
* FFN: likewise ``sum_i m_i a_i(y) W2[:, i] + b2 + y`` against the dense model's value, with
  ``y`` the (already tuned) attention output.

The scales minimise ``||A m - t||^2 + damping * mean(diag(A^T A)) * ||m - 1||^2`` over every
non-padding token (the ridge pulls towards 1, the unpruned scale), then are folded into
the output projections' columns, so the model keeps plain 0/1 masks and shrinks as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from modules.bert import PrunableBertForSequenceClassification


def ridge_towards_one(gram: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """Solve ``(G + lam I) m = r + lam 1`` with ``lam = damping * mean(diag G)``.

    Args:
        gram: (K, K) float64 ``A^T A``; rhs: (K,) float64 ``A^T t``.
        damping: relative ridge weight (> 0), a fraction of the mean diagonal.

    Returns:
        (K,) float64 scales, the minimiser of ``||A m - t||^2 + lam ||m - 1||^2``.

    Raises:
        ValueError: ``damping`` not positive.
    """
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (a fraction of the Gram matrix's mean diagonal), got {damping}.")
    k = gram.shape[0]
    lam = damping * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, rhs + lam)


class DenseTargets(NamedTuple):
    """The dense model's pre-LayerNorm sublayer sums on the calibration batches (what tuning matches).

    Attributes:
        attention: per layer, per batch, (T_b, H) float32 ``attention output projection +
            residual`` at the batch's T_b non-padding tokens.
        ffn: per layer, per batch, (T_b, H) float32 ``FFN output projection + residual``.
    """

    attention: list[list[torch.Tensor]]
    ffn: list[list[torch.Tensor]]


@torch.no_grad()
def dense_targets(teacher: PrunableBertForSequenceClassification, batches: Sequence[dict[str, torch.Tensor]]) -> DenseTargets:
    """Run the dense model once over the calibration batches and keep its per-layer targets.

    Computed once per search and reused for every candidate (the dense model does not change).
    The model runs in eval mode and is restored to its mode.

    Args:
        teacher: the dense (unmasked) model.
        batches: dicts with (B, N) ``input_ids``, ``attention_mask`` and optional ``token_type_ids``.

    Returns:
        :class:`DenseTargets`.

    Raises:
        ValueError: no batch.
    """
    if not batches:
        raise ValueError("mask tuning needs at least one calibration batch.")
    mode = teacher.training
    teacher.eval()
    attention: list[list[torch.Tensor]] = [[] for _ in teacher.bert.encoder.layer]
    ffn: list[list[torch.Tensor]] = [[] for _ in teacher.bert.encoder.layer]
    for b in batches:
        present = b["attention_mask"].bool()
        key_mask = None if bool(present.all()) else present
        x = teacher.bert.embeddings(input_ids=b["input_ids"], token_type_ids=b.get("token_type_ids"))
        for i, layer in enumerate(teacher.bert.encoder.layer):
            ctx, _ = layer.attention.self(x, key_mask)
            pre = layer.attention.output.dense(ctx) + x
            attention[i].append(pre[present])
            y = layer.attention.output.LayerNorm(pre)
            pre = layer.output.dense(layer.intermediate(y)) + y
            ffn[i].append(pre[present])
            x = layer.output.LayerNorm(pre)
    teacher.train(mode)
    return DenseTargets(attention, ffn)


@torch.no_grad()
def tune_unit_scales(
    student: PrunableBertForSequenceClassification,
    targets: DenseTargets,
    batches: Sequence[dict[str, torch.Tensor]],
    damping: float = 0.01,
    max_scale: float = 10.0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fit and fold least-squares scales of every present head and neuron of ``student``, in place.

    Kwon et al. 2022 (arXiv 2204.09656) section 4.3; see the module docstring for the
    objective. Units with a 0 mask keep contributing nothing, whatever their scale.

    Args:
        student: the pruned model, usually a shrunk copy (:func:`modules.structured.shrink_structured`)
            of the dense model; its attention and FFN output projections' columns are
            multiplied by the scales.
        targets: :func:`dense_targets` of the dense model on the same ``batches``.
        batches: the calibration batches (e.g. a few hundred training sentences).
        damping: ridge weight towards scale 1, as a fraction of the Gram matrix's mean diagonal (> 0).
        max_scale: scales are clamped to [-max_scale, max_scale] (as Kwon et al. do) against
            ill-conditioned layers.

    Returns:
        per layer, the (A_l,) head scales and (I_l,) neuron scales applied (float32; empty
        for a layer with no heads or neurons).

    Raises:
        ValueError: no batch, targets of other batches, or a student of another depth or width.
    """
    if not batches:
        raise ValueError("mask tuning needs at least one calibration batch.")
    layers = list(student.bert.encoder.layer)
    if len(targets.attention) != len(layers) or any(len(t) != len(batches) for t in targets.attention):
        raise ValueError(
            f"targets hold {len(targets.attention)} layers x {len(targets.attention[0]) if targets.attention else 0} "
            f"batches, the student has {len(layers)} layers and {len(batches)} batches are given: compute "
            "dense_targets of the student's dense model on the same batches."
        )
    if targets.attention[0][0].shape[-1] != student.config.hidden_size:
        raise ValueError(
            f"targets have width {targets.attention[0][0].shape[-1]}, the student {student.config.hidden_size}: "
            "tune a pruned copy of the model the targets come from."
        )
    mode = student.training
    student.eval()
    states = []  # per batch: [hidden (B, N, H), key mask, present tokens (B, N)]
    for b in batches:
        present = b["attention_mask"].bool()
        x = student.bert.embeddings(input_ids=b["input_ids"], token_type_ids=b.get("token_type_ids"))
        states.append([x, None if bool(present.all()) else present, present])
    scales = []
    for layer, att_targets, ffn_targets in zip(layers, targets.attention, targets.ffn):
        head_scale = _tune_attention(layer, states, att_targets, damping, max_scale)
        neuron_scale = _tune_ffn(layer, states, ffn_targets, damping, max_scale)
        scales.append((head_scale, neuron_scale))
    student.train(mode)
    return scales


def _tune_attention(layer, states, targets: list[torch.Tensor], damping: float, max_scale: float) -> torch.Tensor:
    """Fit and fold the head scales of one layer; advance ``states`` to the attention outputs."""
    attn, out = layer.attention.self, layer.attention.output
    a, d = attn.num_heads, attn.head_dim
    gram = torch.zeros(a, a, dtype=torch.float64)
    rhs = torch.zeros(a, dtype=torch.float64)
    contexts = []
    w = out.dense.weight.view(out.dense.out_features, a, d)  # (H, A, d): head h's columns
    for (x, key_mask, present), target in zip(states, targets):
        ctx, _ = attn(x, key_mask)
        contexts.append(ctx)
        if a == 0:
            continue
        per_head = torch.einsum("tad,had->tah", ctx[present].view(-1, a, d), w)  # (T, A, H)
        residual = target - out.dense.bias - x[present]  # (T, H)
        gram += torch.einsum("tah,tbh->ab", per_head, per_head).double()
        rhs += torch.einsum("tah,th->a", per_head, residual).double()
    scale = torch.empty(0)
    if a:
        scale = ridge_towards_one(gram, rhs, damping).clamp(-max_scale, max_scale).float()
        w.mul_(scale[None, :, None])
    for state, ctx in zip(states, contexts):
        state[0] = out(ctx, state[0])
    return scale


def _tune_ffn(layer, states, targets: list[torch.Tensor], damping: float, max_scale: float) -> torch.Tensor:
    """Fit and fold the neuron scales of one layer; advance ``states`` to the layer outputs."""
    w2 = layer.output.dense.weight  # (H, K): neuron i's column
    k = w2.shape[1]
    act_gram = torch.zeros(k, k, dtype=torch.float64)
    rhs = torch.zeros(k, dtype=torch.float64)
    acts = []
    for (y, _, present), target in zip(states, targets):
        act = layer.intermediate(y)
        acts.append(act)
        if k == 0:
            continue
        kept = act[present]  # (T, K)
        residual = target - layer.output.dense.bias - y[present]  # (T, H)
        act_gram += (kept.T @ kept).double()
        rhs += (kept * (residual @ w2)).sum(0).double()
    scale = torch.empty(0)
    if k:
        # A^T A for the columns act_i * W2[:, i]: (act^T act) * (W2^T W2), elementwise
        gram = act_gram * (w2.T @ w2).double()
        scale = ridge_towards_one(gram, rhs, damping).clamp(-max_scale, max_scale).float()
        w2.mul_(scale[None, :])
    for state, act in zip(states, acts):
        state[0] = layer.output(act, state[0])
    return scale
