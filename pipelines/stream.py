"""The stream pipeline (``model.pipeline=stream``): a dense reference and a pruned DLRM on one stream.

``run(cfg, out_dir)``:

1. loads the stream (``cfg.data``) once;
2. phase ``dense``: seeds, builds the DLRM (``cfg.model.module``) and trains it
   prequentially over the windows (score each window, then train on it);
3. phase ``pruned`` (when ``cfg.pruner`` has a ``_target_``): the same seed, the same
   stream, with the pruner callback;
4. exports served copies (masks folded, dead neurons removed), checks they compute the
   same logits, measures their CPU latency interleaved (``pipelines.latency``);
   with an A/A control (the dense copy timed twice; ``latency_aa_ratio`` near 1 says
   the machine was quiet enough for the speedups to mean something);
5. plots AUC per window (dense vs pruned) and per-layer sparsity over the stream
   (PNG, also logged to W&B), and returns the results dict (``results.json``).

Headline metrics are means over the *second half* of the stream's windows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from modules.dlrm import DLRMModule, count_nonzero_params, export_served
from pipelines.common import build, build_callbacks, build_loggers, build_trainer, finish_loggers
from pipelines.latency import measure_latency_ms, protocol
from pruners.base import pruners_of

log = logging.getLogger(__name__)

METRICS = ("auc", "ne", "log_loss")
PLOT_FILE = "stream_auc_sparsity.png"


def second_half_means(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean AUC, NE and log loss over windows ``n // 2 .. n - 1`` (NaN windows skipped; NaN if none)."""
    half = records[len(records) // 2 :]
    out = {}
    for key in METRICS:
        vals = [r[key] for r in half if r[key] is not None and not math.isnan(r[key])]
        out[key] = sum(vals) / len(vals) if vals else math.nan
    return out


def per_window(records: list[dict[str, Any]]) -> dict[str, list]:
    """Column lists of the per-window records: window, start (s), rows, ctr, auc, ne, log_loss."""
    keys = ("window", "start", "rows", "ctr", *METRICS)
    return {k: [r.get(k) for r in records] for k in keys}


def build_module(cfg: DictConfig, dm) -> DLRMModule:
    """The DLRM LightningModule from ``cfg.model.module`` with the data's feature sizes."""
    return build(cfg.model.module, **dm.model_sizes(), _convert_="all")


def fit_phase(cfg: DictConfig, dm, phase: str, pruner=None, after_fit=None) -> tuple[DLRMModule, list]:
    """Seed, build, and train one phase over the whole stream; return the module and its pruners.

    ``after_fit(module, loggers)`` runs before the phase's loggers are finished (to log plots).
    """
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, dm)
    loggers = build_loggers(cfg, phase)
    callbacks = build_callbacks(cfg, phase, monitor=None, has_logger=bool(loggers))
    if pruner is not None:
        callbacks.append(pruner)
    overrides = OmegaConf.to_container(cfg.model.get("trainer") or {}, resolve=True)
    trainer = build_trainer(cfg, phase, callbacks, loggers, **overrides)
    try:
        trainer.fit(module, datamodule=dm)
        if after_fit is not None:
            after_fit(module, loggers)
    finally:
        finish_loggers(loggers)
    return module, pruners_of(trainer)


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


