"""Every shipped config composes, and bad values fail at compose or construction time with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import run  # noqa: F401  (registers the litprune resolvers)
from pipelines.common import build
from pruners.base import PrunerConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def group(name: str) -> list[str]:
    return sorted(p.stem for p in (CONF / name).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=["paths.output_dir=/tmp/litprune-test", *overrides])


@pytest.mark.parametrize("pruner", group("pruner"))
@pytest.mark.parametrize("logger", group("logger"))
def test_bert_with_every_pruner_and_logger_composes(pruner, logger):
    cfg = _compose(["model=bert", f"pruner={pruner}", f"logger={logger}"])
    assert cfg.model.name == "bert" and cfg.pruner.name == pruner
    assert cfg.data._target_.endswith("RottenTomatoesDataModule")
    assert Path(cfg.model.pretrained, "config.json").is_file()  # the shipped BERT resolves
    if cfg.pruner.get("_target_"):
        build(cfg.pruner)  # validates every default setting


@pytest.mark.parametrize("data", group("data"))
def test_every_data_config_composes(data):
    cfg = _compose([f"data={data}"])
    assert cfg.data._target_


@pytest.mark.parametrize("experiment", group("experiment"))
def test_every_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.model.name


def test_unknown_group_value_is_a_composition_error():
    with pytest.raises(ConfigCompositionException, match="pruner"):
        _compose(["pruner=magic"])


def test_target_sparsity_out_of_range_is_a_config_error():
    cfg = _compose(["pruner=top", "pruner.target_sparsity=1.2"])
    with pytest.raises(PrunerConfigError, match=r"pruner\.target_sparsity=1\.2 is out of range"):
        build(cfg.pruner)
