"""End to end: `python run.py model=dlrm pruner=d2s` on a slice of the real MovieLens stream."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

import run
from conftest import recheck_stream_run
from pipelines.common import build

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.slow
def test_dlrm_d2s_run_writes_results_plot_logs_and_checkpoints(tmp_path):
    """The run's files and numbers; its served models rechecked independently of its code
    (:func:`conftest.recheck_stream_run`, also run on a cheap stream by tests/test_quantize.py, where it was checked
    broken once): each exported graph in ONNX Runtime against the reloaded checkpoint's own logits on the stream's
    second half (6000 rows, within 1e-4), the MACs per sample by FlopCounterMode, the int8 copies' agreement and AUC
    recounted; the speedups are the ratios of the latencies."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            "config",
            overrides=[
                "model=dlrm",
                "pruner=d2s",
                "logger=csv",
                f"paths.output_dir={tmp_path}",
                "threads=1",
                "data.limit_rows=12000",
                "data.window=1500",
                "pruner.target_sparsity=0.5",
                "pruner.granularity=neuron",
                "pruner.update_every=5",
                "latency.repeats=2",
                "latency.warmup=1",
            ],
        )
    results = run.train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["stream"]["rows"] == 12000 and saved["stream"]["windows"] == 8
    for key in ("dense", "pruned"):
        r = saved[key]
        assert set(r["metrics"]) == {"auc", "ne", "log_loss"}
        assert len(r["per_window"]["auc"]) == 8
        assert 0.5 < r["metrics"]["auc"] < 1.0  # real signal on the real stream
        assert set(r["latency_ms"]) == {"1", "4096"} and r["params"] > 0
    sp = saved["pruner"]
    assert sp["neurons_removed"] == pytest.approx(0.5, abs=0.01)
    assert set(sp["per_layer"]) == {"bottom.0", "bottom.1", "bottom.2", "top.0", "top.1", "top.2"}
    assert sp["history"][-1]["target"] == pytest.approx(0.5)
    assert saved["pruned"]["served_max_abs_logit_diff"] < 1e-4  # the shrunk copy computes the same logits
    assert saved["pruned"]["mlp_shapes"]["top.1"][1] < saved["dense"]["mlp_shapes"]["top.1"][1]  # physically smaller
    lat = {k: saved[k]["latency_ms"] for k in ("dense", "pruned")}
    assert saved["speedup"] == pytest.approx({b: lat["dense"][b] / lat["pruned"][b] for b in ("1", "4096")})
    dm = build(cfg.data)
    dm.setup()
    for key in ("dense", "pruned"):  # exported, equal to the reloaded checkpoint in ONNX Runtime, timed there too
        got = recheck_stream_run(tmp_path, saved, dm, key)
        assert got["rows"] == 6000 and got["max_abs_diff"] < 1e-4, (key, got)  # float32 logits, different kernels
        assert saved[key]["macs_per_sample"] == got["macs"], key
        assert saved[key]["served"]["parity_ok"] and set(saved[key]["latency_ms_onnxruntime"]) == {"1", "4096"}
        e = saved[f"{key}-int8"]
        assert e["agreement"]["equal_predictions"] == pytest.approx(got["int8_equal_predictions"], abs=1e-12), key
        assert e["metrics"]["auc"] == pytest.approx(got["int8_auc"], abs=1e-6), key
    assert saved["pruned"]["macs_per_sample"] < saved["dense"]["macs_per_sample"]
    for key in ("dense", "pruned"):  # int8 copies (export.quantize=dynamic, MLPs only), on the second half
        e = saved[f"{key}-int8"]
        assert e["quantization"]["op_types"] == ["MatMul", "Gemm"] and set(e["latency_ms_onnxruntime"]) == {"1", "4096"}
        assert 0.5 < e["metrics"]["auc"] < 1.0 and abs(e["auc_delta_vs_fp32"]) < 0.05  # real signal survives int8
        assert e["agreement"]["examples"] == 6000 and e["agreement"]["equal_predictions"] > 0.9
    meta = json.loads((tmp_path / "served" / "pruned" / "litprune.json").read_text())
    assert meta["kind"] == "recommender" and meta["features"]["hash_buckets"] > 1
    assert meta["pruning"]["mlp_layers"]["top.1"]["shape"] == saved["pruned"]["mlp_shapes"]["top.1"]
    assert saved["auc_delta"] == pytest.approx(results["pruned"]["metrics"]["auc"] - results["dense"]["metrics"]["auc"])
    assert saved["files"] == {"sparsity_history": "sparsity_history.png", "auc_per_window": "stream_auc.png"}
    for name in saved["files"].values():
        assert (tmp_path / name).stat().st_size > 0
    # a finished phase keeps one checkpoint (no optimizer state) and its completion record
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "pruned").iterdir()) == ["complete.json", "final.ckpt"]
    logged = pd.concat(pd.read_csv(p) for p in (tmp_path / "csv").rglob("metrics.csv"))
    assert {"stream/auc", "pruner/sparsity", "pruner/sparsity/top.0"} <= set(logged.columns)
