"""End to end: run.py's train() with the real configs on a small slice of the real data and the real BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import run
from modules.bert_classifier import BertClassifier
from pipelines.common import build
from pipelines.text import evaluate_test_split

CONF = Path(__file__).resolve().parents[1] / "conf"

SMALL = [
    "logger=csv",
    "allow_majority_class_teacher=true",  # 64 examples train no real teacher: these runs check the pipeline (issue 35)
    "data.limit_per_split=64",
    "trainer.max_epochs=1",
    "trainer.val_check_interval=1.0",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "latency.batch_sizes=[1,4]",
    "latency.examples=4",
    "latency.repeats=2",
    "latency.warmup=1",
]


@pytest.mark.slow
def test_top_main_job_on_a_slice_writes_results_and_reloads(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            "config",
            overrides=[f"paths.output_dir={tmp_path}", "model=bert", "pruner=top", "pruner.teacher_epochs=1",
                       "pruner.pruning_epochs=1", *SMALL],
        )
    results = run.train(cfg)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["pruned"]["metrics"] == pytest.approx(results["pruned"]["metrics"])
    for name in ("dense", "pruned"):
        entry = on_disk[name]
        assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0 and "f1" in entry["metrics"]
        assert set(entry["latency_ms"]) == {"1", "4"} and all(v > 0 for v in entry["latency_ms"].values())
        assert entry["macs_per_sample"] > 0
    assert set(on_disk["speedup"]) == {"1", "4"}
    assert on_disk["macs_reduction"] == pytest.approx(
        on_disk["dense"]["macs_per_sample"] / on_disk["pruned"]["macs_per_sample"]
    )
    assert "threads" in on_disk["latency_protocol"]
    assert (tmp_path / "csv" / "dense").is_dir() and (tmp_path / "csv" / "pruned").is_dir()

    # Both models were exported, match PyTorch in ONNX Runtime, and were timed there too.
    for name in ("dense", "pruned"):
        served = on_disk[name]["served"]
        assert served["parity_ok"] and served["max_abs_diff"] <= 1e-4
        assert {"model.onnx", "litprune.json", "tokenizer.json"} <= {p.name for p in (tmp_path / served["folder"]).iterdir()}
        assert set(on_disk[name]["latency_ms_onnxruntime"]) == {"1", "4"}
    assert set(on_disk["speedup_onnxruntime"]) == set(on_disk["speedup_vs_dense_torch"]) == {"1", "4"}
    meta = json.loads((tmp_path / "served" / "pruned" / "litprune.json").read_text())
    assert meta["labels"] == ["rotten", "fresh"] and meta["pruning"]["token_pruning"] is not None
    assert len(meta["pruning"]["kept_tokens_per_layer_test_mean"]) == 6 and 0 < meta["pruning"]["macs_sparsity_test"] < 1

    # export.py's work on the finished run: the same export and checks, results.json updated
    from omegaconf import OmegaConf

    from pipelines.reexport import reexport

    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # what Hydra saves for run.py
    again = reexport(tmp_path, names=["pruned"])
    assert again["pruned"]["served"]["parity_ok"] and again["pruned"]["metrics"] == on_disk["pruned"]["metrics"]

    # The final checkpoint reloads (default torch loading) as the pruned model and reproduces its test accuracy.
    reloaded = BertClassifier.load_from_checkpoint(tmp_path / on_disk["pruned"]["checkpoint"])  # relative to the run dir
    assert reloaded.token_gates is not None
    datamodule = build(cfg.data)
    datamodule.setup("test")
    again = evaluate_test_split(cfg, reloaded, datamodule)
    assert again["accuracy"] == pytest.approx(on_disk["pruned"]["metrics"]["accuracy"])
