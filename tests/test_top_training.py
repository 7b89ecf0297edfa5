"""ToP inside Lightning on a tiny random BERT: gates train, checkpoints keep pruner state, resume restores it."""

from __future__ import annotations

import math

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


class RecordSelection(L.Callback):
    """Per validation: the gates' state the module saw, its accuracy and sparsity, and ToP's selection metric.

    Placed before the pruner, so its ``on_validation_end`` reads the metrics before ToP may freeze the gates.
    """

    def __init__(self, pruner: ToPPruner):
        self.pruner = pruner
        self.records: list[dict] = []
        self._frozen = False

    def on_validation_epoch_end(self, trainer, pl_module):  # callbacks run before the module's hook
        self._frozen = bool(pl_module.token_gates is not None and pl_module.token_gates.frozen)

    def on_validation_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        sparsity = float(m["val/sparsity"])
        met = self._frozen and sparsity >= self.pruner.target_sparsity - ToPPruner.SPARSITY_TOLERANCE
        self.records.append({"step": trainer.global_step, "accuracy": float(m["val/accuracy"]), "met": met,
                             "selection": float(m[ToPPruner.SELECTION_METRIC])})


def test_top_selection_metric_counts_only_models_at_the_target_under_frozen_gates():
    """ToP's checkpoint rule (``validation_metrics``): the accuracy once ``val/sparsity >= target - tolerance`` and,
    with a fine-tuning window, the gates are frozen; -inf before. Run broken once (the frozen-gates condition
    dropped from ``ToPPruner.validation_metrics``): the unfrozen case failed."""
    from types import SimpleNamespace

    values = {"val/accuracy": torch.tensor(0.8), "val/sparsity": torch.tensor(0.495)}
    module = SimpleNamespace(token_gates=SimpleNamespace(frozen=False))
    key = ToPPruner.SELECTION_METRIC
    window = ToPPruner(target_sparsity=0.5, finetune_fraction=0.5)
    assert ToPPruner.SPARSITY_TOLERANCE == 0.01
    assert window.fit_plan().monitor == key and window.fit_plan().mode == "max"
    assert window.validation_metrics(module, values)[key] == -math.inf  # at the target, gates not frozen
    module.token_gates.frozen = True
    assert window.validation_metrics(module, values)[key] == pytest.approx(0.8)
    below = {**values, "val/sparsity": torch.tensor(0.489)}
    assert window.validation_metrics(module, below)[key] == -math.inf  # frozen, below target - tolerance
    no_window = ToPPruner(target_sparsity=0.5, finetune_fraction=0.0)
    module.token_gates.frozen = False
    assert no_window.validation_metrics(module, values)[key] == pytest.approx(0.8)  # no window: sparsity alone
    assert no_window.validation_metrics(module, below)[key] == -math.inf


def test_the_pipeline_keeps_the_last_checkpoint_when_none_met_the_criterion(tmp_path):
    """``chosen_checkpoint``: a non-finite best score (the pruner's -inf) means no checkpoint met the rule: the last
    is kept with score None; a finite best is kept with its score. Run broken once (the finiteness test
    removed from ``chosen_checkpoint``): the -inf case kept best.ckpt and failed."""
    from types import SimpleNamespace

    from pipelines.common import chosen_checkpoint
    from pruners.base import FitPlan

    (tmp_path / "last.ckpt").write_text("x")
    plan = FitPlan(monitor=ToPPruner.SELECTION_METRIC)

    def trainer(score):
        cb = SimpleNamespace(best_model_score=torch.tensor(score), best_model_path=str(tmp_path / "best.ckpt"),
                             dirpath=str(tmp_path))
        return SimpleNamespace(checkpoint_callback=cb)

    assert chosen_checkpoint(trainer(-math.inf), "pruned", plan) == (str(tmp_path / "last.ckpt"), None)
    assert chosen_checkpoint(trainer(0.0), "pruned", plan) == (str(tmp_path / "best.ckpt"), 0.0)


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
    plan = pruner.fit_plan()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=plan.monitor, mode=plan.mode, save_last=True)
    seen = RecordSelection(pruner)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[seen, pruner, ckpt], num_sanity_val_steps=0)
    trainer.fit(student, datamodule=dm)
    # ToP's own rule, as logged: the accuracy once at the target with frozen gates, else -inf (never kept).
    assert [r["met"] for r in seen.records] == [False, False, True]
    for r in seen.records:
        assert r["selection"] == (r["accuracy"] if r["met"] else -math.inf)
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
