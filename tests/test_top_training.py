"""ToP inside Lightning on a tiny random BERT: gates train, checkpoints keep pruner state, resume restores it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from modules.bert_classifier import BertClassifier
from pruners.top import ToPPruner


class RecordAtTrainStart(L.Callback):
    def __init__(self, pruner):
        self.pruner = pruner
        self.seen = None

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.seen = {
            "lambda1": self.pruner.lambda1.item(),
            "log_alpha": pl_module.token_gates.token.log_alpha.detach().clone(),
            "groups": [g["name"] for g in opt.param_groups],
            "maximize": [g["maximize"] for g in opt.param_groups],
            "has_state": bool(opt.state),
        }


def _pruner(teacher_ckpt, **kw):
    return ToPPruner(target_sparsity=0.5, teacher_ckpt=str(teacher_ckpt), bin_count=4, warmup_fraction=0.5,
                     gate_lr=0.1, multiplier_lr=0.1, **kw)


def test_gates_train_and_checkpoint_round_trip_restores_pruner_state(tiny_setup, tmp_path):
    dm, teacher_ckpt, _ = tiny_setup
    student = BertClassifier.load_from_checkpoint(teacher_ckpt)
    pruner = _pruner(teacher_ckpt)
    trainer = L.Trainer(max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[pruner], num_sanity_val_steps=0)
    trainer.fit(student, datamodule=dm)
    gates = student.token_gates
    assert gates is not None
    assert not torch.allclose(gates.token.log_alpha, torch.full_like(gates.token.log_alpha, 2.0))  # gates learned
    assert pruner.lambda1.item() != 0.0  # multipliers moved (ascent)
    assert all(not p.requires_grad for p in student.model.bert.embeddings.parameters())  # frozen, as in ToP
    ckpt = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(ckpt)

    # The module alone reloads as the pruned model (gates rebuilt) and gives the same logits.
    reloaded = BertClassifier.load_from_checkpoint(ckpt).eval()
    student.eval()
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, student(batch).logits)
    torch.testing.assert_close(reloaded.token_gates.token.log_alpha, gates.token.log_alpha)

    # Resuming restores the multipliers, the gates and the optimizer groups (with maximize on the multipliers).
    fresh_student = BertClassifier.load_from_checkpoint(teacher_ckpt)
    fresh_pruner = _pruner(teacher_ckpt)
    probe = RecordAtTrainStart(fresh_pruner)
    resumed = L.Trainer(max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[fresh_pruner, probe], num_sanity_val_steps=0)
    resumed.fit(fresh_student, datamodule=dm, ckpt_path=str(ckpt))
    assert probe.seen["lambda1"] == pytest.approx(pruner.lambda1.item())
    torch.testing.assert_close(probe.seen["log_alpha"], gates.token.log_alpha.detach())
    assert probe.seen["groups"] == ["model/decay", "model/no_decay", "pruner/gates", "pruner/lagrangian"]
    assert probe.seen["maximize"] == [False, False, False, True]
    assert probe.seen["has_state"]


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    pruner = ToPPruner(teacher_ckpt=str(tmp_path / "none.ckpt"))
    with pytest.raises(FileNotFoundError, match="pruner.teacher_ckpt"):
        pruner.load_teacher(pruner.teacher_ckpt)


def test_gates_freeze_at_the_first_validation_that_meets_the_target(tiny_setup, tmp_path):
    dm, teacher_ckpt, _ = tiny_setup
    student = BertClassifier.load_from_checkpoint(teacher_ckpt)
    pruner = ToPPruner(target_sparsity=0.0, teacher_ckpt=str(teacher_ckpt), bin_count=4, finetune_fraction=1.0)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[pruner], num_sanity_val_steps=0)
    trainer.fit(student, datamodule=dm)
    steps_per_epoch = trainer.num_training_batches
    assert pruner.frozen_at_step == steps_per_epoch  # first validation, end of epoch 1
    assert student.token_gates.frozen
    # Once frozen the gates receive no gradient: their values stay where they were frozen.
    assert pruner.summary()["gates_frozen_at_step"] == steps_per_epoch
    restored = ToPPruner()
    restored.load_state_dict(pruner.state_dict())
    assert restored.frozen_at_step == steps_per_epoch
