"""Click prediction on a time-ordered stream with DLRM (``model=dlrm``): :class:`StreamTask`.

Every model (the dense reference, the pruned model, each baseline) is trained from the same
seed over the same stream, prequentially: each window is scored by the model as it stands,
then trained on. Headline metrics are means over the *second half* of the stream's windows.
Each model's served copy (``served_model()``: masks folded, dead neurons removed) is checked
against the module's own logits, timed interleaved with an A/A control (the dense copy timed
twice; ``latency_aa_ratio`` near 1 says the machine was quiet enough for the speedups to mean
something), and the AUC per window of every model is plotted (``stream_auc.png``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from modules.core.plots import pyplot, save_figure
from modules.nn.dlrm import count_nonzero_params
from modules.served.served_dlrm import ExportableDLRM
from modules.data.stream_data import StreamDataModule
from pipelines.common import build, fit_phase, run_relative
from pipelines.tasks.base import Task
from pruners.base import FitPlan

METRICS = ("auc", "ne", "log_loss")
PLOT_FILE = "stream_auc.png"
EVALUATION = ("prequential: every window is scored by the model as it stands, then trained on; "
              "metrics are means over the second half of the windows")


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


def latency_inputs(dm, batch_size: int) -> tuple[torch.Tensor, ...]:
    """The last ``batch_size`` rows of the stream (cycled if the stream is shorter): dense, sparse, multi."""
    s = dm.stream
    n = len(s)
    idx = torch.arange(n - batch_size, n) % n if batch_size <= n else torch.arange(batch_size) % n
    multi = s.multi[idx] if s.multi.shape[1] else None
    return s.dense[idx], s.sparse[idx], multi


def served_macs(model) -> int:
    """Multiply-accumulates per sample of a served DLRM's MLPs and dot interaction (embedding lookups excluded)."""
    mlp = sum(l.weight.shape[0] * l.weight.shape[1] for m in model.mlps().values() for l in m.layers)
    f = model.sparse_arch.num_features + 1
    return int(mlp + f * f * model.sparse_arch.embedding_dim)


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


