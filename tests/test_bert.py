"""The prunable BERT: HF parity, real token removal equals masking, MACs."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from bert_inputs import bert_inputs
from modules.nn.bert import PrunableBertForSequenceClassification, layer_macs
from modules.nn.tokens import gather_tokens
from modules.nn.gates import TokenGates


def test_logits_equal_hf_bert(tiny_bert_config):
    cfg = BertConfig(**tiny_bert_config, num_labels=3)
    torch.manual_seed(0)
    hf = BertForSequenceClassification(cfg).eval()
    ours = PrunableBertForSequenceClassification(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids, mask, types = bert_inputs(cfg.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, mask, types).logits
        got_with_probs = ours(ids, mask, types, return_scores=True).logits  # explicit-softmax path
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_with_probs, want, atol=1e-5, rtol=0)


def test_from_pretrained_folder_matches_hf(tmp_path, tiny_bert_config):
    cfg = BertConfig(**tiny_bert_config, num_labels=2)
    torch.manual_seed(1)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    hf = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    ours = PrunableBertForSequenceClassification.from_pretrained(tmp_path, num_labels=2).eval()
    ids, mask, types = bert_inputs(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask, types).logits, hf(ids, mask, types).logits, atol=1e-5, rtol=0)


def test_from_pretrained_missing_folder_says_what_to_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        PrunableBertForSequenceClassification.from_pretrained(tmp_path / "nope", num_labels=2)


def _pruning_gates(num_layers: int) -> TokenGates:
    gates = TokenGates(num_layers, pruning_layers=[1, 2], bin_count=4)
    with torch.no_grad():
        gates.layer.log_alpha.fill_(3.0)  # both layers prune
        # layer 1 keeps its top 2 of 4 bins, layer 2 its top 3
        gates.token.log_alpha.copy_(torch.tensor([4.0, 4.0, -4.0, -4.0, 4.0, 4.0, 4.0, -4.0]))
    return gates.eval()


def test_removing_closed_tokens_equals_masking_them(tiny_bert_config):
    cfg = BertConfig(**tiny_bert_config, num_labels=2)
    torch.manual_seed(2)
    model = PrunableBertForSequenceClassification(cfg).eval()
    gates = _pruning_gates(cfg.num_hidden_layers)
    ids, mask, types = bert_inputs(cfg.vocab_size, n=16)
    with torch.no_grad():
        masked = model(ids, mask, types, token_pruner=gates, remove_pruned=False)
        removed = model(ids, mask, types, token_pruner=gates, remove_pruned=True)
        dense = model(ids, mask, types)
    torch.testing.assert_close(removed.logits, masked.logits, atol=1e-5, rtol=0)
    # Pruning really happened: fewer tokens per layer, and it changed the prediction inputs.
    assert all((r <= d).all() for r, d in zip(removed.kept_lengths, dense.kept_lengths))
    assert (removed.kept_lengths[2] < dense.kept_lengths[2]).all()
    assert not torch.allclose(removed.logits, dense.logits)
    # Cumulative: a layer never computes on more tokens than the layer below it.
    for lower, upper in zip(removed.kept_lengths, removed.kept_lengths[1:]):
        assert (upper <= lower).all()


def test_training_with_frozen_gates_removal_equals_masking_in_loss_gradients_and_scores(tiny_bert_config):
    # Once ToP's gates are frozen, training gathers pruned tokens out (shorter sequences);
    # it must compute what masking computes: same logits, same gradients, and scores
    # returned in input positions (0 where a token was removed or masked).
    cfg = BertConfig(**tiny_bert_config, num_labels=2)  # no dropout: both passes are deterministic
    ids, mask, types = bert_inputs(cfg.vocab_size, n=16)
    gates = _pruning_gates(cfg.num_hidden_layers)
    gates.train()
    gates.freeze()
    runs = []
    for remove in (False, True):
        torch.manual_seed(2)
        model = PrunableBertForSequenceClassification(cfg).train()
        out = model(ids, mask, types, token_pruner=gates, remove_pruned=remove, return_scores=True)
        out.logits.square().sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        runs.append((out, grads))
    (masked, g_masked), (removed, g_removed) = runs
    assert removed.kept_lengths[2].max() < ids.shape[1]  # tokens really were removed
    torch.testing.assert_close(removed.logits, masked.logits, atol=1e-5, rtol=0)
    assert g_masked.keys() == g_removed.keys()
    for k in g_masked:
        torch.testing.assert_close(g_removed[k], g_masked[k], atol=1e-5, rtol=1e-4, msg=k)
    for s_removed, s_masked in zip(removed.scores, masked.scores):
        assert s_removed.shape == ids.shape
        torch.testing.assert_close(s_removed, s_masked, atol=1e-6, rtol=0)


def test_gather_tokens_keeps_order_and_cls():
    keep = torch.tensor([[True, False, True, True], [True, True, False, False]])
    x = torch.arange(8.0).view(2, 4, 1)
    new_keep, (gx,) = gather_tokens(keep, x)
    assert new_keep.tolist() == [[True, True, True], [True, True, False]]
    assert gx[0, :, 0].tolist() == [0.0, 2.0, 3.0]
    assert gx[1, :2, 0].tolist() == [4.0, 5.0]


def test_layer_macs_known_value():
    # N=10, H=4, I=8: 4*10*16 + 2*100*4 + 2*10*4*8 = 640 + 800 + 640
    assert layer_macs(10, 4, 8) == 2080
    # heads removed: attention width 2 instead of 4
    assert layer_macs(10, 4, 8, attention_width=2) == 4 * 10 * 4 * 2 + 2 * 100 * 2 + 2 * 10 * 4 * 8


def test_remove_pruned_refuses_soft_masks(tiny_bert_config):
    cfg = BertConfig(**tiny_bert_config, num_labels=2)
    model = PrunableBertForSequenceClassification(cfg)
    gates = TokenGates(cfg.num_hidden_layers, [1, 2], bin_count=4).train()
    ids, mask, types = bert_inputs(cfg.vocab_size)
    with pytest.raises(ValueError, match="model.eval"):
        model(ids, mask, types, token_pruner=gates, remove_pruned=True)
