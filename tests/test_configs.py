"""Every shipped config composes; settings are defined once (the constructors) and bad values fail early."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, compose_config
from pipelines.common import RUN_SET_CALLBACK_KEYS, build
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


# ----------------------------------------------------------------------------- settings the run decides
def _command_line(*overrides: str):
    """The config of ``python run.py <overrides>`` with Hydra's run state set, as inside ``run.py``'s main
    (so :func:`pipelines.common.user_overrides` sees the command line); the caller clears it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def hydra_run_state():
    """Clears Hydra's run state (:func:`_command_line`) after the test."""
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None


RUN_SET_VALUES = {"dirpath": "/tmp/elsewhere", "monitor": "val/f1", "mode": "min", "save_top_k": 3, "save_last": False,
                  "save_weights_only": False, "save_on_train_epoch_end": True}


@pytest.mark.parametrize("callback, key", [(c, k) for c, keys in RUN_SET_CALLBACK_KEYS.items() for k in keys])
def test_a_callback_key_the_run_sets_is_refused_with_the_reason(callback, key):
    from modules.core.errors import ConfigError
    from pipelines.common import build_callbacks, check_settings_apply

    cfg = compose_config(f"callbacks.{callback}.{key}={RUN_SET_VALUES[key]}")
    why = re.escape(RUN_SET_CALLBACK_KEYS[callback][key])
    with pytest.raises(ConfigError, match=rf"^callbacks\.{callback}\.{key} is not a setting: {why}; remove the override\.$"):
        check_settings_apply(cfg, None)
    with pytest.raises(ConfigError, match=rf"callbacks\.{callback}\.{key} is not a setting"):
        build_callbacks(cfg, "dense", "val/accuracy")
    assert compose_config().callbacks[callback][key] is None  # not set by the shipped YAML


def test_the_checkpoint_callback_is_what_the_run_sets(tmp_path):
    from pipelines.common import build_callbacks

    cfg = compose_config(output_dir=tmp_path)
    (ckpt,) = [c for c in build_callbacks(cfg, "pruned", "val/accuracy_at_target", "max") if hasattr(c, "save_top_k")]
    assert (ckpt.monitor, ckpt.mode, ckpt.save_top_k, ckpt.save_last, ckpt.save_weights_only) == (
        "val/accuracy_at_target", "max", 1, False, True)
    assert ckpt.dirpath == str(tmp_path / "checkpoints" / "pruned")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["pruner=top", "trainer.max_epochs=1"],
         (r"^trainer\.max_epochs does not apply to pruner=top: its phases run "
          r"pruner\.teacher_epochs \(the dense teacher\) and pruner\.pruning_epochs; set those instead\.$")),
        (["pruner=top", f"pruner.teacher_ckpt={CONF / 'config.yaml'}", "trainer.max_epochs=1"],  # an existing file
         r"pruner=top: its phases run pruner\.pruning_epochs; set that instead\.$"),
        (["pruner=swiftpruner", "trainer.max_epochs=1"],
         r"pruner\.teacher_epochs \(the dense teacher\) and pruner\.finetune_epochs; set those instead"),
        (["pruner=layerdrop", "trainer.max_epochs=1"], r"pruner=layerdrop: its phases run .*pruner\.finetune_epochs"),
        (["pruner=swiftpruner_top", "trainer.max_epochs=1"],
         (r"pruner=swiftpruner_top: its phases run pruner\.teacher_epochs \(the dense teacher\) and "
          r"pruner\.stages\.structure\.finetune_epochs and pruner\.stages\.tokens\.pruning_epochs")),
        (["model=dlrm", "pruner=d2s", "trainer.max_epochs=2"],
         (r"^trainer\.max_epochs does not apply to model=dlrm: "
          r"its fits run model\.trainer\.max_epochs=1 \(the model needs it\); set that instead\.$")),
        (["model=dlrm", "pruner=none", "trainer.gradient_clip_val=0.5"],
         r"^trainer\.gradient_clip_val does not apply to model=dlrm: its fits run model\.trainer\.gradient_clip_val=None"),
    ],
)
def test_a_setting_the_model_or_pruner_replaces_is_refused_naming_the_one_that_applies(overrides, match, hydra_run_state):
    from modules.core.errors import ConfigError
    from pipelines.common import check_settings_apply

    cfg = _command_line(*overrides)
    pruner = build(cfg.pruner, _convert_="all") if cfg.pruner.get("_target_") else None
    with pytest.raises(ConfigError, match=match):
        check_settings_apply(cfg, pruner)


@pytest.mark.parametrize(
    "overrides",
    [
        ["pruner=none", "trainer.max_epochs=1"],  # plain fine-tuning fits for trainer.max_epochs
        ["pruner=top", "pruner.pruning_epochs=null", "trainer.max_epochs=1"],  # ToP's phase then uses it
        ["pruner=top", "pruner.pruning_epochs=1", "trainer.limit_train_batches=2"],
        ["model=dlrm", "pruner=d2s", "model.trainer.max_epochs=2"],
        ["model=dlrm", "pruner=d2s", "trainer.enable_progress_bar=false"],  # what model.trainer sets anyway
    ],
)
def test_a_setting_that_applies_is_accepted(overrides, hydra_run_state):
    from pipelines.common import check_settings_apply

    cfg = _command_line(*overrides)
    check_settings_apply(cfg, build(cfg.pruner, _convert_="all") if cfg.pruner.get("_target_") else None)


@pytest.mark.parametrize(
    "override",
    ["model.module.num_labels=3", "model.module.metrics=[f1]", "model.module.remove_pruned_at_eval=false"],
)
def test_data_sizes_and_test_hooks_are_no_user_settings(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].rsplit(".", 1)[1]):
        compose_config(override)
    with pytest.raises(ConfigCompositionException, match="keep_predictions"):
        compose_config("model=dlrm", "pruner=d2s", "model.module.keep_predictions=true")
