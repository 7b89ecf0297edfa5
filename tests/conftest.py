"""Shared test fixtures: repo root on sys.path, the shipped configs, tiny random BERT configs, isolation.

Tests build what users run: :func:`compose_config` composes ``conf/config.yaml`` with
overrides, as ``python run.py ...`` does, and :func:`build_pruner` instantiates its pruner.
Trained fixtures (the tiny teacher) are built once per test session. pytest's settings (the
``slow`` marker, ``testpaths``) are in ``pyproject.toml``.

No test changes what the next one sees: :func:`_isolate_global_state` gives every test
torch's thread count and Hydra's ConfigStore as they were before it (``run.train`` sets the
run's thread count; a test may register configs), so the suite passes in any order
(``python -m pytest --random-order-seed=N``; ``tests/test_isolation.py`` checks it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# The project's schemas are in Hydra's ConfigStore before any test runs (registered when this
# module is imported), so :func:`_isolate_global_state` removes only what a test itself adds.
import pipelines.configs  # noqa: E402,F401


CONF = ROOT / "conf"


def compose_config(*overrides: str, output_dir: str | Path | None = None):
    """The shipped config composed with ``overrides`` (as ``python run.py <overrides>``), outputs under ``output_dir``."""
    from hydra import compose, initialize_config_dir

    import pipelines.configs  # noqa: F401  (registers the schemas and resolvers)

    out = output_dir if output_dir is not None else ROOT / "outputs" / "tests"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=[f"paths.output_dir={out}", *overrides])


def build_pruner(*overrides: str):
    """The pruner of the shipped config composed with ``overrides`` (e.g. ``"pruner=top"``)."""
    from pipelines.common import build

    return build(compose_config(*overrides).pruner)


def _store_entries(repo: dict, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every (group..., name) path of Hydra's ConfigStore repository."""
    out = set()
    for key, value in repo.items():
        out |= _store_entries(value, (*prefix, key)) if isinstance(value, dict) else {(*prefix, key)}
    return out


def _remove_store_entries(repo: dict, paths: set[tuple[str, ...]]) -> None:
    for path in paths:
        node = repo
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1], None)


@pytest.fixture(autouse=True)
def _isolate_global_state():
    """Restore torch's intra-op thread count and remove ConfigStore entries a test added, after every test.

    Hydra's own entries (group ``hydra``: launchers, sweepers, ...) are left alone: Hydra registers them
    on first use, the same every time. Guarded by ``tests/test_isolation.py`` (with this restoration
    removed, its second test fails).
    """
    import torch
    from hydra.core.config_store import ConfigStore

    threads = torch.get_num_threads()
    store = ConfigStore.instance().repo
    before = _store_entries(store)
    yield
    torch.set_num_threads(threads)
    _remove_store_entries(store, {p for p in _store_entries(store) - before if p[0] != "hydra"})


@pytest.fixture
def one_thread():
    """torch's intra-op threads set to 1 for the test (small tensors: less overhead, one reduction order),
    restored after it. Modules use it as ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recount_served(checkpoint: str | Path, datamodule) -> tuple[float, float, list[float], tuple[dict, "torch.Tensor"]]:
    """(accuracy, mean MACs per sample, mean tokens each encoder layer receives, (a padded batch of 8 test examples,
    its logits)) of the served model of ``checkpoint`` on the test split, counted one sample at a time: MACs by
    torch.utils.flop_counter.FlopCounterMode (half its FLOPs; attention on the math backend, whose two batched
    products it counts), tokens by forward pre-hooks on the encoder layers' attention."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from modules.lit.bert_classifier import BertClassifier

    served = BertClassifier.load_from_checkpoint(checkpoint, map_location="cpu").served_model()
    seen: list[int] = []
    hooks = [layer.attention.self.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
             for layer in served.model.bert.encoder.layer]
    ds = datamodule.datasets["test"]
    correct, macs, tokens = 0, [], []
    with torch.no_grad():
        for i in range(len(ds)):
            batch = datamodule.collate([ds[i]])
            seen.clear()
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as flops:
                logits = served(batch).logits
            correct += int(logits.argmax(-1).item() == int(batch["labels"]))
            macs.append(flops.get_total_flops() / 2)
            tokens.append(list(seen))
        padded = datamodule.collate([ds[i] for i in range(8)])
        padded_logits = served(padded).logits
    for h in hooks:
        h.remove()
    return correct / len(ds), sum(macs) / len(ds), [sum(c) / len(ds) for c in zip(*tokens)], (padded, padded_logits)


#: a 3-layer, hidden-32 BERT config with the real uncased WordPiece vocabulary size
TINY_BERT_CONFIG = dict(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


@pytest.fixture
def tiny_bert_config() -> dict:
    """A copy of :data:`TINY_BERT_CONFIG` (tests may change it)."""
    return TINY_BERT_CONFIG.copy()


@pytest.fixture(autouse=True)
def _clear_hydra():
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """(datamodule of 48 random review-like sentences, checkpoint of a tiny dense teacher fitted 1 epoch, its config).

    Built once per test session; tests must not modify the datamodule or the checkpoint.
    """
    import lightning as L
    import pandas as pd
    import torch

    from modules.lit.bert_classifier import BertClassifier
    from modules.core.packages import default_bert_dir
    from modules.data.text_data import TextFileDataModule

    tmp_path = tmp_path_factory.mktemp("tiny_setup")
    config = TINY_BERT_CONFIG.copy()
    words = ["good", "bad", "film", "great", "awful", "plot", "acting", "boring", "fun", "the"]
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, 10, (int(n),), generator=g)) for n in torch.randint(4, 14, (48,), generator=g)]
    path = tmp_path / "tiny.csv"
    pd.DataFrame({"text": texts, "label": [int("good" in t) for t in texts]}).to_csv(path, index=False)
    dm = TextFileDataModule(path=str(path), tokenizer=default_bert_dir(), batch_size=8, eval_batch_size=8)
    L.seed_everything(0)
    teacher = BertClassifier(bert_config=config, num_labels=2, lr=1e-3)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(teacher, datamodule=dm)
    teacher_ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(teacher_ckpt)
    return dm, teacher_ckpt, config
