"""Structured configs: the schema every YAML file in ``conf/`` extends, registered in Hydra's ConfigStore.

Every setting is defined once, in the constructor of the class it configures (its
signature holds the default, its docstring the meaning). :func:`schema` turns a
constructor into a structured config with ``hydra_zen.builds(populate_full_signature=True)``,
and the YAML files extend these schemas (``defaults: [base_top, _self_]``), so:

* a misspelled key (``pruner.target_sparsty=0.4``) or a wrong type
  (``pruner.target_sparsity=abc``) fails at compose time with Hydra's message;
* ``python run.py pruner=top --cfg job --package pruner`` prints every setting and its default;
* tests compose the shipped configs and build what users run.

:func:`register_configs` also registers the ``${litprune.bert_dir:}`` resolver. Every entry
point imports this module (``run.py`` through ``pipelines``), and launcher workers, which
unpickle the task function, import it with it.
"""

from __future__ import annotations

import importlib
import pkgutil
import types
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Optional

import lightning as L
from hydra.core.config_store import ConfigStore
from hydra_zen import BuildsFn
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from omegaconf import OmegaConf

from modules.lit.bert_classifier import BertClassifier
from modules.lit.dlrm import DLRMModule
from modules.core.packages import default_bert_dir
from modules.data.stream_data import CriteoStream, CsvStream, MovieLensStream
from modules.data.text_data import GlueDataModule, RottenTomatoesDataModule, TextFileDataModule
from pipelines.common import RUN_SET_CALLBACK_KEYS
from pipelines.teacher import EarlyStoppingAfterMinimum
from pruners.base import Pruner


class _Builds(BuildsFn):
    """hydra-zen's ``builds`` that also types ``X | None`` annotations as ``Optional[X]`` (checked by OmegaConf).

    Dict-typed arguments stay untyped (``Any``): OmegaConf cannot assign a dict to an
    ``Optional[Dict]`` node that is None, which a command-line override needs.
    """

    @classmethod
    def _sanitized_type(cls, type_: Any, *args, **kwargs) -> Any:
        if isinstance(type_, types.UnionType):
            type_ = typing.Union[type_.__args__]
        if any(a is dict or typing.get_origin(a) is dict for a in (type_, *typing.get_args(type_))):
            return Any
        return super()._sanitized_type(type_, *args, **kwargs)


def schema(target: Any, exclude: tuple[str, ...] = (), run_set: tuple[str, ...] = (), **fields: Any) -> Any:
    """A structured config (dataclass type) of ``target``'s constructor signature: the user's settings.

    Args:
        target: a class or function; every parameter becomes a typed field with its default
            (no default: ``???``, which the YAML or the caller must fill in).
        exclude: parameters that are no setting: what the run passes itself (sizes from the data)
            and test-only hooks; they are not keys (an override fails at compose time).
        run_set: parameters the run sets itself that users might try to set
            (``pipelines.common.RUN_SET_CALLBACK_KEYS``): untyped keys, null, and refused with
            the reason when given a value.
        fields: fields to set or add, e.g. nested ``schema(...)`` nodes for component arguments.
    """
    if not exclude and not run_set:
        return _Builds.builds(target, populate_full_signature=True, **fields)
    bases = (make_dataclass(f"RunSet{target.__name__}", [(k, Any, None) for k in run_set]),) if run_set else ()
    return _Builds.builds(target, populate_full_signature=True, zen_exclude=(*exclude, *run_set), builds_bases=bases, **fields)


@dataclass
class LatencyConfig:
    """How a run times its final models (see ``modules.served.latency``).

    Attributes:
        batch_sizes: batch sizes to time.
        warmup: untimed calls per model before timing.
        repeats: timed rounds (interleaved across models); the figure is the median, ms.
        examples: text: inputs are the first ``max(examples, batch size)`` test examples.
        threads: torch intra-op threads while timing (None: the training count, ``threads``).
    """

    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 3
    repeats: int = 15
    examples: int = 32
    threads: Optional[int] = None


@dataclass
class ExportConfig:
    """How a run exports its final models for serving (see ``pipelines.export``).

    Attributes:
        enabled: export every final model to ``served/<name>/`` (ONNX) and time it in ONNX Runtime.
        opset: ONNX opset of the exported graphs (>= 17).
        parity_examples: ONNX Runtime's logits are compared with PyTorch's on this many first test inputs.
        max_abs_diff: the largest logit difference that counts as parity (a larger one is flagged).
        quantize: int8 copy of every served model, ``served/<name>-int8/`` (``pipelines.quantize``):
            ``none``, ``dynamic`` (ONNX Runtime ``quantize_dynamic``, QInt8 weights, activations
            quantized per batch) or ``static`` (``quantize_static``, calibrated activation ranges).
        quant_format: static only: ``qdq`` (QuantizeLinear/DequantizeLinear pairs) or ``qoperator`` (QLinear* operators).
        calibration_examples: static only: the first this many training examples calibrate the
            activation ranges (text: training split in order; stream: rows evenly spaced over the stream).
        quantize_op_types: operator types to quantize (null: text every type ONNX Runtime
            quantizes; recommender ``MatMul`` and ``Gemm``, so embedding tables stay fp32).
        quantize_preprocess: apply ONNX Runtime's ``quant_pre_process`` (shape inference, graph
            optimisation) before quantizing.
    """

    enabled: bool = True
    opset: int = 18
    parity_examples: int = 256
    max_abs_diff: float = 1e-4
    quantize: str = "dynamic"
    quant_format: str = "qdq"
    calibration_examples: int = 256
    quantize_op_types: Optional[list[str]] = None
    quantize_preprocess: bool = True


