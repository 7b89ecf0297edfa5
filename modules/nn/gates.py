"""Gates a model carries in its own state: hard-concrete L0 gates and ToP's token gates.

* :class:`HardConcreteGates`: stretched, clamped binary-concrete gates (Louizos, Welling
  and Kingma 2018, arXiv 1712.01312, Sec. 4) with the constants of ToP's reference code
  (arXiv 2306.14393): stretch (-0.1, 1.1), temperature 2/3, epsilon 1e-6. A gate sample is
  ``z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / T) (r - l) + l, 0, 1)``.
* :class:`TokenGates`: ToP's coarse-to-fine token gates (arXiv 2306.14393 Sec. 3.2), the
  ``token_pruner`` hook of :class:`modules.nn.bert.PrunableBertForSequenceClassification`.
  They live with the model (saved in its state dict, rebuilt by
  :class:`modules.lit.bert_classifier.BertClassifier` from a checkpoint); the ToP pruner
  (``pruners.top``) trains them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

LOG_ALPHA_MIN = math.log(1e-2)
LOG_ALPHA_MAX = math.log(1e2)


class HardConcreteGates(nn.Module):
    """A vector of ``n`` independent hard-concrete gates with learnable ``log_alpha``.

    Args:
        n: number of gates.
        init_log_alpha: initial ``log_alpha`` of every gate (large = open).
        temperature: concrete temperature T.
        stretch: (l, r), the stretch interval; l < 0 < 1 < r.
        eps: keeps the uniform noise away from 0 and 1.

    Raises:
        ValueError: n < 1, T <= 0, or a stretch interval that does not contain [0, 1].
    """

    def __init__(
        self,
        n: int,
        init_log_alpha: float = 0.0,
        temperature: float = 2.0 / 3.0,
        stretch: tuple[float, float] = (-0.1, 1.1),
        eps: float = 1e-6,
    ):
        super().__init__()
        if n < 1 or temperature <= 0 or not (stretch[0] < 0 and stretch[1] > 1):
            raise ValueError(f"bad hard-concrete settings n={n}, temperature={temperature}, stretch={stretch}.")
        self.log_alpha = nn.Parameter(torch.full((n,), float(init_log_alpha)))
        self.temperature = temperature
        self.low, self.high = stretch
        self.eps = eps

    def sample(self) -> torch.Tensor:
        """(n,) reparameterised gate sample in [0, 1] (Louizos et al. Eq. 10); differentiable in log_alpha."""
        u = torch.rand_like(self.log_alpha).clamp(self.eps, 1 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def prob_above(self, x: float) -> torch.Tensor:
        """(n,) probability that a gate sample exceeds ``x`` in [0, 1): ``1 - CDF(x)`` (Louizos et al. Eq. 12).

        ``prob_above(0)`` is the probability that a gate is non-zero, the L0 term.
        """
        t = math.log((x - self.low) / (self.high - x))
        return torch.sigmoid(self.log_alpha - self.temperature * t)

    def prob_nonzero(self) -> torch.Tensor:
        """(n,) ``P(z != 0) = 1 - CDF(0)``, the keep probability used in the constraint."""
        return self.prob_above(0.0)

    def expected_open(self) -> torch.Tensor:
        """Scalar: the expected number of non-zero gates, ``sum P(z != 0)``."""
        return self.prob_nonzero().sum()

    def deterministic_topk(self, groups: int = 1) -> torch.Tensor:
        """(n,) bool evaluation gates: in each of ``groups`` equal groups, the
        ``k = round(sum P(z != 0))`` gates of that group with the largest log_alpha are open.

        ToP's evaluation rule (arXiv 2306.14393 Sec. 3.2): deterministic, and keeps as
        many gates as the training distribution would on average.

        For token gates the open set is *not* forced to be a prefix of the ranking (the
        top-ranked bins): it is the set of bins training learned to keep, as in ToP's and
        CoFi's ``deterministic_z`` (the smallest log_alpha close). Training samples every bin
        gate independently, so forcing a prefix would serve a pruning the gates were not
        trained for; ToP's frozen fine-tuning (``pruners.top``) then trains the model under
        exactly this set. ``tests/test_top.py`` shows a non-prefix set being kept.

        Raises:
            ValueError: ``n`` is not a multiple of ``groups``.
        """
        if self.log_alpha.numel() % groups:
            raise ValueError(f"{self.log_alpha.numel()} gates do not split into {groups} equal groups.")
        log_alpha = self.log_alpha.detach().view(groups, -1)
        ks = torch.round(self.prob_nonzero().detach().view(groups, -1).sum(dim=1)).long()
        order = torch.argsort(log_alpha, dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(log_alpha.shape[1], device=order.device).expand_as(order))
        return (rank < ks[:, None]).view(-1)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp log_alpha to [log 1e-2, log 1e2] (done after each optimizer step, as in ToP's code)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def straight_through_binary(z: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``1[z > threshold]`` in the forward pass, identity gradient to ``z`` in the backward pass."""
    hard = (z > threshold).to(z.dtype)
    return hard + z - z.detach()