class StreamTask(Task):
    """A DLRM (:class:`modules.lit.dlrm.DLRMModule`) trained prequentially on a stream (:class:`modules.data.stream_data.StreamDataModule`).

    Batches are ``(dense, sparse, multi)`` row tensors (``multi`` None without multi-valued
    features). Every phase trains a fresh module from ``cfg.seed`` over the whole stream (the
    pruner attached), and keeps the module it fitted (its window records are its test metrics).
    """

    data_needs = "a stream (data=movielens, data=stream_csv or data=criteo)"
    data_base = StreamDataModule
    checkpoint_every_batch = True
    latency_aa_control = True
    timed_on = "rows"

    def build_data(self, cfg: DictConfig) -> StreamDataModule:
        """``cfg.data`` (plain containers), set up for fitting (the stream loaded once)."""
        dm = build(cfg.data, _convert_="all")
        dm.setup("fit")
        return dm

    def build_module(self, cfg: DictConfig, datamodule) -> L.LightningModule:
        """Seed with ``cfg.seed``, then ``cfg.model.module`` with the data's feature sizes: every phase starts alike."""
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # quiet: a refused pruner's error stays the only line
        return build(cfg.model.module, **datamodule.model_sizes(), _convert_="all")

    def start_module(self, cfg: DictConfig, datamodule, checkpoint: str) -> L.LightningModule:
        """A fresh module (:meth:`build_module`): a pruner learns the stream from the start, like the dense reference."""
        return self.build_module(cfg, datamodule)

    def kept_module(self, cfg: DictConfig, datamodule, phase: str, module: L.LightningModule, checkpoint: str,
                    fitted: bool) -> L.LightningModule:
        """The fitted module itself (its window records are in memory); a phase finished elsewhere (the
        teacher cache put it in the run dir) is restored into a fresh module (``fit_phase`` restores it)."""
        if fitted:
            return module
        restored = self.build_module(cfg, datamodule)
        fit_phase(cfg, phase, restored, datamodule, FitPlan(), checkpoint_every_batch=True)
        return restored

    def describe(self, cfg: DictConfig, datamodule) -> dict[str, Any]:
        """``seed``, ``stream`` (the data's description), ``evaluation`` and ``model`` (its settings)."""
        return {
            "seed": cfg.seed,
            "stream": datamodule.describe(),
            "evaluation": EVALUATION,
            "model": OmegaConf.to_container(cfg.model.module, resolve=True),
        }

    def evaluate(self, cfg: DictConfig, datamodule, phase: str, module: L.LightningModule,
                 served: torch.nn.Module) -> dict[str, Any]:
        """``metrics``: second-half means of the module's window records; ``per_window``: every window's."""
        records = module.window_records
        return {"metrics": second_half_means(records), "per_window": per_window(records)}

    def figures(self, cfg: DictConfig, datamodule, results: dict[str, Any], modules: dict[str, L.LightningModule],
                served: dict[str, torch.nn.Module]) -> None:
        """Per model: ``served_max_abs_logit_diff`` (served copy against the module, on up to 4096 newest rows;
        pruned models), ``params`` (nonzero), ``mlp_params``, ``macs_per_sample`` (:func:`served_macs`), ``mlp_shapes``."""
        x = latency_inputs(datamodule, min(4096, len(datamodule.stream)))
        for name in served:
            if name == "dense":
                continue
            with torch.no_grad():
                reference = modules[name].score({"dense": x[0], "sparse": x[1], "multi": x[2], "label": x[0][:, 0]})
                diff = (served[name].model(*x) - reference).abs().max()
            results[name]["served_max_abs_logit_diff"] = float(diff)
        for key, copy in served.items():
            model = copy.model  # the served network
            results[key]["params"] = count_nonzero_params(model)
            results[key]["mlp_params"] = int(sum(int((l.weight != 0).sum()) for m in model.mlps().values() for l in m.layers))
            results[key]["macs_per_sample"] = served_macs(model)
            results[key]["mlp_shapes"] = {f"{m}.{i}": list(l.weight.shape) for m, mlp in model.mlps().items() for i, l in enumerate(mlp.layers)}

    def finish(self, cfg: DictConfig, datamodule, out_dir: Path, results: dict[str, Any],
               served: dict[str, torch.nn.Module]) -> dict[str, str]:
        """``auc_delta`` (model - dense, per model and for ``pruned`` at the top level); the AUC-per-window plot."""
        for name in served:
            if name != "dense":
                results[name]["auc_delta"] = results[name]["metrics"]["auc"] - results["dense"]["metrics"]["auc"]
        if "pruned" in results:
            results["auc_delta"] = results["pruned"]["auc_delta"]
        plot_path = Path(out_dir) / PLOT_FILE
        plot_stream(results, list(served), plot_path)
        return {"auc_per_window": run_relative(plot_path, out_dir)}

    def exportable(self, served: torch.nn.Module) -> ExportableDLRM:
        """The served network itself (``served.model``), wrapped (no new copy)."""
        return ExportableDLRM(served.model)

    def served_meta(self, name: str, exportable: torch.nn.Module, results: dict[str, Any]) -> dict[str, Any]:
        """``kind: recommender``, inputs and outputs, and the pruning summary."""
        return {"kind": "recommender", **exportable.io_meta(), "pruning": exportable.summary()}

    def logits(self, served: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``(B,)`` click logits of the served network (``served.model``)."""
        return served.model(*batch)

    def feeds(self, exportable: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """:meth:`modules.served.served_dlrm.ExportableDLRM.feeds`."""
        return exportable.feeds(*batch)

    def latency_batches(self, cfg: DictConfig, datamodule, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
        """One batch: the stream's newest ``batch_size`` rows."""
        return [latency_inputs(datamodule, batch_size)]

    def latency_what(self, cfg: DictConfig) -> str:
        """The served copies' forward pass on the newest rows."""
        return ("served copies (modules.nn.dlrm.export_served: masks folded into nn.Linear/nn.EmbeddingBag, hidden "
                "neurons whose weights are all masked physically removed, so only neuron-level pruning shrinks the "
                "MLPs; unstructured zeros stay in dense kernels)")

    def parity_batches(self, cfg: DictConfig, datamodule) -> list[tuple[torch.Tensor, ...]]:
        """The last ``export.parity_examples`` rows of the stream (its newest), one batch."""
        return [latency_inputs(datamodule, min(int(cfg.export.parity_examples), len(datamodule.stream)))]

    def export_example(self, cfg: DictConfig, datamodule) -> tuple[torch.Tensor, ...]:
        """The stream's newest 8 rows."""
        return latency_inputs(datamodule, 8)

    def calibration(self, cfg: DictConfig, datamodule, exportable: torch.nn.Module) -> tuple[list[dict[str, np.ndarray]], str]:
        """``export.calibration_examples`` rows evenly spaced over the whole stream (every row was trained on), batches of 256."""
        s = datamodule.stream
        n = min(int(cfg.export.calibration_examples), len(s))
        idx = torch.from_numpy(np.unique(np.linspace(0, len(s) - 1, n).round().astype(np.int64)))
        multi = s.multi[idx] if s.multi.shape[1] else None
        rows = exportable.feeds(s.dense[idx], s.sparse[idx], multi)
        feeds = [{k: v[i : i + 256].numpy() for k, v in rows.items()} for i in range(0, len(idx), 256)]
        return feeds, f"{len(idx)} rows evenly spaced over the stream, batches of 256"

    def onnx_test_split(self, datamodule) -> tuple[list[Any], list[torch.Tensor], str]:
        """The second half's windows, one batch each."""
        s = datamodule.stream
        bounds = s.window_bounds()
        half = bounds[len(bounds) // 2 :]
        batches = [(s.dense[a:b], s.sparse[a:b], s.multi[a:b] if s.multi.shape[1] else None) for a, b in half]
        return batches, [s.label[a:b] for a, b in half], "the stream's second half"

    def onnx_logits(self, output: np.ndarray) -> np.ndarray:
        """``(B,)`` click logits."""
        return output.reshape(-1)

    def onnx_scores(self, datamodule, fp32: list[np.ndarray], int8: list[np.ndarray],
                    labels: list[torch.Tensor]) -> dict[str, Any]:
        """The final model, quantized, on the second half's windows (mean over windows), beside the fp32 final
        model in ONNX Runtime on the same rows (``metrics_fp32_final``, ``auc_delta_vs_fp32`` = int8 AUC - fp32 AUC).

        The fp32 models' headline metrics are prequential (each window scored by the model as it
        stood then); an int8 copy exists only for the final model, hence this comparison.
        """
        from modules.lit.dlrm import window_metrics

        per = {key: [window_metrics(torch.from_numpy(z), y) for z, y in zip(logits, labels)]
               for key, logits in (("fp32", fp32), ("int8", int8))}
        entry = {
            "evaluation": ("the final model, quantized, scored on the second half's windows (mean over windows); "
                           "not prequential, unlike the fp32 models' metrics: compare with metrics_fp32_final"),
            "metrics": window_means(per["int8"]),
            "metrics_fp32_final": window_means(per["fp32"]),
        }
        entry["auc_delta_vs_fp32"] = entry["metrics"]["auc"] - entry["metrics_fp32_final"]["auc"]
        return entry
