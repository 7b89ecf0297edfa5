"""The teacher cache's key covers everything the dense teacher depends on (issue 33), and the cache
never stores or serves a teacher at the majority class (issue 35)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import compose_config
from pipelines.common import build
from pipelines.teacher_cache import CKPT, cache_key, dense_teacher, key_material, store, valid_entry

#: overrides that each change what the dense teacher is: (what it is, overrides)
CHANGES = [
    ("model: another pretrained folder", lambda d: [f"model.pretrained={d / 'bert'}"]),
    ("model: the monitored metric", ["model.monitor=val/f1"]),
    ("data: max_length", ["data.max_length=64"]),
    ("data: batch size", ["data.batch_size=16"]),
    ("data: validation split", ["data.validation_fraction=0.2"]),
    ("data: split seed", ["data.split_seed=1"]),
    ("data limit: limit_per_split", ["data.limit_per_split=100"]),
    ("data limit: limit_train_batches", ["trainer.limit_train_batches=0.5"]),
    ("data limit: limit_val_batches", ["trainer.limit_val_batches=0.5"]),
    ("limit: max_steps", ["trainer.max_steps=50"]),
    ("seed", ["seed=1"]),
    ("epochs: pruner.teacher_epochs", ["pruner.teacher_epochs=2"]),
    ("early stopping: patience", ["callbacks.early_stopping.patience=3"]),
    ("early stopping: min_delta", ["callbacks.early_stopping.min_delta=0.01"]),
    ("early stopping: off", ["callbacks.early_stopping=null"]),
    ("early stopping: validations per epoch", ["trainer.val_check_interval=0.5"]),
    ("optimiser: lr", ["model.module.lr=1e-4"]),
    ("optimiser: weight decay", ["model.module.weight_decay=0.0"]),
    ("optimiser: warm-up (and the minimum of training)", ["model.module.warmup_fraction=0.2"]),
    ("optimiser: gradient clipping", ["trainer.gradient_clip_val=0.5"]),
    ("optimiser: gradient accumulation", ["trainer.accumulate_grad_batches=2"]),
    ("minimum of training: early_stopping.min_epochs", ["callbacks.early_stopping.min_epochs=2"]),
    ("minimum of training: early_stopping.min_steps", ["callbacks.early_stopping.min_steps=100"]),
    ("minimum of training: trainer.min_steps", ["trainer.min_steps=40"]),
    ("minimum of training: trainer.min_epochs", ["trainer.min_epochs=2"]),
]

#: overrides that change the run but not its dense teacher
SAME = ["pruner.target_sparsity=0.3", "pruner.pruning_epochs=2", "latency.repeats=3", "export.enabled=false",
        "trainer.enable_progress_bar=false", "allow_majority_class_teacher=true", "teacher_cache=true", "threads=1"]


def key(d: Path, *overrides: str) -> str:
    """The cache key of the dense teacher of ``python run.py <base> <overrides>``, as pipelines.flow makes it."""
    cfg = compose_config("pruner=top", "data=text_csv", f"data.path={d / 'reviews.csv'}", "logger=none", *overrides,
                         output_dir=d / "run")
    epochs = build(cfg.pruner).teacher_plan().epochs
    return cache_key(key_material(cfg, epochs, cfg.model.monitor))


@pytest.fixture
def inputs(tmp_path) -> Path:
    from modules.core.packages import default_bert_dir

    (tmp_path / "reviews.csv").write_text("text,label\n" + "".join(f"film {i},{i % 2}\n" for i in range(40)))
    os.symlink(default_bert_dir(), tmp_path / "bert")  # the same files under another folder
    return tmp_path


def test_the_key_changes_with_everything_the_teacher_depends_on(inputs):
    """Broken once (``early_stopping`` left out of ``key_material``, as before issue 33): patience,
    min_delta, ``callbacks.early_stopping=null``, ``callbacks.early_stopping.min_epochs`` and
    ``.min_steps`` kept the key, and the test failed."""
    base = key(inputs)
    assert key(inputs) == base and key(inputs, *SAME) == base
    same = [what for what, overrides in CHANGES
            if key(inputs, *(overrides(inputs) if callable(overrides) else overrides)) == base]
    assert same == [], f"the key ignores: {same}"
    with (inputs / "reviews.csv").open("a") as f:  # data: the file's content (size and time)
        f.write("another film,1\n")
    assert key(inputs) != base


def test_the_cache_never_stores_or_serves_a_teacher_at_the_majority_class(tmp_path):
    """``usable`` says whether a teacher beats the majority class. Broken once (the ``usable`` check
    after ``fit()`` removed from ``dense_teacher``): the teacher at the majority class was stored
    (``stored`` true, the entry written), and the test failed at its first check."""
    cfg = compose_config("model=dlrm", f"paths.log_dir={tmp_path}", "teacher_cache=true", output_dir=tmp_path / "run")
    fits = []

    def fit() -> str:
        path = tmp_path / f"fit{len(fits)}.ckpt"
        path.write_bytes(b"weights" * 100 + bytes([len(fits)]))
        fits.append(path)
        return str(path)

    path, rec = dense_teacher(cfg, tmp_path / "run1", 1, None, fit, multirun=False, usable=lambda p: False)
    entry = Path(rec["entry"])
    assert path == str(fits[0]) and not rec["hit"] and rec["stored"] is False and not entry.exists()
    path, rec = dense_teacher(cfg, tmp_path / "run2", 1, None, fit, multirun=False, usable=lambda p: False)
    assert len(fits) == 2 and not rec["hit"]  # nothing to serve: fitted again

    # an entry holding such a teacher (stored by an older version) is deleted and fitted again, never served
    store(entry, fits[0], {"older": True})
    asked = []
    path, rec = dense_teacher(cfg, tmp_path / "run3", 1, None, fit, multirun=False,
                              usable=lambda p: asked.append(p) or p != str(entry / CKPT))
    assert asked[0] == str(entry / CKPT) and not rec["hit"] and len(fits) == 3 and path == str(fits[2])
    assert rec["stored"] and valid_entry(entry) and (entry / CKPT).read_bytes() == fits[2].read_bytes()
    _, rec = dense_teacher(cfg, tmp_path / "run4", 1, None, fit, multirun=False, usable=lambda p: True)
    assert rec["hit"] and len(fits) == 3