def bin_of_rank(rank: torch.Tensor, m: torch.Tensor, bin_count: int) -> torch.Tensor:
    """Bin ``floor(rank * bin_count / m)`` (clamped to the last bin) of rank(s) among ``m`` candidates.

    ``rank`` and ``m`` broadcast; ``m`` must be >= 1. Shared by :func:`rank_bins` and
    :func:`deterministic_kept_lengths`, so the analytic count matches the encoder.
    """
    # rank >= 0 and m >= 1, so truncation is the floor; it exports to a single ONNX Div
    return torch.div(rank * bin_count, m, rounding_mode="trunc").clamp_(max=bin_count - 1)


def rank_bins(scores: torch.Tensor, candidates: torch.Tensor, bin_count: int) -> torch.Tensor:
    """Bin of each candidate token by its normalised rank: ``floor(rank / m * bin_count)``.

    Rank 0 is the highest score; ``m`` is the sample's number of candidates.

    Args:
        scores: (B, N) token scores.
        candidates: (B, N) bool, tokens that take part in the ranking.
        bin_count: number of bins.

    Returns:
        (B, N) int64 bins in [0, bin_count); non-candidates get bin 0 (callers mask them).
    """
    s = scores.detach().masked_fill(~candidates, float("-inf"))
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    m = candidates.sum(dim=1, keepdim=True).clamp_min(1)
    return bin_of_rank(rank, m, bin_count).masked_fill(~candidates, 0)


