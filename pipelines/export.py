"""Export every final model of a run to ONNX, check it against PyTorch in ONNX Runtime, and open it for timing.

For each final model (``dense``, ``pruned``, each baseline) the run writes
``served/<name>/``:

* ``model.onnx``: the exportable form of the module's served model
  (``exportable()``: ToP's token selection inside the graph, heads, FFN neurons and MLP
  neurons physically removed), dynamic batch (and sequence) axes, opset
  :data:`modules.served.onnx_export.OPSET`, checked with ``onnx.checker``;
* what it needs to be fed (the data module's ``write_serving_files``: ``tokenizer.json``
  for text, the feature schema for the recommender, in ``litprune.json``);
* ``litprune.json``: kind, labels, inputs and outputs with shapes, the pruning summary,
  the project version.

Parity: ONNX Runtime's logits are compared with the PyTorch served model's on the first
``export.parity_examples`` test inputs; the largest absolute difference goes to
``results[name]["served"]["max_abs_diff"]``. A folder is replaced only once its new
contents are complete (written beside it, then renamed).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig

from modules.served.onnx_export import OPSET, export_onnx
from modules.core.version import VERSION
from pipelines.common import run_relative
from pipelines.threads import latency_threads
from serving.runtime import META_FILE, MODEL_FILE, graph_feeds, make_session

log = logging.getLogger(__name__)

SERVED_DIR = "served"


def write_served_folder(
    out_dir: Path,
    name: str,
    exportable: torch.nn.Module,
    example: dict[str, torch.Tensor],
    dynamic_axes: dict[str, dict[int, str]],
    meta: dict[str, Any],
    write_extra: Callable[[Path], dict[str, Any]],
    opset: int = OPSET,
) -> Path:
    """Write ``served/<name>/`` (model.onnx, the data module's files, litprune.json) atomically.

    Args:
        out_dir: the run dir.
        name: the model's name in results.json.
        exportable: the module to export (forward takes ``example``'s inputs by name).
        example: example inputs, name -> tensor.
        dynamic_axes: symbolic axes of inputs and outputs.
        meta: what litprune.json holds besides the project version and opset
            (``kind``, ``inputs``, ``outputs``, ``pruning``, ...).
        write_extra: writes the data module's serving files into the folder and returns
            entries for litprune.json (tokenizer settings, feature schema).
        opset: ONNX opset.

    Returns:
        the folder.
    """
    final = Path(out_dir) / SERVED_DIR / name
    staging = final.with_name(f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    export_onnx(exportable, example, staging / MODEL_FILE, dynamic_axes, [o["name"] for o in meta["outputs"]], opset)
    extra = write_extra(staging)
    import onnx

    in_graph = {i.name for i in onnx.load(str(staging / MODEL_FILE), load_external_data=False).graph.input}
    meta = {**meta, "inputs": [i for i in meta["inputs"] if i["name"] in in_graph]}
    full = {"name": name, **meta, **extra, "opset": opset, "project": {"name": "litprune", "version": VERSION}}
    (staging / META_FILE).write_text(json.dumps(full, indent=2) + "\n")
    replace_folder(staging, final)
    return final


def replace_folder(staging: Path, final: Path) -> None:
    """Put the complete folder ``staging`` in place of ``final`` (the old one, if any, moved aside first, then removed)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.replace(old)
        staging.replace(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.replace(final)


def max_abs_diff(session, feeds: list[dict[str, np.ndarray]], reference: list[torch.Tensor]) -> float:
    """Largest |ONNX Runtime output - PyTorch output| over the given batches (same order)."""
    worst = 0.0
    for f, ref in zip(feeds, reference):
        got = session.run(None, graph_feeds(session, f))[0]
        worst = max(worst, float(np.abs(got - ref.detach().cpu().numpy()).max()) if got.size else 0.0)
    return worst


def export_models(
    cfg: DictConfig,
    out_dir: Path,
    folders: dict[str, Callable[[], Path]],
    parity: dict[str, Callable[[Any], float]],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Export every model, check parity, and open an ONNX Runtime session on each for timing.

    Args:
        cfg: the run config (``export.*``, ``latency.threads``).
        out_dir: the run dir.
        folders: name -> a function writing ``served/<name>/`` and returning it.
        parity: name -> a function of an ONNX Runtime session returning the max abs
            difference to the PyTorch served model.

    Returns:
        (name -> results entry ``served`` (folder, onnx_bytes, export_s, max_abs_diff,
        parity_ok), name -> session).
    """
    entries, sessions = {}, {}
    tol = float(cfg.export.max_abs_diff)
    for name, write in folders.items():
        started = time.perf_counter()
        folder = write()
        elapsed = time.perf_counter() - started
        session = make_session(folder / MODEL_FILE, latency_threads(cfg))
        diff = parity[name](session)
        if diff > tol:
            log.warning("%s: ONNX Runtime differs from PyTorch by %.2e (> export.max_abs_diff=%g).", name, diff, tol)
        entries[name] = {
            "folder": run_relative(folder, out_dir),
            "onnx_bytes": (folder / MODEL_FILE).stat().st_size,
            "export_s": elapsed,
            "max_abs_diff": diff,
            "parity_ok": diff <= tol,
        }
        sessions[name] = session
    return entries, sessions


def add_runtime_speedups(results: dict[str, Any], names: list[str]) -> None:
    """Per model: ``speedup_onnxruntime`` (dense ORT / its ORT) and ``speedup_vs_dense_torch`` (dense eager / its ORT).

    Both by batch size, with the fp32 dense model as the reference for every model, int8 copies
    included; also copied to the top level for ``pruned`` (and ``speedup_onnxruntime_int8``
    for ``pruned-int8``).
    """
    d = results["dense"]
    for name in names:
        e = results[name]
        ort_ms = e.get("latency_ms_onnxruntime")
        if not ort_ms:
            continue
        e["speedup_vs_dense_torch"] = {b: d["latency_ms"][b] / ort_ms[b] for b in ort_ms}
        if name != "dense":
            e["speedup_onnxruntime"] = {b: d["latency_ms_onnxruntime"][b] / ort_ms[b] for b in ort_ms}
    if "pruned" in names and "speedup_onnxruntime" in results["pruned"]:
        results["speedup_onnxruntime"] = results["pruned"]["speedup_onnxruntime"]
        results["speedup_vs_dense_torch"] = results["pruned"]["speedup_vs_dense_torch"]
    if "pruned-int8" in names and "speedup_onnxruntime" in results["pruned-int8"]:
        results["speedup_onnxruntime_int8"] = results["pruned-int8"]["speedup_onnxruntime"]
    elif "pruned-int8" not in results:
        results.pop("speedup_onnxruntime_int8", None)


def onnxruntime_version() -> str:
    """The installed onnxruntime version (for the latency protocol)."""
    import onnxruntime

    return onnxruntime.__version__
