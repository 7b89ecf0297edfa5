"""int8 copies of the served models (ONNX Runtime quantization), and how they are scored against their fp32 source.

``export.quantize`` (:class:`pipelines.configs.ExportConfig`) picks the method:

* ``none``: no int8 copy;
* ``dynamic``: ``onnxruntime.quantization.quantize_dynamic``: weights QInt8 (per tensor),
  activations quantized per batch at run time (``DynamicQuantizeLinear`` + ``MatMulInteger``);
* ``static``: ``onnxruntime.quantization.quantize_static``: weights QInt8, activations
  quantized with ranges calibrated (MinMax) on ``export.calibration_examples`` training
  examples, in ``export.quant_format`` (``qdq``: QuantizeLinear/DequantizeLinear pairs,
  int8 activations; ``qoperator``: QLinear* operators, uint8 activations, as ONNX Runtime
  recommends for each format on x86 CPUs).

Before quantizing, ``export.quantize_preprocess`` applies ONNX Runtime's recommended
pre-processing (``onnxruntime.quantization.shape_inference.quant_pre_process``: symbolic
shape inference with ``auto_merge`` of conflicting symbolic dimensions, ONNX Runtime's basic
graph optimisation, ONNX shape inference); when symbolic shape inference cannot follow a
graph, it is retried without that step, and litprune.json says which was applied.

Which operator types are quantized: ``export.quantize_op_types``, or per model kind: every
type ONNX Runtime quantizes for a text model (its embeddings' ``Gather`` included), only
``MatMul`` and ``Gemm`` for a recommender (its embedding tables stay fp32).

Each int8 copy of ``served/<name>/`` is ``served/<name>-int8/``: the same files, the
quantized ``model.onnx``, and a ``quantization`` entry in litprune.json. A graph ONNX
Runtime cannot quantize (an exception, or no node quantized) raises
:class:`QuantizationError`; the fp32 folder is never touched and no partial int8 folder is
left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from modules.core.errors import ConfigError, UserError
from serving.runtime import META_FILE, MODEL_FILE, graph_feeds

log = logging.getLogger(__name__)

MODES = ("none", "dynamic", "static")
FORMATS = ("qdq", "qoperator")
INT8_SUFFIX = "-int8"
#: operator types quantized when ``export.quantize_op_types`` is null, by model kind (None: ONNX Runtime's default)
DEFAULT_OP_TYPES: dict[str, list[str] | None] = {"text": None, "recommender": ["MatMul", "Gemm"]}
_INT8_TYPES = (2, 3)  # onnx.TensorProto.UINT8, INT8


class QuantizationError(UserError, ValueError):
    """ONNX Runtime cannot quantize a served model; the message names it and how to go on without int8."""


def check_settings(export: Any) -> None:
    """Validate the quantization settings of ``export`` (the ``export`` config node).

    Raises:
        ConfigError: an unknown ``export.quantize`` or ``export.quant_format``,
            ``export.calibration_examples`` below 1, or an empty ``export.quantize_op_types``.
    """
    mode = export.get("quantize")
    if mode not in MODES:
        raise ConfigError(f"export.quantize={mode!r} is not supported; choose one of {list(MODES)}.")
    fmt = export.get("quant_format")
    if fmt not in FORMATS:
        raise ConfigError(f"export.quant_format={fmt!r} is not supported; choose one of {list(FORMATS)}.")
    n = export.get("calibration_examples")
    if n is None or int(n) < 1:
        raise ConfigError(f"export.calibration_examples={n} must be >= 1 (training examples that calibrate export.quantize=static).")
    ops = export.get("quantize_op_types")
    if ops is not None and len(ops) == 0:
        raise ConfigError("export.quantize_op_types=[] quantizes nothing; give operator types (e.g. [MatMul,Gemm]) or null for the model kind's default.")


def int8_name(name: str) -> str:
    """The results and folder name of ``name``'s int8 copy (``pruned`` -> ``pruned-int8``)."""
    return f"{name}{INT8_SUFFIX}"


