"""A fourth pruner needs a class (a Pruner with a config_name) and a YAML in conf/pruner/: no pipeline change.

The pruner defined here keeps the first ``heads`` attention heads of every layer (head
masks set at the start of its fit) and fine-tunes under them. The test adds its YAML to a
copy of ``conf/``, composes ``pruner=keep_first_heads`` and runs ``run.train`` on a tiny
random BERT: the pipeline runs it through the protocol alone, and the served model
really has fewer heads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

import run
from conftest import CONF, TINY_BERT_CONFIG
from pipelines.configs import register_configs
from pruners.base import FitPlan, Pruner, PrunerConfigError, check_positive_int


class KeepFirstHeads(Pruner):
    """Keep the first ``heads`` attention heads of every encoder layer; fine-tune for ``epochs``.

    Args:
        heads: heads kept per layer (>= 1).
        epochs: epochs of the fine-tuning under the head masks.
        name: metric and state name.

    Raises:
        PrunerConfigError: ``heads`` or ``epochs`` below 1; at :meth:`check`, more heads than the model has.
    """

    name = "keep_first_heads"
    config_name = "keep_first_heads"

    def __init__(self, heads: int = 2, epochs: int = 1, name: str = "keep_first_heads"):
        super().__init__()
        self.heads = check_positive_int("pruner.heads", heads)
        self.epochs = check_positive_int("pruner.epochs", epochs)
        self.name = name

    def check(self, pl_module, datamodule) -> None:
        """The model's layers must have at least ``heads`` heads."""
        present = pl_module.model.layer_structure()[0][0]
        if self.heads > present:
            raise PrunerConfigError(f"pruner.heads={self.heads}: the model has {present} heads per layer.")

    def fit_plan(self) -> FitPlan:
        return FitPlan(max_epochs=self.epochs, monitor="val/accuracy")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = pl_module.model.layer_structure()
        masks = [torch.arange(a) < self.heads for a, _ in layers]
        pl_module.model.set_structured_masks(heads=[m.float() for m in masks])

    def results(self) -> dict:
        return {"method": "keep the first heads", "heads_kept_per_layer": self.heads}

    def write_files(self, out_dir: Path) -> dict[str, str]:
        (Path(out_dir) / "kept_heads.json").write_text(json.dumps({"heads": self.heads}))
        return {"kept_heads": "kept_heads.json"}


def test_a_new_pruner_runs_through_the_pipeline_with_only_its_class_and_yaml(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "pruner" / "keep_first_heads.yaml").write_text("defaults:\n  - base_keep_first_heads\n  - _self_\n")
    register_configs()  # finds the new Pruner subclass, as it finds every one in pruners/ (conftest removes it after the test)
    tiny = ",".join(f"{k}:{v}" for k, v in TINY_BERT_CONFIG.items())
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose("config", overrides=[
            f"paths.output_dir={tmp_path / 'run'}", "pruner=keep_first_heads", "pruner.heads=1", "logger=csv",
            f"model.module.bert_config={{{tiny}}}", "data.limit_per_split=24", "trainer.max_epochs=1",
            "trainer.val_check_interval=1.0", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
            "latency.batch_sizes=[1]", "latency.repeats=1", "latency.warmup=0", "latency.examples=2",
            "allow_majority_class_teacher=true",  # a tiny random BERT on 24 examples trains no real teacher
        ])
    results = run.train(cfg)
    assert results["pruner"] == {"method": "keep the first heads", "heads_kept_per_layer": 1}
    assert results["files"] == {"kept_heads": "kept_heads.json"}
    assert (tmp_path / "run" / "kept_heads.json").is_file()
    assert results["pruned"]["params"] < results["dense"]["params"]  # heads physically removed when served
    assert results["macs_reduction"] > 1.0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["pruned"]["checkpoint"].startswith("checkpoints/pruned/")
    from modules.lit.bert_classifier import BertClassifier  # the kept checkpoint serves one head in every layer

    served = BertClassifier.load_from_checkpoint(tmp_path / "run" / saved["pruned"]["checkpoint"], map_location="cpu").served_model()
    assert [h for h, _ in served.model.layer_structure()] == [1] * TINY_BERT_CONFIG["num_hidden_layers"]
