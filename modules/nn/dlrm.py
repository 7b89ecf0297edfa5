"""DLRM (Naumov et al. 2019, arXiv 1906.00091, section 2) split torchrec-style into small modules.

Shapes used throughout: ``B`` batch size, ``K`` number of numeric (dense) features,
``F`` number of categorical features (single-valued plus multi-valued bags), ``D``
embedding dimension, ``L`` longest bag of a multi-valued feature.

* :class:`SparseArch`: one embedding bag per categorical feature, ids ``(B, F_s)``
  and bags ``(B, F_m, L)`` -> ``(B, F, D)``.
* :class:`DenseArch`: bottom MLP, ``(B, K)`` -> ``(B, D)``.
* :class:`InteractionArch`: pairwise dot products of the ``F + 1`` vectors,
  ``(B, D)`` and ``(B, F, D)`` -> ``(B, D + F(F+1)/2)``.
* :class:`OverArch`: top MLP, ``(B, D + F(F+1)/2)`` -> ``(B,)`` logits.

Linear layers and embedding tables are :class:`MaskedLinear` / :class:`MaskedEmbeddingBag`:
they hold a dense weight (the *shadow* that keeps learning) and a mask buffer that
pruners write. :func:`export_served` folds the masks into plain ``nn.Linear`` /
``nn.EmbeddingBag`` layers and physically drops pruned neurons: that copy is what
serves and what latency is measured on.

The LightningModule that trains it on a stream is :class:`modules.lit.dlrm.DLRMModule`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.core.errors import ConfigError


# ----------------------------------------------------------------------------- masked layers
class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose forward uses ``weight * mask`` and ``bias * bias_mask``.

    The parameters stay dense (the *dense shadow*). With ``straight_through=True``
    (adaptive D2S) the forward value is the masked weight but the gradient reaches
    every shadow weight unchanged (straight-through estimator), so pruned weights keep
    learning and can grow back at the next mask update. With ``straight_through=False``
    (static pruning) pruned weights get zero gradient. ``straight_through=None`` switches the
    mask off (the dense model; used by pruners that also train the dense shadow directly).

    Buffers: ``mask`` ``(out, in)`` bool, ``bias_mask`` ``(out,)`` bool (all True: dense).
    Input ``(..., in)`` -> output ``(..., out)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool))
        self.register_buffer("bias_mask", torch.ones(out_features, dtype=torch.bool))
        self.straight_through = True

    def masked_weight(self) -> torch.Tensor:
        """The weight the forward uses, ``(out, in)``."""
        return _apply_mask(self.weight, self.mask, self.straight_through)

    def masked_bias(self) -> torch.Tensor | None:
        """The bias the forward uses, ``(out,)`` (None without bias)."""
        if self.bias is None:
            return None
        return _apply_mask(self.bias, self.bias_mask, self.straight_through)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` -> ``(..., out)`` with the masked weight and bias."""
        return F.linear(x, self.masked_weight(), self.masked_bias())