def calibration_reader(feeds: list[dict[str, np.ndarray]]):
    """An ``onnxruntime.quantization.CalibrationDataReader`` giving ``feeds`` (batches, input name -> array) in order.

    Only the names the graph takes may be in a batch (:func:`quantize_onnx` filters them).
    """
    from onnxruntime.quantization import CalibrationDataReader

    class FeedsReader(CalibrationDataReader):
        """The batches of ``feeds`` in order; ``rewind`` starts again."""

        def __init__(self):
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            """The next batch, or None when all were given."""
            return next(self._it, None)

        def rewind(self) -> None:
            """Start again from the first batch."""
            self._it = iter(feeds)

    return FeedsReader()


def _preprocess(src: Path, dst: Path) -> str:
    """Run ``quant_pre_process`` from ``src`` to ``dst``; return what was applied.

    Symbolic shape inference cannot follow every graph (e.g. data-dependent shapes); it is then skipped.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), auto_merge=True)  # without auto_merge BERT's graph is left incomplete
        return ("quant_pre_process: symbolic shape inference (auto_merge), onnxruntime basic graph optimisation, "
                "onnx shape inference")
    except Exception as err:  # noqa: BLE001  (symbolic shape inference raises assorted errors)
        log.info("quant_pre_process with symbolic shape inference failed (%s); retrying without it.", err)
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return "quant_pre_process without symbolic shape inference (it failed on this graph): onnxruntime basic graph optimisation, onnx shape inference"


def int8_initializers(path: Path) -> int:
    """Number of int8/uint8 initializers of the ONNX graph at ``path`` (0: nothing was quantized)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(1 for t in graph.initializer if t.data_type in _INT8_TYPES)


