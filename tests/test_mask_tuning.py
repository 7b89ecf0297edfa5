"""Least-squares mask tuning (Kwon et al. 2022, arXiv 2204.09656 section 4.3)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig

from bert_inputs import bert_inputs
from modules.bert import PrunableBertForSequenceClassification
from modules.structured import shrink_structured
from pruners.mask_tuning import dense_targets, ridge_towards_one, tune_unit_scales

torch.set_num_threads(1)


def _model(tiny_bert_config, seed: int = 0) -> PrunableBertForSequenceClassification:
    torch.manual_seed(seed)
    return PrunableBertForSequenceClassification(BertConfig(**tiny_bert_config, num_labels=2)).eval()


def _batches(vocab: int) -> list[dict]:
    out = []
    for seed in range(3):
        ids, mask, types = bert_inputs(vocab, b=4, n=12, seed=seed)
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return out


def _logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits for b in batches])


def test_ridge_towards_one_is_the_augmented_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 5, generator=g, dtype=torch.float64)
    t = torch.randn(40, generator=g, dtype=torch.float64)
    gram = a.T @ a
    lam = 0.3 * float(gram.diagonal().mean())
    # min ||A m - t||^2 + lam ||m - 1||^2 is least squares on [A; sqrt(lam) I] m = [t; sqrt(lam) 1]
    aug_a = torch.cat([a, lam**0.5 * torch.eye(5, dtype=torch.float64)])
    aug_t = torch.cat([t, lam**0.5 * torch.ones(5, dtype=torch.float64)])
    expected = torch.linalg.lstsq(aug_a, aug_t[:, None]).solution[:, 0]
    torch.testing.assert_close(ridge_towards_one(gram, a.T @ t, 0.3), expected)
    with pytest.raises(ValueError, match="damping must be > 0"):
        ridge_towards_one(gram, a.T @ t, 0.0)


def test_unpruned_copy_keeps_scale_one_and_its_logits(tiny_bert_config):
    teacher = _model(tiny_bert_config)
    student = shrink_structured(copy.deepcopy(teacher))
    batches = _batches(tiny_bert_config["vocab_size"])
    scales = tune_unit_scales(student, dense_targets(teacher, batches), batches, damping=1e-4)
    for heads, neurons in scales:
        torch.testing.assert_close(heads, torch.ones_like(heads), atol=1e-4, rtol=0)
        torch.testing.assert_close(neurons, torch.ones_like(neurons), atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(student, batches), _logits(teacher, batches), atol=1e-4, rtol=0)


def test_recovers_known_rescaling_of_heads_and_neurons(tiny_bert_config):
    """A copy whose head 1 of layer 0 is halved and neuron 3 of layer 1 is quartered gets scales 2 and 4 back."""
    teacher = _model(tiny_bert_config)
    student = copy.deepcopy(teacher)
    d = teacher.bert.encoder.layer[0].attention.self.head_dim
    with torch.no_grad():
        student.bert.encoder.layer[0].attention.output.dense.weight[:, d : 2 * d] *= 0.5
        student.bert.encoder.layer[1].output.dense.weight[:, 3] *= 0.25
    batches = _batches(tiny_bert_config["vocab_size"])
    scales = tune_unit_scales(student, dense_targets(teacher, batches), batches, damping=1e-6)
    assert scales[0][0][1].item() == pytest.approx(2.0, abs=1e-3)
    assert scales[1][1][3].item() == pytest.approx(4.0, abs=1e-2)
    torch.testing.assert_close(_logits(student, batches), _logits(teacher, batches), atol=1e-4, rtol=0)


def test_pruned_model_gets_closer_to_the_dense_one_and_stays_in_eval_mode_state(tiny_bert_config):
    teacher = _model(tiny_bert_config)
    work = copy.deepcopy(teacher)
    heads = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)  # layer 2: no heads
    neurons = torch.ones(3, 64)
    neurons[:, 16:] = 0.0
    neurons[1] = 0.0  # layer 1: no neurons
    work.set_structured_masks(heads, neurons)
    student = shrink_structured(work).train()
    batches = _batches(tiny_bert_config["vocab_size"])
    before = (_logits(student.eval(), batches) - _logits(teacher, batches)).pow(2).mean()
    student.train()
    scales = tune_unit_scales(student, dense_targets(teacher, batches), batches, damping=0.01)
    assert student.training and not teacher.training  # modes restored
    assert [(len(h), len(n)) for h, n in scales] == [(2, 16), (2, 0), (0, 16)]
    after = (_logits(student.eval(), batches) - _logits(teacher, batches)).pow(2).mean()
    assert after < before


def test_bad_inputs_raise(tiny_bert_config):
    teacher = _model(tiny_bert_config)
    batches = _batches(tiny_bert_config["vocab_size"])
    targets = dense_targets(teacher, batches)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        dense_targets(teacher, [])
    with pytest.raises(ValueError, match="at least one calibration batch"):
        tune_unit_scales(copy.deepcopy(teacher), targets, [])
    with pytest.raises(ValueError, match="on the same batches"):
        tune_unit_scales(copy.deepcopy(teacher), targets, batches[:2])
    with pytest.raises(ValueError, match="on the same batches"):
        tune_unit_scales(_model({**tiny_bert_config, "num_hidden_layers": 2}), targets, batches)
    wide = {**tiny_bert_config, "hidden_size": 64, "intermediate_size": 128}
    with pytest.raises(ValueError, match="tune a pruned copy of the model the targets come from"):
        tune_unit_scales(_model(wide), targets, batches)