class MaskedEmbeddingBag(nn.Module):
    """An embedding bag table with a prunable mask; row 0 is padding (contributes nothing).

    Args:
        num_embeddings: table rows (>= 2; ids are hashed into ``[1, num_embeddings)``).
        embedding_dim: ``D``.
        mode: ``"mean"`` or ``"sum"`` over the bag's non-padding ids.

    Input ``(B, L)`` long ids (0 = padding) -> ``(B, D)``. Ids outside the table are
    wrapped into ``[1, num_embeddings)`` by :func:`wrap_ids`, so unseen ids never crash.
    Buffer ``mask`` ``(num_embeddings, D)`` bool.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str = "mean"):
        super().__init__()
        if num_embeddings < 2 or embedding_dim < 1:
            raise ValueError(f"num_embeddings={num_embeddings} must be >= 2 and embedding_dim={embedding_dim} >= 1.")
        self.num_embeddings, self.embedding_dim, self.mode = num_embeddings, embedding_dim, mode
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim) * (1.0 / math.sqrt(embedding_dim)))
        self.register_buffer("mask", torch.ones(num_embeddings, embedding_dim, dtype=torch.bool))
        self.straight_through = True

    def masked_weight(self) -> torch.Tensor:
        """The table the forward uses, ``(num_embeddings, D)``."""
        return _apply_mask(self.weight, self.mask, self.straight_through)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(wrap_ids(ids, self.num_embeddings), self.masked_weight(), mode=self.mode, padding_idx=0)


def _apply_mask(weight: torch.Tensor, mask: torch.Tensor, straight_through: bool | None) -> torch.Tensor:
    """``weight * mask`` in value; straight-through keeps the gradient of the dense weight;
    ``straight_through=None`` means masks are switched off (the dense shadow is used as is)."""
    if straight_through is None:
        return weight
    masked = weight * mask
    if straight_through:
        return weight + (masked - weight).detach()
    return masked


def wrap_ids(ids: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Map any non-negative id into ``[0, num_embeddings)``: 0 stays 0 (padding), ids in range unchanged,
    larger ids wrap into ``[1, num_embeddings)`` (``1 + (id - 1) mod (num_embeddings - 1)``).

    Raises:
        ValueError: a negative id.
    """
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"Embedding ids must be >= 0 (0 is padding); got {int(ids.min())}.")
    big = ids >= num_embeddings
    if bool(big.any()):
        ids = torch.where(big, 1 + (ids - 1) % (num_embeddings - 1), ids)
    return ids


# ----------------------------------------------------------------------------- DLRM blocks
def _check_sizes(name: str, sizes: list[int]) -> list[int]:
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"{name}={sizes} must be a non-empty list of positive layer widths.")
    return sizes