def quantize_onnx(
    src: Path,
    dst: Path,
    mode: str,
    kind: str,
    *,
    quant_format: str = "qdq",
    op_types: list[str] | None = None,
    calibration: list[dict[str, np.ndarray]] | None = None,
    preprocess: bool = True,
) -> dict[str, Any]:
    """Quantize the ONNX model ``src`` into ``dst`` with ONNX Runtime; return how (litprune.json's ``quantization``).

    Args:
        src, dst: fp32 model.onnx, and where the int8 one goes (its folder exists; a temporary
            pre-processed model is written beside it and removed).
        mode: ``dynamic`` or ``static``.
        kind: ``text`` or ``recommender`` (picks the default operator types, :data:`DEFAULT_OP_TYPES`).
        quant_format: static only: ``qdq`` or ``qoperator``.
        op_types: operator types to quantize (None: the kind's default).
        calibration: static only: calibration batches, input name -> array.
        preprocess: apply ``quant_pre_process`` first.

    Raises:
        QuantizationError: ONNX Runtime raised, or quantized no node (the message says which).
        ValueError: an unknown ``mode`` or ``quant_format``, or static without calibration batches.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in ("dynamic", "static") or quant_format not in FORMATS:
        raise ValueError(f"mode={mode!r} must be 'dynamic' or 'static' and quant_format={quant_format!r} one of {FORMATS}.")
    if mode == "static" and not calibration:
        raise ValueError("static quantization needs calibration batches.")
    ops = list(op_types) if op_types is not None else DEFAULT_OP_TYPES.get(kind)
    record: dict[str, Any] = {
        "method": f"onnxruntime.quantization.quantize_{mode}",
        "mode": mode,
        "weights": "QInt8, per tensor",
        "op_types": ops if ops is not None else "onnxruntime's default for the method",
        "onnxruntime": onnxruntime.__version__,
    }
    src, dst = Path(src).resolve(), Path(dst).resolve()
    pre = dst.with_name("preprocessed.onnx")
    # ONNX Runtime's tools may write into the current directory (an incomplete symbolic shape inference
    # saves its graph there before raising): they run from a temporary one
    cwd = contextlib.ExitStack()
    cwd.enter_context(contextlib.chdir(cwd.enter_context(tempfile.TemporaryDirectory(prefix="litprune-quant-"))))
    quiet = logging.root.manager.disable
    logging.disable(logging.INFO)  # onnxruntime.quantization logs every node it skips on the root logger
    try:
        source = src
        if preprocess:
            record["preprocess"] = _preprocess(src, pre)
            source = pre
        else:
            record["preprocess"] = None
        if mode == "dynamic":
            record["activations"] = "uint8, quantized per batch at run time"
            quantize_dynamic(str(source), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=ops)
        else:
            fmt = QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator
            act = QuantType.QInt8 if quant_format == "qdq" else QuantType.QUInt8
            names = {i.name for i in onnx.load(str(source), load_external_data=False).graph.input}
            batches = [{k: v for k, v in f.items() if k in names} for f in calibration]
            record.update({
                "format": quant_format,
                "activations": f"{'QInt8' if act == QuantType.QInt8 else 'QUInt8'}, static ranges (MinMax calibration)",
                "calibration_examples": int(sum(next(iter(b.values())).shape[0] for b in batches)),
            })
            quantize_static(str(source), str(dst), calibration_reader(batches), quant_format=fmt, op_types_to_quantize=ops,
                            activation_type=act, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    except Exception as err:  # noqa: BLE001  (onnxruntime.quantization raises assorted errors)
        raise QuantizationError(f"ONNX Runtime cannot quantize {src} (export.quantize={mode}): {_one_line(err)}") from err
    finally:
        logging.disable(quiet)
        pre.unlink(missing_ok=True)
        cwd.close()
    record["int8_initializers"] = int8_initializers(dst)
    if record["int8_initializers"] == 0:
        raise QuantizationError(
            f"ONNX Runtime quantized no node of {src} (export.quantize={mode}, operator types {record['op_types']}): "
            "the graph has no operator of those types with constant weights"
        )
    return record


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def write_int8_folder(
    fp32_folder: Path,
    mode: str,
    *,
    quant_format: str = "qdq",
    op_types: list[str] | None = None,
    calibration: list[dict[str, np.ndarray]] | None = None,
    calibration_source: str | None = None,
    preprocess: bool = True,
) -> Path:
    """Write ``<fp32_folder>-int8/``: the fp32 folder's files with ``model.onnx`` quantized, atomically.

    litprune.json gets ``name`` (``<name>-int8``), ``quantized_from`` (``<name>``) and
    ``quantization`` (:func:`quantize_onnx`'s record, with ``calibration_source`` for static).
    The folder is written beside (``.<name>-int8.partial``) and renamed once complete.

    Args:
        fp32_folder: a served folder (``served/<name>/``).
        mode, quant_format, op_types, calibration, preprocess: see :func:`quantize_onnx`.
        calibration_source: static: which examples calibrated (for litprune.json).

    Returns:
        the int8 folder.

    Raises:
        QuantizationError: ONNX Runtime cannot quantize the model; the message names the fp32 folder,
            which is untouched, and no partial int8 folder is left (an earlier complete one stays as it was).
    """
    from pipelines.export import replace_folder

    fp32_folder = Path(fp32_folder).resolve()
    name = int8_name(fp32_folder.name)
    final = fp32_folder.with_name(name)
    staging = final.with_name(f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    meta = json.loads((fp32_folder / META_FILE).read_text())
    try:
        for f in fp32_folder.iterdir():
            if f.name not in (MODEL_FILE, META_FILE) and f.is_file():
                shutil.copy2(f, staging / f.name)
        started = time.perf_counter()
        record = quantize_onnx(fp32_folder / MODEL_FILE, staging / MODEL_FILE, mode, meta.get("kind", ""),
                               quant_format=quant_format, op_types=op_types, calibration=calibration, preprocess=preprocess)
    except QuantizationError as err:
        shutil.rmtree(staging, ignore_errors=True)
        msg = str(err).replace(str(fp32_folder / MODEL_FILE), f"{fp32_folder.parent.name}/{fp32_folder.name}")
        raise QuantizationError(
            f"{msg}. {fp32_folder.parent.name}/{fp32_folder.name}/ (fp32) is untouched; go on without int8 with "
            "export.quantize=none (python export.py run_dir=RUN_DIR quantize=none), or change export.quantize_op_types"
        ) from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record["quantize_s"] = time.perf_counter() - started
    if mode == "static" and calibration_source:
        record["calibration_source"] = calibration_source
    meta.update({"name": name, "quantized_from": fp32_folder.name, "quantization": record})
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    replace_folder(staging, final)
    return final


def run_batches(session, feeds: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    """The session's first output on each batch (``(B_i, ...)``), concatenated along the batch axis: ``(sum B_i, ...)``."""
    outs = [session.run(None, graph_feeds(session, f))[0] for f in feeds]
    return np.concatenate(outs) if outs else np.zeros((0,), dtype=np.float32)


def agreement(fp32_logits: np.ndarray, int8_logits: np.ndarray) -> dict[str, Any]:
    """How far an int8 model's outputs are from its fp32 source's on the same inputs.

    Args:
        fp32_logits, int8_logits: ``(N, C)`` class logits (prediction: argmax over C), or
            ``(N,)`` click logits (prediction: logit > 0, i.e. probability > 0.5).

    Returns:
        ``examples`` (N), ``equal_predictions`` (fraction of the N whose prediction is the
        same), ``max_abs_logit_diff`` (largest |int8 - fp32| over every logit).

    Raises:
        ValueError: the shapes differ.
    """
    a, b = np.asarray(fp32_logits), np.asarray(int8_logits)
    if a.shape != b.shape:
        raise ValueError(f"fp32 logits {a.shape} and int8 logits {b.shape} differ in shape.")
    n = int(a.shape[0]) if a.ndim else 0
    if n == 0:
        return {"examples": 0, "equal_predictions": math.nan, "max_abs_logit_diff": math.nan}
    pa, pb = (a.argmax(axis=1), b.argmax(axis=1)) if a.ndim == 2 else (a > 0, b > 0)
    return {
        "examples": n,
        "equal_predictions": float((pa == pb).mean()),
        "max_abs_logit_diff": float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()),
    }


