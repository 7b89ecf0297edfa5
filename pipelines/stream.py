"""The stream pipeline (``model.pipeline=stream``): a dense reference and a pruned DLRM on one stream.

``run(cfg, out_dir)``:

1. loads the stream (``cfg.data``) once;
2. phase ``dense``: seeds, builds the DLRM (``cfg.model.module``) and trains it
   prequentially over the windows (score each window, then train on it); in a sweep the
   dense reference comes from the teacher cache (``pipelines.teacher_cache``) after the
   first job that trains it;
3. phase ``pruned`` (when ``cfg.pruner`` has a ``_target_``): the same seed, the same
   stream, with the pruner callback (and one phase per baseline it names); the pruner's
   own figures (:meth:`~pruners.base.Pruner.results`) and files
   (:meth:`~pruners.base.Pruner.write_files`; their plots go to W&B with the results run,
   :mod:`pipelines.tracking`);
4. builds each model's served copy (``served_model()``: masks folded, dead neurons
   removed), checks it computes the same logits, measures their latency interleaved
   (``modules.served.latency``), with an A/A control (the dense copy timed twice;
   ``latency_aa_ratio`` near 1 says the machine was quiet enough for the speedups to
   mean something);
5. plots AUC per window of every model (``stream_auc.png``) and returns the results dict
   (``results.json``).

Headline metrics are means over the *second half* of the stream's windows.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from modules.core.plots import pyplot, save_figure
from modules.nn.dlrm import count_nonzero_params
from modules.served.latency import measure_latency_ms, protocol
from modules.served.served_dlrm import ExportableDLRM
from modules.data.stream_data import StreamDataModule
from pipelines.common import build, check_data_kind, fit_phase, run_relative
from pipelines.export import add_runtime_speedups, export_models, max_abs_diff, onnxruntime_version, write_served_folder
from pipelines.sweep import multirun_job
from pipelines.teacher_cache import dense_teacher
from pipelines.threads import latency_threads
from pipelines.distributed import distributed_summary, is_global_zero, memory_digest
from pruners.base import FitPlan, Pruner
from serving.runtime import graph_feeds

log = logging.getLogger(__name__)

METRICS = ("auc", "ne", "log_loss")
PLOT_FILE = "stream_auc.png"


def second_half_means(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean AUC, NE and log loss over windows ``n // 2 .. n - 1`` (NaN windows skipped; NaN if none)."""
    return window_means(records[len(records) // 2 :])


def window_means(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean AUC, NE and log loss over the given window records (NaN windows skipped; NaN if none)."""
    out = {}
    for key in METRICS:
        vals = [r[key] for r in records if r[key] is not None and not math.isnan(r[key])]
        out[key] = sum(vals) / len(vals) if vals else math.nan
    return out


def per_window(records: list[dict[str, Any]]) -> dict[str, list]:
    """Column lists of the per-window records: window, start (s), rows, ctr, auc, ne, log_loss."""
    keys = ("window", "start", "rows", "ctr", *METRICS)
    return {k: [r.get(k) for r in records] for k in keys}


def build_module(cfg: DictConfig, dm) -> L.LightningModule:
    """The stream LightningModule from ``cfg.model.module`` with the data's feature sizes."""
    return build(cfg.model.module, **dm.model_sizes(), _convert_="all")


def stream_phase(
    cfg: DictConfig, dm, phase: str, pruner: Pruner | None = None, after_fit=None
) -> tuple[L.LightningModule, str]:
    """Seed, build, and train one phase over the whole stream (one pass, prequential).

    Returns:
        (the trained module, the phase's checkpoint path).

    ``after_fit(module, loggers)`` runs before the phase's loggers are finished (to log plots).
    """
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, dm)
    plan = pruner.fit_plan() if pruner is not None else FitPlan()
    path, _ = fit_phase(cfg, phase, module, dm, plan, extra_callbacks=[pruner] if pruner is not None else [], after_fit=after_fit)
    return module, path


def latency_inputs(dm, batch_size: int) -> tuple[torch.Tensor, ...]:
    """The last ``batch_size`` rows of the stream (cycled if the stream is shorter): dense, sparse, multi."""
    s = dm.stream
    n = len(s)
    idx = torch.arange(n - batch_size, n) % n if batch_size <= n else torch.arange(batch_size) % n
    multi = s.multi[idx] if s.multi.shape[1] else None
    return s.dense[idx], s.sparse[idx], multi


def export_stream_models(
    cfg: DictConfig, out_dir: Path, served: dict[str, torch.nn.Module], dm
) -> tuple[dict[str, dict], dict[str, Any]]:
    """Export each served DLRM to ``served/<name>/`` and check ONNX Runtime against PyTorch.

    Parity inputs: the last ``export.parity_examples`` rows of the stream (its newest rows).

    Returns:
        (name -> results ``served`` entry, name -> ONNX Runtime session); see :mod:`pipelines.export`.
    """
    x = latency_inputs(dm, min(int(cfg.export.parity_examples), len(dm.stream)))
    folders, parity = {}, {}
    for name in served:
        exportable = ExportableDLRM(served[name])  # the served copy the run already built (module.exportable() would rebuild it)
        meta = {"kind": "recommender", **exportable.io_meta(), "pruning": exportable.summary()}
        folders[name] = partial(
            write_served_folder, out_dir, name, exportable, exportable.feeds(*latency_inputs(dm, 8)),
            exportable.dynamic_axes(), meta, dm.write_serving_files, int(cfg.export.opset),
        )
        with torch.no_grad():
            reference = [served[name](*x)]
        feeds = [{k: v.numpy() for k, v in exportable.feeds(*x).items()}]
        parity[name] = partial(max_abs_diff, feeds=feeds, reference=reference)
    return export_models(cfg, out_dir, folders, parity)


def quantize_stream_models(
    cfg: DictConfig, out_dir: Path, results: dict[str, Any], exported: dict[str, dict], sessions: dict[str, Any],
    served: dict[str, torch.nn.Module], dm,
) -> dict[str, Any]:
    """Make the int8 copy of every exported DLRM (``export.quantize``) and score it on the stream's second half.

    Static calibration uses ``export.calibration_examples`` rows evenly spaced over the whole
    stream (every row was trained on), in batches of 256. The fp32 models' headline metrics
    are prequential (each window scored by the model as it stood then); an int8 copy exists
    only for the final model, so its ``metrics`` are the *final* model's, quantized, on the
    second half's windows (mean over windows), beside ``metrics_fp32_final``: the fp32 final
    model in ONNX Runtime on the same rows (``auc_delta_vs_fp32`` = int8 AUC - fp32 final AUC).
    ``agreement`` (:func:`pipelines.quantize.agreement`: click predictions, logit > 0) is over the
    same rows. Other keys as :func:`pipelines.text.quantize_text_models`.

    Returns:
        int8 name -> ONNX Runtime session (timed with the others).
    """
    from modules.lit.dlrm import window_metrics
    from pipelines.quantize import agreement, int8_entry, quantize_served, record_failures, run_batches
    from serving.runtime import MODEL_FILE, make_session

    s = dm.stream
    names = list(exported)
    exportable = ExportableDLRM(served[names[0]])  # every served DLRM of a run takes the same inputs
    calibration, source = None, None
    if cfg.export.quantize == "static":
        n = min(int(cfg.export.calibration_examples), len(s))
        idx = torch.from_numpy(np.unique(np.linspace(0, len(s) - 1, n).round().astype(np.int64)))
        multi = s.multi[idx] if s.multi.shape[1] else None
        rows = exportable.feeds(s.dense[idx], s.sparse[idx], multi)
        calibration = [{k: v[i : i + 256].numpy() for k, v in rows.items()} for i in range(0, len(idx), 256)]
        source = f"{len(idx)} rows evenly spaced over the stream, batches of 256"
    folders, errors = quantize_served(cfg, out_dir, exported, calibration, source)
    record_failures(results, errors)
    if not folders:
        return {}
    bounds = s.window_bounds()
    half = bounds[len(bounds) // 2 :]
    feeds = []
    for start, end in half:
        multi = s.multi[start:end] if s.multi.shape[1] else None
        feeds.append({k: v.numpy() for k, v in exportable.feeds(s.dense[start:end], s.sparse[start:end], multi).items()})
    labels = [s.label[start:end] for start, end in half]
    out = {}
    for name, folder in folders.items():
        source_name = name.removesuffix("-int8")
        entry = int8_entry(source_name, folder, out_dir, exported[source_name]["onnx_bytes"])
        session = make_session(folder / MODEL_FILE, latency_threads(cfg))
        per = {"fp32": [], "int8": []}
        logits = {"fp32": [], "int8": []}
        for f, y in zip(feeds, labels):
            for key, sess in (("fp32", sessions[source_name]), ("int8", session)):
                z = run_batches(sess, [f]).reshape(-1)
                logits[key].append(z)
                per[key].append(window_metrics(torch.from_numpy(z), y))
        entry["evaluation"] = ("the final model, quantized, scored on the second half's windows (mean over windows); "
                               "not prequential, unlike the fp32 models' metrics: compare with metrics_fp32_final")
        entry["metrics"] = window_means(per["int8"])
        entry["metrics_fp32_final"] = window_means(per["fp32"])
        entry["auc_delta_vs_fp32"] = entry["metrics"]["auc"] - entry["metrics_fp32_final"]["auc"]
        cat = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.float32) for k, v in logits.items()}
        entry["agreement"] = {**agreement(cat["fp32"], cat["int8"]),
                              "with": f"{source_name} in ONNX Runtime, the stream's second half"}
        results[name] = entry
        out[name] = session
    return out


def served_macs(model) -> int:
    """Multiply-accumulates per sample of a served DLRM's MLPs and dot interaction (embedding lookups excluded)."""
    mlp = sum(l.weight.shape[0] * l.weight.shape[1] for m in model.mlps().values() for l in m.layers)
    f = model.sparse_arch.num_features + 1
    return int(mlp + f * f * model.sparse_arch.embedding_dim)


def serve_and_time(cfg: DictConfig, out_dir: Path, results: dict[str, Any], served: dict[str, torch.nn.Module], dm) -> None:
    """Export the served models (when ``export.enabled``), time them in PyTorch and ONNX Runtime, record it all.

    Fills, per model, ``served``, ``latency_ms`` and ``latency_ms_onnxruntime`` (by batch
    size), ``speedup`` (dense / model, PyTorch), ``speedup_onnxruntime`` and
    ``speedup_vs_dense_torch``, and the top-level ``latency_aa_ratio``, ``latency_protocol``
    and ``speedup``. With ``export.quantize``, each model's int8 copy is a model of its own
    (``<name>-int8``, :func:`quantize_stream_models`), timed in ONNX Runtime in the same rounds.
    Used by a run and by ``export.py`` on a finished run.
    """
    sessions, int8 = {}, {}
    if cfg.export.enabled:
        exported, sessions = export_stream_models(cfg, out_dir, served, dm)
        for name, entry in exported.items():
            results[name]["served"] = entry
        int8 = quantize_stream_models(cfg, out_dir, results, exported, sessions, served, dm)
    lat = cfg.latency
    threads = latency_threads(cfg)
    exportables = {k: ExportableDLRM(served[k]) for k in sessions}  # the served copies' input naming, no new copy
    source = {**{k: k for k in sessions}, **{k: k.removesuffix("-int8") for k in int8}}
    for b in lat.batch_sizes:
        x = latency_inputs(dm, int(b))
        calls = {k: (lambda m=m: m(*x)) for k, m in served.items()}
        calls["dense_again"] = lambda: served["dense"](*x)  # A/A control: the same model timed twice
        for k, session in {**sessions, **int8}.items():
            feeds = graph_feeds(session, {n: v.numpy() for n, v in exportables[source[k]].feeds(*x).items()})
            calls[f"{k}@onnxruntime"] = lambda s=session, f=feeds: s.run(None, f)
        ms = measure_latency_ms(calls, warmup=int(lat.warmup), repeats=int(lat.repeats), threads=threads)
        for k in served:
            results[k].setdefault("latency_ms", {})[str(b)] = ms[k]
            if k in sessions:
                results[k].setdefault("latency_ms_onnxruntime", {})[str(b)] = ms[f"{k}@onnxruntime"]
        for k in int8:
            results[k].setdefault("latency_ms_onnxruntime", {})[str(b)] = ms[f"{k}@onnxruntime"]
        results.setdefault("latency_aa_ratio", {})[str(b)] = ms["dense"] / ms["dense_again"]
    results["latency_protocol"] = protocol(
        threads, int(lat.warmup), int(lat.repeats),
        "served copies (modules.nn.dlrm.export_served: masks folded into nn.Linear/nn.EmbeddingBag, hidden "
        "neurons whose weights are all masked physically removed, so only neuron-level pruning shrinks the "
        "MLPs; unstructured zeros stay in dense kernels)",
    )
    if sessions:
        results["latency_protocol"]["onnxruntime"] = (
            "ONNX Runtime CPU session of served/<name>/model.onnx (graph optimisations ORT_ENABLE_ALL, sequential, "
            f"intra-op threads = threads, no spinning), onnxruntime {onnxruntime_version()}; timed in the same "
            "interleaved rounds on the same rows (int8 copies, served/<name>-int8/, too)"
        )
    for name in served:
        if name != "dense":
            d, p = results["dense"], results[name]
            p["speedup"] = {b: d["latency_ms"][b] / p["latency_ms"][b] for b in d["latency_ms"]}
    if "pruned" in results:
        results["speedup"] = results["pruned"]["speedup"]
    add_runtime_speedups(results, [*served, *int8])


def plot_stream(results: dict[str, Any], names: list[str], path: Path) -> Path:
    """PNG: ROC AUC per window of each model in ``names`` (prequential: scored before training on it)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in zip(names, ("-", "--", ":", "-.")):
        pw = results[name]["per_window"]
        ax.plot(pw["window"], pw["auc"], style, marker=".", label=name)
    n = len(results["dense"]["per_window"]["window"])
    ax.axvline(n // 2 - 0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("window (prequential: scored before training)")
    ax.set_ylabel("ROC AUC")
    ax.set_title("AUC per window (headline metrics: second half, right of the dotted line)")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Dense reference and pruned model on the same stream and seed (then any baselines); returns the results dict.

    Raises:
        modules.core.errors.DataError: unusable data.
        pruners.base.PrunerConfigError: bad pruner settings, or a pruner that cannot prune this
            model (raised before any training).
    """
    check_data_kind(cfg, StreamDataModule, "a stream (data=movielens, data=stream_csv or data=criteo)")
    pruner: Pruner | None = build(cfg.pruner, _convert_="all") if cfg.pruner.get("_target_") else None
    dm = build(cfg.data, _convert_="all")
    dm.setup("fit")
    if pruner is not None:
        pruner.check(build_module(cfg, dm), dm)
    results: dict[str, Any] = {
        "task": cfg.task_name,
        "seed": cfg.seed,
        "stream": dm.describe(),
        "evaluation": "prequential: every window is scored by the model as it stands, then trained on; "
        "metrics are means over the second half of the windows",
        "model": OmegaConf.to_container(cfg.model.module, resolve=True),
    }
    modules, checkpoints = {}, {}
    fitted: dict[str, L.LightningModule] = {}

    def fit_dense() -> str:
        """Train the dense reference over the stream; keep the module."""
        fitted["dense"], path = stream_phase(cfg, dm, "dense")
        return path

    # a sweep over pruner settings trains each distinct dense reference once (pipelines.teacher_cache)
    checkpoints["dense"], cached = dense_teacher(cfg, Path(out_dir), None, None, fit_dense, multirun_job() is not None)
    if "dense" not in fitted:  # from the cache: the phase is finished in this run dir, so this restores it
        fitted["dense"], checkpoints["dense"] = stream_phase(cfg, dm, "dense")
    modules["dense"] = fitted["dense"]
    if cached is not None:
        results["teacher_cache"] = cached
    files: dict[str, str] = {}

    def after_fit(name: str, p: Pruner):
        """Put the pruner's results and files into the run (its plots reach W&B through the results run,
        ``pipelines.tracking``)."""

        def record(module, loggers) -> None:
            results[name] = {"pruner": p.results()}
            written = p.write_files(out_dir) if is_global_zero() else {}
            files.update(written if name == "pruned" else {f"{name}/{k}": v for k, v in written.items()})

        return record

    if pruner is not None:
        modules["pruned"], checkpoints["pruned"] = stream_phase(cfg, dm, "pruned", pruner, after_fit("pruned", pruner))
        for name, baseline in pruner.baselines().items():
            modules[name], checkpoints[name] = stream_phase(cfg, dm, name, baseline, after_fit(name, baseline))
    for name, module in modules.items():
        records = module.window_records
        results.setdefault(name, {}).update(
            {"checkpoint": run_relative(checkpoints[name], out_dir), "metrics": second_half_means(records), "per_window": per_window(records)}
        )
    if "pruned" in results:
        results["pruner"] = results["pruned"].pop("pruner")
        results["target_met"] = results["pruner"].get("target_met", True)

    results["distributed"] = distributed_summary({name: memory_digest(m.model) for name, m in modules.items()})
    if not is_global_zero():  # rank 0 builds the served copies, times them and writes; the others are done
        return results
    # served copies, equivalence check, latency
    served = {name: module.served_model().model for name, module in modules.items()}  # the served networks
    x = latency_inputs(dm, min(4096, len(dm.stream)))
    for name in served:
        if name == "dense":
            continue
        with torch.no_grad():
            reference = modules[name].score({"dense": x[0], "sparse": x[1], "multi": x[2], "label": x[0][:, 0]})
            diff = (served[name](*x) - reference).abs().max()
        results[name]["served_max_abs_logit_diff"] = float(diff)
    for key, model in served.items():
        results[key]["params"] = count_nonzero_params(model)
        results[key]["mlp_params"] = int(sum(int((l.weight != 0).sum()) for m in model.mlps().values() for l in m.layers))
        results[key]["macs_per_sample"] = served_macs(model)
        results[key]["mlp_shapes"] = {f"{m}.{i}": list(l.weight.shape) for m, mlp in model.mlps().items() for i, l in enumerate(mlp.layers)}
    serve_and_time(cfg, out_dir, results, served, dm)
    for name in served:
        if name != "dense":
            results[name]["auc_delta"] = results[name]["metrics"]["auc"] - results["dense"]["metrics"]["auc"]
    if "pruned" in results:
        results["auc_delta"] = results["pruned"]["auc_delta"]
    plot_path = Path(out_dir) / PLOT_FILE
    plot_stream(results, list(modules), plot_path)
    files["auc_per_window"] = run_relative(plot_path, out_dir)
    results["files"] = files
    return results