class MLP(nn.Module):
    """Stack of :class:`MaskedLinear` layers with ReLU after each, except the last when ``last_relu=False``.

    Input ``(B, in_features)`` -> ``(B, sizes[-1])``. ``layers`` is an ``nn.ModuleList``
    so pruners and :func:`export_served` can address layer ``i`` by name.
    """

    def __init__(self, in_features: int, sizes: list[int], last_relu: bool = True):
        super().__init__()
        dims = [in_features, *sizes]
        self.layers = nn.ModuleList(MaskedLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.last_relu = last_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < n - 1 or self.last_relu:
                x = torch.relu(x)
        return x


class SparseArch(nn.Module):
    """Embedding bags of the categorical features.

    Args:
        num_embeddings: rows of each single-valued feature's table (length ``F_s``).
        multi_num_embeddings: rows of each multi-valued feature's table (length ``F_m``).
        embedding_dim: ``D``.

    Forward:
        sparse: ``(B, F_s)`` long ids (one per feature).
        multi: ``(B, F_m, L)`` long ids padded with 0, or None when ``F_m == 0``.
        returns ``(B, F, D)`` with ``F = F_s + F_m``, single-valued features first.

    Raises:
        ValueError: no features, or an input with the wrong number of features.
    """

    def __init__(self, num_embeddings: list[int], multi_num_embeddings: list[int], embedding_dim: int):
        super().__init__()
        if len(num_embeddings) + len(multi_num_embeddings) == 0:
            raise ValueError("SparseArch needs at least one categorical feature.")
        self.embedding_dim = int(embedding_dim)
        self.tables = nn.ModuleList(MaskedEmbeddingBag(n, embedding_dim, "sum") for n in num_embeddings)
        self.multi_tables = nn.ModuleList(MaskedEmbeddingBag(n, embedding_dim, "mean") for n in multi_num_embeddings)

    @property
    def num_features(self) -> int:
        """``F``."""
        return len(self.tables) + len(self.multi_tables)

    def forward(self, sparse: torch.Tensor, multi: torch.Tensor | None = None) -> torch.Tensor:
        if sparse.dim() != 2 or sparse.shape[1] != len(self.tables):
            raise ValueError(f"sparse ids must be (B, {len(self.tables)}); got {tuple(sparse.shape)}.")
        out = [table(sparse[:, i : i + 1]) for i, table in enumerate(self.tables)]
        if self.multi_tables:
            if multi is None or multi.dim() != 3 or multi.shape[1] != len(self.multi_tables):
                shape = None if multi is None else tuple(multi.shape)
                raise ValueError(f"multi-valued ids must be (B, {len(self.multi_tables)}, L); got {shape}.")
            out += [table(multi[:, i]) for i, table in enumerate(self.multi_tables)]
        return torch.stack(out, dim=1)


class DenseArch(nn.Module):
    """Bottom MLP: ``(B, K)`` numeric features -> ``(B, D)``; ``sizes[-1]`` must equal ``D``.

    Raises:
        ValueError: empty or non-positive sizes.
    """

    def __init__(self, in_features: int, sizes: list[int]):
        super().__init__()
        self.mlp = MLP(int(in_features), _check_sizes("model.bottom_mlp", sizes), last_relu=True)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.mlp(dense)


class InteractionArch(nn.Module):
    """Pairwise dot products of the dense vector and the ``F`` embeddings (DLRM "dot" interaction).

    Forward: dense ``(B, D)``, sparse ``(B, F, D)`` -> ``(B, D + F(F+1)/2)``: the dense vector
    followed by ``<v_i, v_j>`` for ``i < j`` over ``v = [dense, e_1, ..., e_F]`` in
    row-major upper-triangle order ``(0,1), (0,2), ..., (1,2), ...``.
    """

    def __init__(self, num_sparse_features: int):
        super().__init__()
        n = num_sparse_features + 1
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.num_sparse_features = num_sparse_features

    @property
    def output_dim_extra(self) -> int:
        """Number of pairwise terms, ``F(F+1)/2``."""
        return int(self.rows.numel())

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        v = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # (B, F+1, D)
        gram = torch.bmm(v, v.transpose(1, 2))  # (B, F+1, F+1)
        return torch.cat([dense, gram[:, self.rows, self.cols]], dim=1)


class OverArch(nn.Module):
    """Top MLP: ``(B, in_features)`` -> ``(B,)`` logits; hidden layers ``sizes`` with ReLU, then one linear output."""

    def __init__(self, in_features: int, sizes: list[int]):
        super().__init__()
        self.mlp = MLP(int(in_features), [*_check_sizes("model.top_mlp", sizes), 1], last_relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)


class DLRM(nn.Module):
    """The DLRM network: sparse arch + dense arch -> interaction -> over arch.

    Args:
        num_dense: ``K`` numeric features (>= 1).
        num_embeddings: table rows per single-valued categorical feature.
        multi_num_embeddings: table rows per multi-valued feature (embedding bags).
        embedding_dim: ``D``.
        bottom_mlp: hidden widths of the bottom MLP; a last layer of width ``D`` is appended.
        top_mlp: hidden widths of the top MLP; a last layer of width 1 is appended.

    Forward: dense ``(B, K)`` float, sparse ``(B, F_s)`` long, multi ``(B, F_m, L)`` long or None
    -> ``(B,)`` click logits.

    Raises:
        ValueError: bad sizes.
    """

    def __init__(
        self,
        num_dense: int,
        num_embeddings: list[int],
        multi_num_embeddings: list[int],
        embedding_dim: int,
        bottom_mlp: list[int],
        top_mlp: list[int],
    ):
        super().__init__()
        if num_dense < 1 or embedding_dim < 1:
            raise ConfigError(f"num_dense={num_dense} and model.embedding_dim={embedding_dim} must be >= 1.")
        self.sparse_arch = SparseArch(list(num_embeddings), list(multi_num_embeddings), embedding_dim)
        self.dense_arch = DenseArch(num_dense, [*_check_sizes("model.bottom_mlp", bottom_mlp), embedding_dim])
        self.interaction = InteractionArch(self.sparse_arch.num_features)
        self.over_arch = OverArch(embedding_dim + self.interaction.output_dim_extra, top_mlp)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor, multi: torch.Tensor | None = None) -> torch.Tensor:
        e = self.sparse_arch(sparse, multi)
        d = self.dense_arch(dense)
        return self.over_arch(self.interaction(d, e))

    def mlps(self) -> dict[str, MLP]:
        """The prunable MLPs by name: ``{"bottom": ..., "top": ...}``."""
        return {"bottom": self.dense_arch.mlp, "top": self.over_arch.mlp}

    def mlp_layers(self) -> dict[str, MaskedLinear]:
        """Every MLP linear layer, named ``bottom.0``, ``bottom.1``, ..., ``top.0``, ... in forward order."""
        return {f"{m}.{i}": layer for m, mlp in self.mlps().items() for i, layer in enumerate(mlp.layers)}

    def hidden_neurons(self) -> dict[str, tuple[MaskedLinear, MaskedLinear]]:
        """Removable neurons: layer name -> (layer producing the neurons, next layer consuming them).

        The bottom MLP's last layer (width ``D``, feeding the interaction) and the top MLP's
        output layer are not removable.
        """
        out = {}
        for m, mlp in self.mlps().items():
            for i in range(len(mlp.layers) - 1):
                out[f"{m}.{i}"] = (mlp.layers[i], mlp.layers[i + 1])
        return out

    def embedding_tables(self) -> dict[str, MaskedEmbeddingBag]:
        """Every embedding table, named ``emb.<i>`` (single-valued) and ``bag.<i>`` (multi-valued)."""
        out = {f"emb.{i}": t for i, t in enumerate(self.sparse_arch.tables)}
        out.update({f"bag.{i}": t for i, t in enumerate(self.sparse_arch.multi_tables)})
        return out