def quantize_served(
    cfg: Any,
    out_dir: Path,
    served: dict[str, dict[str, Any]],
    calibration: list[dict[str, np.ndarray]] | None,
    calibration_source: str | None,
) -> tuple[dict[str, Path], dict[str, str]]:
    """Quantize every exported model as ``cfg.export`` says (nothing for ``export.quantize=none``).

    Args:
        cfg: the run config (``export.*``).
        out_dir: the run dir.
        served: name -> its results ``served`` entry (``folder`` relative to the run dir).
        calibration: static: calibration batches (input name -> array); ignored otherwise.
        calibration_source: static: which examples they are, for litprune.json.

    Returns:
        (int8 name -> int8 folder, fp32 name -> the one-line error of a model that could not be quantized).
    """
    e = cfg.export
    if e.quantize == "none":
        return {}, {}
    folders, errors = {}, {}
    for name, entry in served.items():
        folder = Path(entry["folder"])
        folder = folder if folder.is_absolute() else Path(out_dir) / folder
        try:
            folders[int8_name(name)] = write_int8_folder(
                folder, str(e.quantize), quant_format=str(e.quant_format),
                op_types=list(e.quantize_op_types) if e.quantize_op_types is not None else None,
                calibration=calibration if e.quantize == "static" else None,
                calibration_source=calibration_source, preprocess=bool(e.quantize_preprocess),
            )
        except QuantizationError as err:
            log.error("%s", err)
            errors[name] = str(err)
    return folders, errors


def int8_entry(source: str, folder: Path, out_dir: Path, fp32_bytes: int) -> dict[str, Any]:
    """The results entry of an int8 model before it is scored and timed: its source, folder, size
    (``onnx_bytes``, and ``size_vs_fp32``: int8 bytes / ``fp32_bytes``) and litprune.json record."""
    from pipelines.common import run_relative

    meta = json.loads((folder / META_FILE).read_text())
    size = (folder / MODEL_FILE).stat().st_size
    return {
        "quantized_from": source,
        "quantization": meta["quantization"],
        "served": {"folder": run_relative(folder, out_dir), "onnx_bytes": size, "size_vs_fp32": size / fp32_bytes},
    }


def record_failures(results: dict[str, Any], errors: dict[str, str]) -> None:
    """Put the models that could not be quantized into ``results["quantize_errors"]`` (name -> message)."""
    if errors:
        results["quantize_errors"] = dict(errors)
    else:
        results.pop("quantize_errors", None)


def raise_if_failed(results: dict[str, Any]) -> None:
    """After results.json is written: raise the first quantization failure, so the entry point exits with status 2.

    Raises:
        QuantizationError: ``results["quantize_errors"]`` names a model.
    """
    errors = results.get("quantize_errors") or {}
    if errors:
        first = next(iter(errors.values()))
        more = f" ({len(errors) - 1} more model(s) failed too; see results.json quantize_errors)" if len(errors) > 1 else ""
        raise QuantizationError(first + more)
