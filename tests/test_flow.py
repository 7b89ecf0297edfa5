"""The run flow asks a model only through its task (pipelines/tasks/base.py): a new kind of model is a task, a
module and a config, with no edit in run.py or pipelines/flow.py.

The fake model here is a linear classifier over 4 features whose pruner masks its last feature; its
served copy physically drops masked features. ``run.train`` runs it through every step of a run:
dense phase, pruner phase, test, figures, ONNX export with parity, int8 copy, interleaved timing
with an A/A control, results.json. A config that still sets the removed ``model.pipeline`` is refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, open_dict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import compose_config
from modules.core.errors import ConfigError
from pipelines.common import build
from pipelines.tasks.base import Task
from pruners.base import Pruner, PrunerConfigError

FEATURES = 4


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of ``FEATURES`` normal features; label 1 where the first two features sum above 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


class FakeData(L.LightningDataModule):
    """Train, validation and test rows of :func:`_data` (64, 32, 32)."""

    def __init__(self):
        super().__init__()
        self.splits = {"train": _data(64, 0), "val": _data(32, 1), "test": _data(32, 2)}

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(TensorDataset(*self.splits[split]), batch_size=16)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def write_serving_files(self, folder: Path) -> dict[str, Any]:
        """Nothing besides the graph."""
        return {}


class FakeServed(nn.Module):
    """The served copy: only the kept features' weights (``(2, kept)``), the masked ones physically gone."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, kept: torch.Tensor):
        super().__init__()
        self.register_buffer("kept", kept)
        self.weight, self.bias = nn.Parameter(weight[:, kept].clone()), nn.Parameter(bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, FEATURES)`` rows -> ``(B, 2)`` logits."""
        return torch.matmul(x.index_select(1, self.kept), self.weight.t()) + self.bias


class FakeExportable(nn.Module):
    """The served copy as ONNX exports it (input ``x``, output ``logits``)."""

    def __init__(self, served: FakeServed):
        super().__init__()
        self.served = served

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.served(x)

    def io_meta(self) -> dict[str, Any]:
        return {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", FEATURES]}],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 2]}]}

    def summary(self) -> dict[str, Any]:
        return {"features_kept": int(self.served.kept.numel())}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"x": {0: "batch"}, "logits": {0: "batch"}}


class FakeModule(L.LightningModule):
    """A linear classifier (``.model``) with a feature mask (its pruning decisions, in its state)."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Linear(FEATURES, 2)
        self.register_buffer("feature_mask", torch.ones(FEATURES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.feature_mask)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def served_model(self) -> "FakeModule":
        """A copy in eval mode whose ``.model`` is the served network (the contract of every module here)."""
        served = copy.deepcopy(self, {id(self.model): None})
        kept = self.feature_mask.nonzero().flatten()
        served.model = FakeServed(self.model.weight.detach(), self.model.bias.detach(), kept)
        return served.eval()


class DropLastFeature(Pruner):
    """Masks the last feature at the start of its fit, then trains as configured."""

    name = "drop_last"

    def __init__(self, name: str = "drop_last"):
        super().__init__()
        self.name = name

    def check(self, pl_module, datamodule) -> None:
        if not isinstance(pl_module, FakeModule):
            raise PrunerConfigError("drop_last prunes the fake model only.")

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.feature_mask[-1] = 0.0

    def results(self) -> dict[str, Any]:
        return {"features_dropped": 1, "target_met": True}


class FakeTask(Task):
    """The protocol's methods for the fake model; batches are ``(B, FEATURES)`` row tensors."""

    data_needs = "the fake rows"
    data_base = FakeData
    latency_aa_control = True
    timed_on = "rows"
    calls: list[str] = []

    def build_data(self, cfg: DictConfig) -> FakeData:
        return build(cfg.data)

    def build_module(self, cfg: DictConfig, datamodule) -> FakeModule:
        FakeTask.calls.append("build_module")
        return build(cfg.model.module)

    def evaluate(self, cfg, datamodule, phase, module, served) -> dict[str, Any]:
        x, y = datamodule.splits["test"]
        with torch.no_grad():
            return {"metrics": {"accuracy": float((served.model(x).argmax(-1) == y).float().mean())}}

    def figures(self, cfg, datamodule, results, modules, served) -> None:
        for name, copy_ in served.items():
            results[name]["macs_per_sample"] = int(copy_.model.weight.numel())
            results[name]["params"] = sum(p.numel() for p in copy_.model.parameters())

    def finish(self, cfg, datamodule, out_dir, results, served) -> dict[str, str]:
        (Path(out_dir) / "fake.txt").write_text("done\n")
        return {"fake": "fake.txt"}

    def exportable(self, served: FakeModule) -> FakeExportable:
        return FakeExportable(served.model)

    def served_meta(self, name, exportable, results) -> dict[str, Any]:
        return {"kind": "fake", **exportable.io_meta(), "pruning": exportable.summary()}

    def logits(self, served, batch: torch.Tensor) -> torch.Tensor:
        return served.model(batch)

    def feeds(self, exportable, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"x": batch}

    def latency_batches(self, cfg, datamodule, batch_size: int) -> list[torch.Tensor]:
        return [datamodule.splits["test"][0][:batch_size]]

    def latency_what(self, cfg) -> str:
        return "the fake classifier on test rows"

    def parity_batches(self, cfg, datamodule) -> list[torch.Tensor]:
        return [datamodule.splits["test"][0]]

    def calibration(self, cfg, datamodule, exportable):
        return [{"x": datamodule.splits["train"][0].numpy()}], "the training rows"

    def onnx_test_split(self, datamodule):
        x, y = datamodule.splits["test"]
        return [x[:16], x[16:]], [y[:16], y[16:]], "the fake test rows"

    def onnx_scores(self, datamodule, fp32, int8, labels) -> dict[str, Any]:
        right = sum(int((z.argmax(-1) == y.numpy()).sum()) for z, y in zip(int8, labels))
        return {"metrics": {"accuracy": right / sum(len(y) for y in labels)}}


def fake_config(tmp_path: Path, *overrides: str) -> DictConfig:
    """The shipped config with the fake model, data, task and pruner in place of BERT's, small and quiet."""
    cfg = compose_config("logger=none", "threads=1", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
                         "trainer.enable_model_summary=false", "latency.batch_sizes=[1,8]", "latency.repeats=2",
                         "latency.warmup=0", *overrides, output_dir=tmp_path)
    with open_dict(cfg):
        cfg.model = {"name": "fake", "task": {"_target_": f"{__name__}.FakeTask"},
                     "module": {"_target_": f"{__name__}.FakeModule"}, "monitor": None, "trainer": {}}
        cfg.data = {"_target_": f"{__name__}.FakeData"}
        cfg.pruner = {"_target_": f"{__name__}.DropLastFeature", "name": "drop_last"}
        cfg.optimized_metric = "pruned.metrics.accuracy"
    return cfg


def test_a_new_model_runs_every_step_through_its_task_alone(tmp_path):
    """Dense and pruned phases, test, figures, export at parity, an int8 copy scored and timed, an A/A control,
    results.json: all from the fake task, module and config; the served pruned model is physically smaller."""
    import run

    FakeTask.calls.clear()
    results = run.train(fake_config(tmp_path))
    assert FakeTask.calls == ["build_module"]  # the dense model; the pruner phase starts from its checkpoint (the default)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task"] == "fake-drop_last" and saved["pruner"] == {"features_dropped": 1, "target_met": True}
    assert saved["target_met"] is True  # nothing monitored: only the pruner's own verdict counts
    for name in ("dense", "pruned"):
        entry = saved[name]
        assert (tmp_path / entry["checkpoint"]).is_file()
        assert "checkpoint_met_target" not in entry  # the plan monitors nothing
        assert 0.0 <= entry["metrics"]["accuracy"] <= 1.0
        assert set(entry["latency_ms"]) == set(entry["latency_ms_onnxruntime"]) == {"1", "8"}
        assert entry["served"]["parity_ok"], entry["served"]
        meta = json.loads((tmp_path / entry["served"]["folder"] / "litprune.json").read_text())
        assert meta["kind"] == "fake" and meta["pruning"]["features_kept"] == (4 if name == "dense" else 3)
    assert saved["pruned"]["macs_per_sample"] == 6 < saved["dense"]["macs_per_sample"] == 8
    ckpt = torch.load(tmp_path / saved["pruned"]["checkpoint"], weights_only=False)["state_dict"]
    assert ckpt["feature_mask"].tolist() == [1.0, 1.0, 1.0, 0.0]
    int8 = saved["pruned-int8"]
    assert int8["quantized_from"] == "pruned" and int8["agreement"]["examples"] == 32
    assert int8["agreement"]["with"] == "pruned in ONNX Runtime, the fake test rows"
    assert set(int8["latency_ms_onnxruntime"]) == {"1", "8"} and "speedup_onnxruntime" in int8
    d = saved["dense"]
    assert saved["speedup"] == {b: pytest.approx(d["latency_ms"][b] / saved["pruned"]["latency_ms"][b]) for b in ("1", "8")}
    assert set(saved["latency_aa_ratio"]) == {"1", "8"}  # the task asked for the A/A control
    assert "dense_again" not in saved and "rows" in saved["latency_protocol"]["onnxruntime"]
    assert saved["latency_protocol"]["what"] == "the fake classifier on test rows"
    assert saved["files"] == {"fake": "fake.txt"} and (tmp_path / "fake.txt").is_file()
    assert results["pruned"]["metrics"] == saved["pruned"]["metrics"]


def test_a_task_target_that_is_not_a_task_is_refused(tmp_path):
    """``model.task._target_`` must name a Task; and a model config without a task says what to set."""
    from pipelines.flow import build_task

    cfg = fake_config(tmp_path)
    cfg.model.task = {"_target_": f"{__name__}.FakeData"}
    with pytest.raises(ConfigError, match=r"is not a task: it must name a subclass of pipelines\.tasks\.base\.Task"):
        build_task(cfg)
    cfg.model.task = None
    with pytest.raises(ConfigError, match=r"model=fake names no task: set model\.task\._target_"):
        build_task(cfg)


@pytest.mark.parametrize("model", ["bert", "dlrm"])
def test_a_config_that_still_sets_model_pipeline_is_refused(model, tmp_path):
    """The removed ``model.pipeline`` (now ``model.task``) stops the run before anything happens, in one line."""
    import run

    cfg = compose_config(f"model={model}", "model.pipeline=text", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^model\.pipeline='text' is no longer a setting: .*delete model\.pipeline"):
        run.train(cfg)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("model, task", [("bert", "TextClassificationTask"), ("dlrm", "StreamTask")])
def test_the_shipped_models_name_their_tasks(model, task):
    """Each shipped model config builds its task by ``_target_``, and nothing sets ``model.pipeline``."""
    from pipelines.flow import build_task

    cfg = compose_config(f"model={model}")
    assert type(build_task(cfg)).__name__ == task and cfg.model.pipeline is None


@pytest.mark.parametrize("pipeline, task", [("text", "TextClassificationTask"), ("stream", "StreamTask")])
def test_export_of_a_run_saved_before_model_task_finds_its_task(tmp_path, pipeline, task):
    """export.py reads a run dir's saved config: one from before ``model.task`` (``model.pipeline`` set, no task)
    gets the task its pipeline meant, and no ``model.pipeline`` to be refused."""
    from omegaconf import OmegaConf

    from pipelines.flow import build_task
    from pipelines.reexport import load_run

    cfg = compose_config("model=bert" if pipeline == "text" else "model=dlrm", output_dir=tmp_path)
    saved = OmegaConf.to_container(cfg, resolve=False)
    saved["model"]["pipeline"], saved["model"]["task"] = pipeline, None
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(saved), tmp_path / ".hydra" / "config.yaml")
    (tmp_path / "results.json").write_text("{}")
    loaded, _ = load_run(tmp_path)
    assert "pipeline" not in loaded.model and type(build_task(loaded)).__name__ == task


def test_export_of_a_run_saved_before_the_modules_sub_packages_builds_its_data_and_module(tmp_path):
    """A run dir saved before modules/ had sub-packages names ``modules.text_data.RottenTomatoesDataModule`` and
    ``modules.bert_classifier.BertClassifier``: load_run rewrites every ``_target_`` to its new path, so the saved data
    and module nodes still instantiate (without the rewrite Hydra cannot locate them; run broken once: it failed so)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from pipelines.reexport import current_target, load_run

    assert current_target("modules.dlrm.DLRMModule") == "modules.lit.dlrm.DLRMModule"
    assert current_target("modules.dlrm.DLRM") == "modules.nn.dlrm.DLRM"
    assert current_target("modules.data.text_data.X") == "modules.data.text_data.X"  # already current
    assert current_target("pruners.top.ToPPruner") == "pruners.top.ToPPruner"
    cfg = compose_config("model=bert", "pruner=top", output_dir=tmp_path)
    saved = OmegaConf.to_container(cfg, resolve=False)
    saved["data"]["_target_"] = "modules.text_data.RottenTomatoesDataModule"
    saved["model"]["module"]["_target_"] = "modules.bert_classifier.BertClassifier"
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(saved), tmp_path / ".hydra" / "config.yaml")
    (tmp_path / "results.json").write_text("{}")
    loaded, _ = load_run(tmp_path)
    assert loaded.data._target_ == "modules.data.text_data.RottenTomatoesDataModule"
    assert get_class(loaded.model.module._target_).__name__ == "BertClassifier"
    assert loaded.pruner._target_ == "pruners.top.ToPPruner"