# ----------------------------------------------------------------------------- serving copy
def export_served(model: DLRM, remove_neurons: bool = True) -> DLRM:
    """A copy for serving: masks folded into plain ``nn.Linear`` / ``nn.EmbeddingBag`` layers.

    With ``remove_neurons`` a hidden neuron that cannot affect the output (see
    :func:`neuron_alive`) is physically removed: its row (and bias) from its layer and the matching
    input column from the next layer, so the served MLP is smaller. The copy computes the
    same logits as ``model`` in eval mode.

    Args:
        model: a trained :class:`DLRM` (left unchanged).
        remove_neurons: drop fully masked neurons (True) or keep every shape (False).

    Returns:
        A new :class:`DLRM` in eval mode whose masked weights are exactly zero.
    """
    served = copy.deepcopy(model).eval()
    for mlp in served.mlps().values():
        layers = list(mlp.layers)
        weights = [(l.weight.detach() * l.mask).clone() for l in layers]
        biases = [(l.bias.detach() * l.bias_mask).clone() for l in layers]
        if remove_neurons:
            for i in range(len(layers) - 1):
                keep = neuron_alive(layers[i], layers[i + 1])
                weights[i], biases[i] = weights[i][keep], biases[i][keep]
                weights[i + 1] = weights[i + 1][:, keep]
        new = nn.ModuleList()
        for w, b in zip(weights, biases):
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            new.append(lin)
        mlp.layers = new
    for tables in (served.sparse_arch.tables, served.sparse_arch.multi_tables):
        for i, t in enumerate(tables):
            bag = _ServedBag(t.num_embeddings, t.embedding_dim, t.mode)
            with torch.no_grad():
                bag.weight.copy_(t.weight.detach() * t.mask)
            tables[i] = bag
    for p in served.parameters():
        p.requires_grad_(False)
    return served.eval()


def neuron_alive(producer: MaskedLinear, consumer: MaskedLinear) -> torch.Tensor:
    """``(producer.out_features,)`` bool: hidden neuron j survives in the served model.

    A neuron is removed (exactly, without changing any output) when its outgoing column in
    the consumer is fully masked, or when its whole row and bias are masked (it outputs ReLU(0) = 0).
    """
    return consumer.mask.any(dim=0) & (producer.mask.any(dim=1) | producer.bias_mask)


class _ServedBag(nn.EmbeddingBag):
    """``nn.EmbeddingBag`` (padding row 0) that wraps unseen ids like :class:`MaskedEmbeddingBag`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: str):
        super().__init__(num_embeddings, embedding_dim, mode=mode, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(wrap_ids(ids, self.num_embeddings))


def count_nonzero_params(model: nn.Module) -> int:
    """Number of nonzero parameter entries (masked weights count as zero only once folded)."""
    return int(sum(int((p != 0).sum()) for p in model.parameters()))