def plot_stream(results: dict[str, Any], path: Path) -> Path:
    """PNG: AUC per window (dense vs pruned) and per-layer MLP sparsity over the stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned = results.get("pruned")
    fig, axes = plt.subplots(1, 2 if pruned else 1, figsize=(12 if pruned else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for key, style in (("dense", "-"), ("pruned", "--")):
        if key in results:
            pw = results[key]["per_window"]
            ax.plot(pw["window"], pw["auc"], style, marker=".", label=key)
    n = len(results["dense"]["per_window"]["window"])
    ax.axvline(n // 2 - 0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("window (prequential: scored before training)")
    ax.set_ylabel("ROC AUC")
    ax.set_title("AUC per window")
    ax.legend()
    if pruned:
        ax = axes[0, 1]
        history = pruned["sparsity"]["history"]
        steps = [h["step"] for h in history]
        for layer in pruned["sparsity"]["per_layer"]:
            ax.plot(steps, [h["layers"][layer] for h in history], label=layer)
        ax.plot(steps, [h["overall"] for h in history], "k-", lw=2, label="overall")
        ax.plot(steps, [h["target"] for h in history], "k:", label="schedule")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("sparsity (fraction of weights)")
        ax.set_title("achieved per-layer sparsity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Dense reference and pruned DLRM on the same stream and seed; returns the results dict.

    Raises:
        modules.text_data.DataError: unusable data; pruners.base.PrunerConfigError: bad pruner settings.
    """
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    dm = build(cfg.data, _convert_="all")
    dm.setup("fit")
    results: dict[str, Any] = {
        "task": cfg.task_name,
        "seed": cfg.seed,
        "stream": dm.describe(),
        "evaluation": "prequential: every window is scored by the model as it stands, then trained on; "
        "metrics are means over the second half of the windows",
        "model": OmegaConf.to_container(cfg.model.module, resolve=True),
    }

    dense, _ = fit_phase(cfg, dm, "dense")
    results["dense"] = {"metrics": second_half_means(dense.window_records), "per_window": per_window(dense.window_records)}

    pruned = pruner = None
    has_pruner = cfg.get("pruner") is not None and "_target_" in cfg.pruner
    plot_path = Path(out_dir) / PLOT_FILE
    if has_pruner:
        pruner = build(cfg.pruner, _convert_="all")
        results["pruner"] = OmegaConf.to_container(cfg.pruner, resolve=True)

        def after_fit(module, loggers):
            summary = pruner.summary()
            results["pruned"] = {
                "metrics": second_half_means(module.window_records),
                "per_window": per_window(module.window_records),
                "sparsity": {
                    "overall": summary["overall"],
                    "masked": summary["masked"],
                    "per_layer": summary["per_layer"],
                    "neurons_removed": summary["neurons_removed"],
                    "history": summary["history"],
                },
                "pruner": {k: v for k, v in summary.items() if k != "history"},
            }
            plot_stream(results, plot_path)
            for logger in loggers:
                if type(logger).__name__ == "WandbLogger":
                    logger.log_image(key="stream/auc_and_sparsity", images=[str(plot_path)])

        pruned, _ = fit_phase(cfg, dm, "pruned", pruner=pruner, after_fit=after_fit)
    else:
        plot_stream(results, plot_path)
    results["plot"] = str(plot_path)

    # served copies, equivalence check, latency
    served = {"dense": export_served(dense.model, remove_neurons=True)}
    if pruned is not None:
        served["pruned"] = export_served(pruned.model, remove_neurons=True)
        x = latency_inputs(dm, min(4096, len(dm.stream)))
        with torch.no_grad():
            diff = (served["pruned"](*x) - pruned.score({"dense": x[0], "sparse": x[1], "multi": x[2], "label": x[0][:, 0]})).abs().max()
        results["pruned"]["served_max_abs_logit_diff"] = float(diff)
    for key, model in served.items():
        results[key]["params"] = count_nonzero_params(model)
        results[key]["mlp_params"] = int(sum(int((l.weight != 0).sum()) for m in model.mlps().values() for l in m.layers))
        results[key]["macs_per_sample"] = served_macs(model)
        results[key]["mlp_shapes"] = {f"{m}.{i}": list(l.weight.shape) for m, mlp in model.mlps().items() for i, l in enumerate(mlp.layers)}
    lat = cfg.get("latency") or {}
    threads = int(cfg.get("threads") or torch.get_num_threads())
    for b in lat.get("batch_sizes", [1, 4096]):
        x = latency_inputs(dm, int(b))
        calls = {k: (lambda m=m: m(*x)) for k, m in served.items()}
        calls["dense_again"] = lambda: served["dense"](*x)  # A/A control: the same model timed twice
        ms = measure_latency_ms(calls, warmup=int(lat.get("warmup", 3)), repeats=int(lat.get("repeats", 15)), threads=threads)
        for k in served:
            results[k].setdefault("latency_ms", {})[str(b)] = ms[k]
        results.setdefault("latency_aa_ratio", {})[str(b)] = ms["dense"] / ms["dense_again"]
    what = "served copies (masks folded into nn.Linear/nn.EmbeddingBag"
    if pruner is not None and pruner.granularity == "neuron":
        what += "; pruned hidden neurons physically removed, so the MLPs are smaller)"
    else:
        what += "; unstructured zeros stay in dense kernels, so no speedup is expected from them)"
    results["latency_protocol"] = protocol(threads, int(lat.get("warmup", 3)), int(lat.get("repeats", 15)), what)
    if pruned is not None:
        results["speedup"] = {b: results["dense"]["latency_ms"][b] / results["pruned"]["latency_ms"][b] for b in results["dense"]["latency_ms"]}
        results["auc_delta"] = results["pruned"]["metrics"]["auc"] - results["dense"]["metrics"]["auc"]
    return results
