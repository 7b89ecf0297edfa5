"""Hard-concrete L0 gates (Louizos, Welling and Kingma 2018, arXiv 1712.01312, Sec. 4).

A gate ``z`` in [0, 1] is a stretched and clamped binary-concrete sample:
``s = sigmoid((log u - log(1 - u) + log_alpha) / T)``, ``z = clamp(s (r - l) + l, 0, 1)``
with ``u ~ U(eps, 1 - eps)``, stretch ``(l, r) = (-0.1, 1.1)`` and temperature
``T = 2/3`` (the constants of ToP's reference code, arXiv 2306.14393).
"""

from __future__ import annotations

import math

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

        Raises:
            ValueError: ``n`` is not a multiple of ``groups``.
        """
        if self.log_alpha.numel() % groups:
            raise ValueError(f"{self.log_alpha.numel()} gates do not split into {groups} equal groups.")
        log_alpha = self.log_alpha.detach().view(groups, -1)
        ks = torch.round(self.prob_nonzero().detach().view(groups, -1).sum(dim=1)).long()
        order = torch.argsort(log_alpha, dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(log_alpha.shape[1]).expand_as(order))
        return (rank < ks[:, None]).view(-1)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp log_alpha to [log 1e-2, log 1e2] (done after each optimizer step, as in ToP's code)."""
        self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