@dataclass
class ModelConfig:
    """The ``model`` group: which LightningModule, with which task.

    Attributes:
        name: short name (``bert``, ``dlrm``), used in run and W&B names.
        task: what differs between kinds of model in a run (``_target_``: a
            :class:`pipelines.tasks.base.Task`, e.g. ``pipelines.tasks.stream.StreamTask``), :mod:`pipelines.flow`.
        pipeline: removed (the task replaced it); a config that still sets it is refused with one line
            (``run.check_run_settings``), so a model config from before the change cannot run a flow it did not name.
        module: the LightningModule's node (``_target_`` and constructor settings).
        pretrained: text: local Hugging Face BERT folder (default: the shipped MiniLM).
        monitor: text: the metric that picks the dense model's checkpoint.
        trainer: trainer settings the model needs, applied over ``cfg.trainer``; a command-line
            ``trainer.<key>`` for one of them is refused (``pipelines.common.check_settings_apply``).
    """

    name: str = "???"
    task: Any = None
    pipeline: Optional[str] = None
    module: Any = None
    pretrained: Optional[str] = None
    monitor: Optional[str] = None
    trainer: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoPrunerConfig:
    """``pruner=none``: plain fine-tuning (text) or the dense model alone (stream)."""

    name: str = "none"


@dataclass
class RunConfig:
    """The root config (``conf/config.yaml``); the groups are typed by their own schemas.

    Attributes:
        task_name: names the run dir and the W&B runs (``<model>-<pruner>``).
        seed: seeds Lightning, the data order and the pruners' own generators.
        debug: a user error shows its traceback instead of one line.
        threads: torch intra-op threads for training (None: the cores the process may use,
            capped by torch's default; ``pipelines.threads``). Latency has its own, ``latency.threads``.
        optimized_metric: dotted path into results.json that ``main`` returns to sweepers, or a
            list of them for a multi-objective search (``hparams_search=top_optuna``).
        teacher_cache: reuse dense teachers across runs (``pipelines.teacher_cache``): None
            (default) in multirun jobs only, True always, False never.
        allow_majority_class_teacher: prune (and distil from) a dense model whose validation
            accuracy does not beat the majority-class rate, with a warning; False (default)
            stops the run before the pruning phase (``pipelines.teacher``).
        latency: how final models are timed.
        export: how final models are exported and served (ONNX, ONNX Runtime).
    """

    task_name: str = "???"
    seed: int = 42
    debug: bool = False
    threads: Optional[int] = None
    optimized_metric: Any = None
    teacher_cache: Optional[bool] = None
    allow_majority_class_teacher: bool = False
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    model: Any = None
    data: Any = None
    pruner: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    paths: Any = None


def register_configs() -> None:
    """Register the ``litprune.bert_dir`` resolver and every schema in Hydra's ConfigStore (idempotent)."""
    if not OmegaConf.has_resolver("litprune.bert_dir"):
        OmegaConf.register_new_resolver("litprune.bert_dir", default_bert_dir)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=RunConfig)
    # sizes and metrics come from the data; remove_pruned_at_eval and keep_predictions are test-only hooks
    cs.store(group="model", name="base_bert", package="model",
             node=ModelConfig(module=schema(BertClassifier, exclude=("num_labels", "metrics", "remove_pruned_at_eval"),
                                            hydra_convert="all")))
    cs.store(group="model", name="base_dlrm", package="model", node=ModelConfig(
        module=schema(DLRMModule, exclude=("num_dense", "num_embeddings", "multi_num_embeddings", "keep_predictions"))))
    for name, target in (
        ("rotten_tomatoes", RottenTomatoesDataModule),
        ("text_csv", TextFileDataModule),
        ("glue", GlueDataModule),
        ("movielens", MovieLensStream),
        ("stream_csv", CsvStream),
        ("criteo", CriteoStream),
    ):
        cs.store(group="data", name=f"base_{name}", node=schema(target))
    cs.store(group="pruner", name="base_none", node=NoPrunerConfig)
    for cls in selectable_pruners():
        cs.store(group="pruner", name=f"base_{cls.config_name}", node=pruner_schema(cls))
    cs.store(group="trainer", name="base_trainer", node=schema(L.Trainer, zen_exclude=("callbacks", "logger")))
    cs.store(group="callbacks", name="base_model_checkpoint",
             node=schema(ModelCheckpoint, run_set=tuple(RUN_SET_CALLBACK_KEYS["model_checkpoint"])))
    cs.store(group="callbacks", name="base_lr_monitor", node=schema(LearningRateMonitor))
    cs.store(group="callbacks", name="base_early_stopping",
             node=schema(EarlyStoppingAfterMinimum, run_set=tuple(RUN_SET_CALLBACK_KEYS["early_stopping"])))
    cs.store(group="logger", name="base_wandb", node=schema(WandbLogger, group=None, job_type=None))
    cs.store(group="logger", name="base_csv", node=schema(CSVLogger))
    cs.store(group="logger", name="base_tensorboard", node=schema(TensorBoardLogger))


def selectable_pruners() -> list[type[Pruner]]:
    """Every :class:`~pruners.base.Pruner` subclass that sets ``config_name``, after importing every
    module of the ``pruners`` package (so a new pruner needs no change here), sorted by config name."""
    import pruners

    for info in pkgutil.walk_packages(pruners.__path__, "pruners."):
        importlib.import_module(info.name)
    found, todo = {}, [Pruner]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__dict__.get("config_name"):
            found[cls.config_name] = cls
    return [found[k] for k in sorted(found)]


def pruner_schema(cls: type[Pruner]) -> Any:
    """A pruner's schema: its constructor, with its components (``cls.components``) as nested ``_target_`` nodes."""
    return schema(cls, **{arg: schema(component) for arg, component in cls.components.items()})


register_configs()
