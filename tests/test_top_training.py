"""ToP inside Lightning on a tiny random BERT: gates train, checkpoints keep pruner state, resume restores it."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from modules.lit.bert_classifier import BertClassifier
from conftest import build_pruner
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


def _pruner(teacher_ckpt) -> ToPPruner:
    """The shipped pruner=top config, shrunk for the tiny model (as a user would override it)."""
    return build_pruner("pruner=top", "pruner.target_sparsity=0.5", f"pruner.teacher_ckpt={teacher_ckpt}",
                        "pruner.bin_count=4", "pruner.warmup_fraction=0.5", "pruner.gate_lr=0.1",
                        "pruner.multiplier_lr=0.1")


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
        pruner.teacher_plan()


def test_gates_freeze_at_the_target_at_the_first_validation_in_the_window(tiny_setup, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm, teacher_ckpt, _ = tiny_setup
    student = BertClassifier.load_from_checkpoint(teacher_ckpt)
    # Two epochs, window = the second half: freezing happens at the first validation in it (end of epoch 1),
    # projected to the target however far the stochastic gates got in one short epoch.
    pruner = ToPPruner(target_sparsity=0.3, teacher_ckpt=str(teacher_ckpt), bin_count=4, finetune_fraction=0.5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/accuracy_at_target", mode="max", save_last=True)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[pruner, ckpt], num_sanity_val_steps=0)
    trainer.fit(student, datamodule=dm)
    steps_per_epoch = trainer.num_training_batches
    assert pruner.frozen_at_step == 2 * steps_per_epoch  # first validation with step >= half of 3 epochs
    assert student.token_gates.frozen
    assert pruner.freeze_info["val_sparsity_frozen"] >= 0.3
    # The model is served at the target: validation measures what the projection computed.
    (val,) = trainer.validate(student, datamodule=dm, verbose=False)
    assert val["val/sparsity"] == pytest.approx(pruner.freeze_info["val_sparsity_frozen"], abs=1e-5)
    # Only the checkpoint after freezing counted, and it reloads with the frozen gates.
    assert f"epoch=2-step={3 * steps_per_epoch}" in ckpt.best_model_path
    reloaded = BertClassifier.load_from_checkpoint(ckpt.best_model_path)
    assert reloaded.token_gates.frozen
    assert torch.equal(reloaded.token_gates.deterministic()[1], student.token_gates.deterministic()[1])
    assert pruner.results()["gates_frozen_at_step"] == 2 * steps_per_epoch
    restored = ToPPruner()
    restored.load_state_dict(pruner.state_dict())
    assert restored.frozen_at_step == 2 * steps_per_epoch
    assert restored.freeze_info == pruner.freeze_info


def test_a_pruned_or_mismatched_teacher_checkpoint_is_refused_before_training(tiny_setup, tmp_path, tiny_bert_config):
    from pruners.base import PrunerConfigError

    dm, teacher_ckpt, _ = tiny_setup
    student = BertClassifier.load_from_checkpoint(teacher_ckpt)
    ToPPruner(teacher_ckpt=str(teacher_ckpt)).check(student, dm)  # the dense teacher of the same model passes

    ckpt = torch.load(teacher_ckpt, weights_only=True)
    ckpt["token_gates_config"] = {"num_layers": 3, "pruning_layers": [2], "bin_count": 4}
    torch.save(ckpt, tmp_path / "mid_pruning.ckpt")
    with pytest.raises(PrunerConfigError, match="pruned model .*token gates.*not a dense teacher"):
        ToPPruner(teacher_ckpt=str(tmp_path / "mid_pruning.ckpt")).check(student, dm)

    ckpt = torch.load(teacher_ckpt, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("neuron_mask"))
    ckpt["state_dict"][key][0] = 0.0
    torch.save(ckpt, tmp_path / "masked.ckpt")
    with pytest.raises(PrunerConfigError, match="pruned model"):
        ToPPruner(teacher_ckpt=str(tmp_path / "masked.ckpt")).check(student, dm)

    wider = BertClassifier(bert_config={**tiny_bert_config, "hidden_size": 64, "intermediate_size": 128})
    with pytest.raises(PrunerConfigError, match="another architecture.*hidden_size"):
        ToPPruner(teacher_ckpt=str(teacher_ckpt)).check(wider, dm)

    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(PrunerConfigError, match="not a readable checkpoint"):
        ToPPruner(teacher_ckpt=str(tmp_path / "junk.ckpt")).check(student, dm)


def test_gradient_clipping_clips_the_model_weights_only(tiny_bert_config):
    """``trainer.gradient_clip_val`` clips the model's groups, never a pruner's (gates, multipliers).

    Run broken once (clipping every group, Lightning's default): the large gate gradient took the
    joint norm to about 100 and shrank the model's gradient 100-fold; this test failed."""
    import torch

    from modules.lit.bert_classifier import BertClassifier

    module = BertClassifier(bert_config=tiny_bert_config, num_labels=2)
    gate = torch.nn.Parameter(torch.zeros(4))
    weights = [p for p in module.model.parameters()]
    opt = torch.optim.AdamW([
        {"params": weights, "name": "model/decay"},
        {"params": [gate], "name": "pruner/gates"},
    ])
    for p in weights:
        p.grad = torch.full_like(p, 1e-4)
    gate.grad = torch.full((4,), 50.0)
    model_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in weights]))
    assert model_norm < 1.0
    before = [p.grad.clone() for p in weights]
    module.configure_gradient_clipping(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert all(torch.equal(b, p.grad) for b, p in zip(before, weights))
    assert torch.equal(gate.grad, torch.full((4,), 50.0))
    for p in weights:
        p.grad = torch.full_like(p, 1.0)
    module.configure_gradient_clipping(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in weights]))
    assert abs(float(clipped) - 1.0) < 1e-3 and torch.equal(gate.grad, torch.full((4,), 50.0))
