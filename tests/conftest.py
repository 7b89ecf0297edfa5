"""Shared test fixtures: repo root on sys.path, `slow` marker, tiny random BERT configs."""

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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test on real data (> ~20 s)")


@pytest.fixture
def tiny_bert_config() -> dict:
    """A 3-layer, hidden-32 BERT config with the real uncased WordPiece vocabulary size."""
    return dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture(autouse=True)
def _clear_hydra():
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def tiny_setup(tmp_path, tiny_bert_config):
    """(datamodule of 48 random review-like sentences, checkpoint of a tiny dense teacher fitted 1 epoch, its config)."""
    import lightning as L
    import pandas as pd
    import torch

    from modules.bert_classifier import BertClassifier
    from modules.packages import default_bert_dir
    from modules.text_data import TextFileDataModule

    words = ["good", "bad", "film", "great", "awful", "plot", "acting", "boring", "fun", "the"]
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[i] for i in torch.randint(0, 10, (int(n),), generator=g)) for n in torch.randint(4, 14, (48,), generator=g)]
    path = tmp_path / "tiny.csv"
    pd.DataFrame({"text": texts, "label": [int("good" in t) for t in texts]}).to_csv(path, index=False)
    dm = TextFileDataModule(path=str(path), tokenizer=default_bert_dir(), batch_size=8, eval_batch_size=8)
    L.seed_everything(0)
    teacher = BertClassifier(bert_config=tiny_bert_config, num_labels=2, lr=1e-3)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(teacher, datamodule=dm)
    teacher_ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(teacher_ckpt)
    return dm, teacher_ckpt, tiny_bert_config
