"""Write a served model to ONNX and check the file (``torch.onnx.export``, ``onnx.checker``).

The models passed here are the exportable forms of the served models
(:class:`modules.served.served_bert.ExportableBert`, :class:`modules.served.served_dlrm.ExportableDLRM`):
plain tensor functions whose data-dependent steps (ToP's kept-token count) are graph
ops, so one file serves every batch size and sequence length.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from modules.core.files import atomic_path

#: ONNX opset of every exported model (the issue asks for >= 17)
OPSET = 18


def export_onnx(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: str | Path,
    dynamic_axes: dict[str, dict[int, str]],
    output_names: list[str],
    opset: int = OPSET,
) -> Path:
    """Export ``module(**inputs)`` to ``path`` with named dynamic axes, then check the file.

    Uses the TorchScript-based exporter (``dynamo=False``): ToP's kept-token count is a
    value computed from the data, and this exporter records ``torch.topk`` with that
    count as ONNX ``TopK`` with K as a graph input, which ``torch.export`` cannot trace
    without data-dependent guards (see notes on pytorch #49826).

    Args:
        module: eval-mode module whose forward takes ``inputs`` by name (in this order).
        inputs: example inputs, name -> tensor (their sizes on dynamic axes should be > 1).
        path: the ``.onnx`` file to write (its folder is created).
        dynamic_axes: input or output name -> {axis: symbolic name}, e.g. ``{"input_ids": {0: "batch", 1: "sequence"}}``.
        output_names: names of the outputs.
        opset: ONNX opset.

    Returns:
        ``path``.

    Raises:
        onnx.checker.ValidationError: the exported file is not a valid ONNX model.
    """
    import onnx

    path = Path(path)
    module.eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that the kept-token count is data dependent: that is what TopK's K input is for.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # DLRM's pairwise-interaction indexing uses fixed non-negative indices, which this warning is about.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(tmp),
            input_names=list(inputs),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
        onnx.checker.check_model(str(tmp), full_check=True)  # a file that fails the check never replaces ``path``
    return path
