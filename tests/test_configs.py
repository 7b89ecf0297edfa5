"""Every shipped config composes; settings are defined once (the constructors) and bad values fail early."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, compose_config
from pipelines.common import build
from pipelines.configs import selectable_pruners
from pruners.base import PrunerConfigError


def group(name: str) -> list[str]:
    return sorted(p.stem for p in (CONF / name).glob("*.yaml"))


@pytest.mark.parametrize("pruner", group("pruner"))
@pytest.mark.parametrize("logger", group("logger"))
def test_bert_with_every_pruner_and_logger_composes(pruner, logger):
    cfg = compose_config("model=bert", f"pruner={pruner}", f"logger={logger}")
    assert cfg.model.name == "bert" and cfg.pruner.name == pruner
    assert cfg.data._target_.endswith("RottenTomatoesDataModule")
    assert Path(cfg.model.pretrained, "config.json").is_file()  # the shipped BERT resolves
    if cfg.pruner.get("_target_"):
        build(cfg.pruner)  # validates every default setting


# a composite's YAML places other pruners' configs as its stages (tests/test_composite.py checks them)
SHIPPED_PRUNERS = [cls for cls in selectable_pruners() if cls.__module__.startswith("pruners.") and cls.config_name != "composite"]


@pytest.mark.parametrize("cls", SHIPPED_PRUNERS, ids=lambda c: c.config_name)
def test_every_pruner_has_a_yaml_and_its_defaults_are_the_constructors(cls):
    """One definition per setting: the shipped YAML adds nothing to the constructor's defaults
    (the seed, which is the run's, aside)."""
    assert cls.config_name in group("pruner")
    cfg = compose_config(f"pruner={cls.config_name}").pruner
    params = inspect.signature(cls.__init__).parameters
    for key, value in cfg.items():
        if key == "_target_" or key in cls.components:
            continue
        default = params[key].default
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        if isinstance(default, tuple):
            default = list(default)
        assert value == default or (key.endswith("seed") and value == compose_config().seed), key
    for name, component in cls.components.items():
        for key, param in inspect.signature(component.__init__).parameters.items():
            if key != "self" and not key.endswith("seed"):
                expected = list(param.default) if isinstance(param.default, tuple) else param.default
                assert OmegaConf.to_container(cfg[name])[key] == expected, f"{name}.{key}"


@pytest.mark.parametrize("data", group("data"))
def test_every_data_config_composes(data):
    cfg = compose_config(f"data={data}")
    assert cfg.data._target_


@pytest.mark.parametrize("experiment", group("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose_config(f"experiment={experiment}")
    assert cfg.model.name


def test_dlrm_takes_its_own_data_and_latency_batch_sizes():
    cfg = compose_config("model=dlrm", "pruner=d2s")
    assert cfg.data._target_.endswith("MovieLensStream") and list(cfg.latency.batch_sizes) == [1, 4096]


@pytest.mark.parametrize(
    "override, match",
    [
        ("pruner=magic", "pruner"),
        ("pruner.target_sparsty=0.4", "target_sparsty"),  # misspelled key
        ("pruner.target_sparsity=abc", "target_sparsity"),  # wrong type
        ("trainer.max_step=10", "max_step"),
        ("trainer.max_steps=ten", "max_steps"),
        ("data.limit_per_split=many", "limit_per_split"),
        ("model.module.lr=fast", "lr"),
        ("callbacks.model_checkpoint.save_lst=true", "save_lst"),
        ("latency.repeats=often", "repeats"),
        ("threads=two", "threads"),
    ],
)
def test_a_misspelled_key_or_a_wrong_type_fails_at_compose_time(override, match):
    with pytest.raises(ConfigCompositionException, match=match):
        compose_config(override)


def test_trainer_keys_need_no_plus():
    cfg = compose_config("trainer.max_steps=5", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")
    assert (cfg.trainer.max_steps, cfg.trainer.limit_train_batches, cfg.trainer.limit_val_batches) == (5, 2, 1)


def test_target_sparsity_out_of_range_is_a_config_error():
    cfg = compose_config("pruner=top", "pruner.target_sparsity=1.2")
    with pytest.raises(PrunerConfigError, match=r"pruner\.target_sparsity=1\.2 is out of range"):
        build(cfg.pruner)
