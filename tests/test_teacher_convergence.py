"""The dense phase trains its teacher to convergence and says when it ends at the majority-class rate (issue 20;
the minimum of training and the refusal of issue 35 are tested in tests/test_dense_stopping.py)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pandas as pd
import pytest
from lightning.pytorch.callbacks import EarlyStopping

from conftest import compose_config
from pipelines.common import build_callbacks, format_table
from pipelines.teacher import act_on_teacher_check, majority_margin, teacher_check


def _datamodule(labels):
    return SimpleNamespace(datasets={"validation": SimpleNamespace(labels=labels)})


def test_a_teacher_at_the_majority_rate_is_flagged_and_logged(caplog):
    labels = [1] * 82 + [0] * 18  # the clothing reviews: 82% "recommended"
    with caplog.at_level(logging.WARNING, logger="pipelines.teacher"):
        check = teacher_check(None, None, _datamodule(labels), score=0.826, monitor="val/accuracy")
        act_on_teacher_check(check, prunes=False, allowed=False, run_dir="run")  # pruner=none: flagged, not refused
    assert check["majority_class_rate"] == pytest.approx(0.82) and check["validation_examples"] == 100
    assert check["majority_margin"] == pytest.approx(2 * (0.82 * 0.18 / 100) ** 0.5)
    assert check["beats_majority_class"] is False
    assert "does not beat the majority-class rate 0.8200" in caplog.text
    table = format_table({"dense": {"metrics": {"accuracy": 0.8}, "latency_ms": {"1": 1.0}, **check}})
    assert "DENSE MODEL AT THE MAJORITY CLASS" in table


def test_a_teacher_well_above_the_majority_rate_passes(caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.teacher"):
        check = teacher_check(None, None, _datamodule([1] * 60 + [0] * 40), score=0.9, monitor="val/accuracy")
        act_on_teacher_check(check, prunes=True, allowed=False, run_dir="run")
    assert check["beats_majority_class"] is True and caplog.text == ""
    assert majority_margin(0.5, 10_000) == pytest.approx(0.01)


def test_early_stopping_applies_to_the_dense_phase_only(tmp_path):
    cfg = compose_config("pruner=top", output_dir=tmp_path)
    dense = [c for c in build_callbacks(cfg, "dense", "val/accuracy", "max") if isinstance(c, EarlyStopping)]
    assert len(dense) == 1 and dense[0].monitor == "val/accuracy" and dense[0].mode == "max" and dense[0].patience == 2
    assert not [c for c in build_callbacks(cfg, "pruned", "val/accuracy_at_target", "max") if isinstance(c, EarlyStopping)]
    assert not [c for c in build_callbacks(cfg, "dense", None) if isinstance(c, EarlyStopping)]  # streams monitor nothing
    off = compose_config("pruner=top", "callbacks.early_stopping=null", output_dir=tmp_path)
    assert not [c for c in build_callbacks(off, "dense", "val/accuracy", "max") if isinstance(c, EarlyStopping)]
    assert cfg.pruner.teacher_epochs == 3  # the most epochs; convergence usually stops it earlier


def test_an_uninformative_dense_model_stops_early_and_results_say_it_is_at_the_majority_class(tmp_path):
    import run

    texts = [f"a film number {i}" for i in range(80)]
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"text": texts, "label": [int(i % 5 != 0) for i in range(80)]}).to_csv(path, index=False)  # 80% class 1
    out = tmp_path / "run"
    cfg = compose_config(
        "pruner=none", "data=text_csv", f"data.path={path}", "data.batch_size=64", "trainer.max_epochs=8",
        "trainer.val_check_interval=1.0", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "logger=none", "threads=1", "latency.batch_sizes=[1]", "latency.repeats=1", "latency.warmup=0",
        "model.module.lr=1e-5", "callbacks.early_stopping.min_steps=0", output_dir=out,  # 1 step an epoch
    )
    run.train(cfg)
    results = json.loads((out / "results.json").read_text())
    dense = results["dense"]
    assert dense["val_accuracy"] <= dense["majority_class_rate"] + dense["majority_margin"]
    assert dense["beats_majority_class"] is False
    # stopped by early stopping before trainer.max_epochs=8: the minimum is one epoch (one step), whose
    # validation sets the best score, and patience 2 ends the phase two validations later
    assert json.loads((out / "checkpoints" / "dense" / "complete.json").read_text())["global_step"] == 3