class TokenGates(nn.Module):
    """Coarse-to-fine token gates of ToP (arXiv 2306.14393 Sec. 3.2).

    Args:
        num_layers: encoder layers of the model.
        pruning_layers: layers whose tokens may be pruned; pruning layer ``l``'s tokens are
            ranked by layer ``l - 1``'s attention and leave before layer ``l - 1``'s
            feed-forward block (layer 0 never prunes: nothing has scored tokens yet).
        bin_count: rank bins per pruning layer.
        token_init_log_alpha: initial log_alpha of the token gates (positive = keep).
        layer_init_log_alpha: initial log_alpha of the layer gates (negative = layer off).

    Raises:
        ValueError: pruning layers outside 1..num_layers-1, duplicates, bin_count < 2.
    """

    def __init__(
        self,
        num_layers: int,
        pruning_layers: list[int] | tuple[int, ...],
        bin_count: int = 25,
        token_init_log_alpha: float = 2.0,
        layer_init_log_alpha: float = -1.0,
    ):
        super().__init__()
        layers = tuple(int(x) for x in pruning_layers)
        if not layers or len(set(layers)) != len(layers) or any(not 1 <= x < num_layers for x in layers):
            raise ValueError(
                f"pruner.pruning_layers={list(layers)} must be distinct layer indices in 1..{num_layers - 1} "
                f"(the model has {num_layers} layers; layer 0 has no token scores yet)."
            )
        if isinstance(bin_count, bool) or not isinstance(bin_count, int) or bin_count < 2:
            raise ValueError(f"pruner.bin_count={bin_count!r} must be an integer >= 2.")
        self.num_layers = num_layers
        self.pruning_layers = tuple(sorted(layers))
        self.bin_count = bin_count
        self._init = (float(token_init_log_alpha), float(layer_init_log_alpha))
        self.token = HardConcreteGates(len(layers) * bin_count, init_log_alpha=token_init_log_alpha)
        self.layer = HardConcreteGates(len(layers), init_log_alpha=layer_init_log_alpha)
        self._slot = {layer: i for i, layer in enumerate(self.pruning_layers)}
        # Frozen gates: a snapshot of the evaluation gates that training then uses too
        # (hard masks, no gate gradients). Buffers, so checkpoints serve exactly that pruning.
        p = len(layers)
        self.register_buffer("frozen_flag", torch.zeros((), dtype=torch.bool))
        self.register_buffer("frozen_layer_on", torch.zeros(p, dtype=torch.bool))
        self.register_buffer("frozen_kept", torch.zeros(p, bin_count, dtype=torch.bool))

    @property
    def frozen(self) -> bool:
        """True once :meth:`freeze` was called: evaluation and training use the frozen snapshot."""
        return bool(self.frozen_flag)

    def freeze(self, layer_on: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> None:
        """Fix the gates at ``(layer_on, kept)`` ((P,) bool and (P, bin_count) bool); None = :meth:`deterministic`."""
        if layer_on is None or kept is None:
            det_on, det_kept = self.deterministic()
            layer_on = det_on if layer_on is None else layer_on
            kept = det_kept if kept is None else kept
        self.frozen_layer_on.copy_(layer_on)
        self.frozen_kept.copy_(kept)
        self.frozen_flag.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints written before gates could be frozen load as unfrozen.
        for name in ("frozen_flag", "frozen_layer_on", "frozen_kept"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def config(self) -> dict[str, Any]:
        """Plain constructor arguments (stored in checkpoints to rebuild the gates)."""
        return {
            "num_layers": self.num_layers,
            "pruning_layers": list(self.pruning_layers),
            "bin_count": self.bin_count,
            "token_init_log_alpha": self._init[0],
            "layer_init_log_alpha": self._init[1],
        }

    def token_keep_prob(self) -> torch.Tensor:
        """(P, bin_count) probability that each token gate is non-zero."""
        return self.token.prob_nonzero().view(len(self.pruning_layers), self.bin_count)

    def layer_on_prob(self) -> torch.Tensor:
        """(P,) probability that each layer gate is on (its sample exceeds 0.5, the straight-through threshold)."""
        return self.layer.prob_above(0.5)

    def keep_ratio(self) -> torch.Tensor:
        """(P,) expected fraction of the surviving (non-CLS) tokens each pruning layer keeps.

        Bins hold equal shares of the ranked tokens, so a layer that prunes keeps the
        mean bin keep probability: ``1 - P(on) (1 - mean_b P(z_b != 0))``.
        """
        return 1.0 - self.layer_on_prob() * (1.0 - self.token_keep_prob().mean(dim=1))

    def deterministic(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation gates: (P,) bool layer on (log_alpha > 0) and (P, bin_count) bool kept bins (top-k);
        once :attr:`frozen`, the frozen snapshot."""
        if self.frozen:
            return self.frozen_layer_on, self.frozen_kept
        p = len(self.pruning_layers)
        layer_on = self.layer.log_alpha.detach() > 0
        return layer_on, self.token.deterministic_topk(groups=p).view(p, self.bin_count)

    def token_keep(self, layer: int, scores: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Keep mask of pruning layer ``layer``, from layer ``layer - 1``'s attention on (the encoder's ``TokenPrunerHook``).

        Args:
            layer: a pruning layer.
            scores: (B, N) attention received in layer ``layer - 1``.
            alive: (B, N) bool, tokens still present.

        Returns:
            training: (B, N) float in [0, 1] (sampled gates); evaluation, or training
            once :attr:`frozen`: (B, N) bool (deterministic gates).
        """
        slot = self._slot[layer]
        candidates = alive.clone()
        candidates[:, 0] = False  # [CLS] is never pruned
        bins = rank_bins(scores, candidates, self.bin_count)
        if self.training and not self.frozen:
            z_tok = self.token.sample().view(len(self.pruning_layers), self.bin_count)[slot]
            z_layer = straight_through_binary(self.layer.sample()[slot])
            keep = 1.0 - z_layer * (1.0 - z_tok[bins])
            return torch.where(candidates, keep, alive.to(keep.dtype))
        layer_on, kept = self.deterministic()
        if not bool(layer_on[slot]):
            return alive
        return alive & (~candidates | kept[slot][bins])


