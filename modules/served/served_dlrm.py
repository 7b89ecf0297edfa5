"""The served DLRM as one plain tensor function, for ONNX export.

:class:`ExportableDLRM` wraps the served copy of :func:`modules.nn.dlrm.export_served` (masks
folded, dead hidden neurons removed) and computes ``(dense, sparse[, multi]) -> click
logit`` with embedding lookups written as ``Gather`` plus a masked sum or mean, the
ops every ONNX runtime has (``nn.EmbeddingBag`` has no ONNX counterpart). Ids are
wrapped into the table as :func:`modules.nn.dlrm.wrap_ids` does, so an id never seen in
training still maps to a valid row. A test checks it equals the served copy.

Shapes: ``B`` batch, ``K`` numeric features, ``F_s`` single-valued and ``F_m``
multi-valued categorical features, ``L`` longest bag, ``D`` embedding dimension.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modules.nn.dlrm import DLRM


def _lookup(weight: torch.Tensor, ids: torch.Tensor, mean: bool) -> torch.Tensor:
    """(V, D) table, (B, L) ids (0 = padding) -> (B, D) sum or mean of the non-padding rows (zeros for an empty bag)."""
    v = weight.shape[0]
    ids = torch.where(ids >= v, 1 + (ids - 1) % (v - 1), ids)
    present = (ids != 0).to(weight.dtype)
    rows = F.embedding(ids, weight) * present[..., None]  # (B, L, D); ONNX Gather
    total = rows.sum(dim=1)
    if not mean:
        return total
    return total / present.sum(dim=1, keepdim=True).clamp_min(1.0)


class ExportableDLRM(nn.Module):
    """``dense (B, K)`` float32, ``sparse (B, F_s)`` int64[, ``multi (B, F_m, L)`` int64] -> ``(B,)`` click logits.

    The multi-valued input exists only when the model has multi-valued features
    (:attr:`input_names`).

    Args:
        served: a served :class:`modules.nn.dlrm.DLRM` (from :func:`modules.nn.dlrm.export_served`);
            weights are shared.
    """

    def __init__(self, served: DLRM):
        super().__init__()
        self.model = served.eval()
        self.has_multi = len(served.sparse_arch.multi_tables) > 0
        self.input_names = ("dense", "sparse", "multi") if self.has_multi else ("dense", "sparse")

    def feeds(self, dense: torch.Tensor, sparse: torch.Tensor, multi: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The model's inputs by name (``multi`` only when the model has multi-valued features)."""
        out = {"dense": dense, "sparse": sparse}
        if self.has_multi:
            out["multi"] = multi
        return out

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Batch axis of every input and of the logits (and the bag length of ``multi``)."""
        axes = {"dense": {0: "batch"}, "sparse": {0: "batch"}, "logit": {0: "batch"}}
        if self.has_multi:
            axes["multi"] = {0: "batch", 2: "bag"}
        return axes

    def io_meta(self) -> dict[str, Any]:
        """``inputs`` and ``outputs`` of the exported graph: names, dtypes, shapes."""
        arch = self.model.sparse_arch
        inputs = [
            {"name": "dense", "dtype": "float32", "shape": ["batch", self.model.dense_arch.mlp.layers[0].in_features]},
            {"name": "sparse", "dtype": "int64", "shape": ["batch", len(arch.tables)]},
        ]
        if self.has_multi:
            inputs.append({"name": "multi", "dtype": "int64", "shape": ["batch", len(arch.multi_tables), "bag"]})
        return {"inputs": inputs, "outputs": [{"name": "logit", "dtype": "float32", "shape": ["batch"]}]}

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor, multi: torch.Tensor | None = None) -> torch.Tensor:
        """Click logits (B,) (the probability is their sigmoid)."""
        arch = self.model.sparse_arch
        vectors = [_lookup(t.weight, sparse[:, i : i + 1], mean=False) for i, t in enumerate(arch.tables)]
        if self.has_multi:
            vectors += [_lookup(t.weight, multi[:, i], mean=True) for i, t in enumerate(arch.multi_tables)]
        e = torch.stack(vectors, dim=1)
        d = self.model.dense_arch(dense)
        return self.model.over_arch(self.model.interaction(d, e))

    def summary(self) -> dict[str, Any]:
        """The served MLP shapes and sparsity per layer: ``{"mlp_layers": {name: {"shape", "sparsity"}}}``.

        ``sparsity`` is the fraction of exactly-zero weights in the exported (possibly
        shrunk) layer: unstructured pruning leaves its zeros in dense kernels.
        """
        layers = {}
        for m, mlp in self.model.mlps().items():
            for i, l in enumerate(mlp.layers):
                w = l.weight.detach()
                layers[f"{m}.{i}"] = {"shape": list(w.shape), "sparsity": float((w == 0).float().mean()) if w.numel() else 0.0}
        return {"mlp_layers": layers}
