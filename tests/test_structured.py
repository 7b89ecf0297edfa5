"""Structured units (heads, FFN neurons): masks, physical shrinking, Taylor importance."""

from __future__ import annotations

import io

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from bert_inputs import bert_inputs
from modules.nn.bert import PrunableBertForSequenceClassification, layer_macs
from modules.nn.structured import UnitImportance, shrink_structured, taylor_importance, top_unit_masks
from modules.nn.gates import TokenGates

pytestmark = pytest.mark.usefixtures("one_thread")  # set per test and restored (tests/conftest.py)


def _model(tiny_bert_config, seed: int = 0, num_labels: int = 3) -> PrunableBertForSequenceClassification:
    cfg = BertConfig(**tiny_bert_config, num_labels=num_labels)
    torch.manual_seed(seed)
    return PrunableBertForSequenceClassification(cfg).eval()


def _masks(cfg, seed: int = 0, empty_heads_layer: int | None = 2, empty_neurons_layer: int | None = 0):
    """Random 0/1 masks with at least one unit per layer, then the requested layers emptied."""
    g = torch.Generator().manual_seed(seed)
    L, A, I = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size
    heads = (torch.rand(L, A, generator=g) < 0.5).float()
    neurons = (torch.rand(L, I, generator=g) < 0.5).float()
    heads[:, 0] = 1.0
    neurons[:, 0] = 1.0
    if empty_heads_layer is not None:
        heads[empty_heads_layer] = 0.0
    if empty_neurons_layer is not None:
        neurons[empty_neurons_layer] = 0.0
    return heads, neurons


def _pruning_gates(num_layers: int) -> TokenGates:
    gates = TokenGates(num_layers, pruning_layers=[1, 2], bin_count=4)
    with torch.no_grad():
        gates.layer.log_alpha.fill_(3.0)
        gates.token.log_alpha.copy_(torch.tensor([4.0, 4.0, -4.0, -4.0, 4.0, 4.0, 4.0, -4.0]))
    return gates.eval()


# ------------------------------------------------------------------ defaults


def test_default_masks_are_identity_and_hf_parity_holds(tiny_bert_config):
    cfg = BertConfig(**tiny_bert_config, num_labels=3)
    torch.manual_seed(0)
    hf = BertForSequenceClassification(cfg).eval()
    ours = PrunableBertForSequenceClassification(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # HF has no mask keys: they load as ones
    heads, neurons = ours.structured_masks()
    assert all(bool((h == 1).all()) for h in heads) and all(bool((n == 1).all()) for n in neurons)
    layer = ours.bert.encoder.layer[0]
    assert not layer.attention.self.head_mask_applied and not layer.intermediate.neuron_mask_applied
    ids, mask, types = bert_inputs(cfg.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        before = ours(ids, mask, types).logits
        ours.set_structured_masks(torch.ones(3, 4), torch.ones(3, 64))  # all ones: still not applied
        after = ours(ids, mask, types).logits
    torch.testing.assert_close(before, want, atol=1e-5, rtol=0)
    assert torch.equal(before, after)


def test_masks_change_the_output_and_are_in_the_state_dict(tiny_bert_config):
    model = _model(tiny_bert_config)
    ids, mask, types = bert_inputs(model.config.vocab_size)
    with torch.no_grad():
        dense = model(ids, mask, types).logits
        model.set_structured_masks(*_masks(model.config))
        masked = model(ids, mask, types).logits
    assert not torch.allclose(dense, masked)
    keys = model.state_dict().keys()
    assert "bert.encoder.layer.1.attention.self.head_mask" in keys
    assert "bert.encoder.layer.1.intermediate.neuron_mask" in keys
    assert not any(n.endswith("_mask") for n, _ in model.named_parameters())  # buffers, not trained


# ------------------------------------------------------------------- shrinking


@pytest.mark.parametrize("return_scores", [False, True])
def test_shrunk_model_equals_masked_model(tiny_bert_config, return_scores):
    model = _model(tiny_bert_config, seed=1)
    # the explicit-softmax (scores) path needs heads in every layer
    empty = None if return_scores else 2
    model.set_structured_masks(*_masks(model.config, seed=1, empty_heads_layer=empty))
    small = shrink_structured(model)
    ids, mask, types = bert_inputs(model.config.vocab_size)
    with torch.no_grad():
        masked = model(ids, mask, types, return_scores=return_scores)
        shrunk = small(ids, mask, types, return_scores=return_scores)
        no_pad_masked = model(ids, return_scores=return_scores).logits
        no_pad_shrunk = small(ids, return_scores=return_scores).logits
    torch.testing.assert_close(shrunk.logits, masked.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(no_pad_shrunk, no_pad_masked, atol=1e-5, rtol=0)
    for got, want in zip(shrunk.scores, masked.scores):  # token scores average the kept heads only
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_shrunk_sizes_follow_masks_and_original_is_untouched(tiny_bert_config):
    model = _model(tiny_bert_config)
    heads, neurons = _masks(model.config)
    model.set_structured_masks(heads, neurons)
    params_before = {n: p.shape for n, p in model.named_parameters()}
    small = shrink_structured(model)
    assert {n: p.shape for n, p in model.named_parameters()} == params_before
    want = [(int(h.sum()), int(n.sum())) for h, n in zip(heads, neurons)]
    assert small.layer_structure() == want
    assert want[2][0] == 0 and want[0][1] == 0  # a headless and a neuron-less layer
    for layer, (a, i) in zip(small.bert.encoder.layer, want):
        attn = layer.attention.self
        assert attn.num_heads == a and attn.head_mask.shape == (a,) and not attn.head_mask_applied
        assert layer.attention.output.dense.in_features == a * attn.head_dim
        assert layer.output.dense.in_features == i and layer.intermediate.neuron_mask.shape == (i,)


def test_shrunk_model_works_with_token_removal(tiny_bert_config):
    model = _model(tiny_bert_config, seed=3, num_labels=2)
    # layers 0 and 1 give the scores token pruning at layers 1 and 2 needs; layer 2 loses every head
    model.set_structured_masks(*_masks(model.config, seed=3, empty_heads_layer=2, empty_neurons_layer=1))
    small = shrink_structured(model)
    gates = _pruning_gates(model.config.num_hidden_layers)
    ids, mask, types = bert_inputs(model.config.vocab_size, n=16)
    with torch.no_grad():
        masked = model(ids, mask, types, token_pruner=gates, remove_pruned=False)
        removed = small(ids, mask, types, token_pruner=gates, remove_pruned=True)
    torch.testing.assert_close(removed.logits, masked.logits, atol=1e-5, rtol=0)
    assert (removed.kept_lengths[2] < masked.kept_lengths[0]).all()


def test_headless_layer_cannot_give_token_scores(tiny_bert_config):
    """A headless layer scores no token: its returned scores are zeros, and token pruning right after it is refused.
    (A composite's token stage may follow a structure stage that left a layer without heads.)"""
    model = _model(tiny_bert_config)
    model.set_structured_masks(*_masks(model.config, empty_heads_layer=0))
    ids, mask, types = bert_inputs(model.config.vocab_size)
    gates = TokenGates(num_layers=3, pruning_layers=[1], bin_count=4)
    gates.freeze()
    for m in (model.eval(), shrink_structured(model).eval()):
        with torch.no_grad():
            out = m(ids, mask, types, return_scores=True)
        assert torch.equal(out.scores[0], torch.zeros_like(out.scores[0])) and out.scores[1].abs().sum() > 0
        with pytest.raises(ValueError, match="layer 0 has every attention head"):
            m(ids, mask, types, token_pruner=gates.eval())


def test_shrunk_macs_equal_analytic_count(tiny_bert_config):
    model = _model(tiny_bert_config)
    heads, neurons = _masks(model.config)
    model.set_structured_masks(heads, neurons)
    small = shrink_structured(model)
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    ids, mask, types = bert_inputs(c.vocab_size)
    with torch.no_grad():
        out = small(ids, mask, types)
    n = mask.sum(dim=1).float()
    want = sum(
        layer_macs(n, c.hidden_size, int(i.sum()), int(h.sum()) * d) for h, i in zip(heads, neurons)
    ) + c.hidden_size * c.hidden_size + c.hidden_size * c.num_labels
    torch.testing.assert_close(small.macs(out.kept_lengths), want)
    # masks alone do not lower the count: the masked model counts its full size
    dense = sum(layer_macs(n, c.hidden_size, c.intermediate_size) for _ in heads)
    dense = dense + c.hidden_size * c.hidden_size + c.hidden_size * c.num_labels
    torch.testing.assert_close(model.macs(out.kept_lengths), dense)
    assert (small.macs(out.kept_lengths) < dense).all()


# ------------------------------------------------------------------ importance


def _batches(vocab: int, count: int = 3):
    out = []
    for s in range(count):
        ids, mask, types = bert_inputs(vocab, seed=s)
        labels = torch.tensor([0, 1, 2, 1])
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels})
    return out


def test_importance_ranks_zeroed_units_last(tiny_bert_config):
    model = _model(tiny_bert_config, seed=4).train()
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        value = model.bert.encoder.layer[0].attention.self.value
        value.weight[1 * d : 2 * d] = 0.0  # head 1 of layer 0 has zero context
        value.bias[1 * d : 2 * d] = 0.0
        inter = model.bert.encoder.layer[1].intermediate.dense
        inter.weight[5] = 0.0  # neuron 5 of layer 1 outputs gelu(0) = 0
        inter.bias[5] = 0.0
    masks_before = model.structured_masks()
    imp = taylor_importance(model, _batches(model.config.vocab_size))
    assert imp.heads.shape == (3, 4) and imp.neurons.shape == (3, 64)
    assert int(imp.heads[0].argmin()) == 1 and float(imp.heads[0, 1]) == 0.0
    assert int(imp.neurons[1].argmin()) == 5 and float(imp.neurons[1, 5]) == 0.0
    assert (imp.heads[0].sum() > 0) and (imp.neurons[1].sum() > 0)
    # side effects: mode, parameter grads and masks are as before, masks are plain buffers again
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for before, after in zip(masks_before, model.structured_masks()):
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not model.bert.encoder.layer[0].attention.self.head_mask.requires_grad


def test_importance_equals_weight_times_gradient_of_next_projection(tiny_bert_config):
    """At m = 1, dL/dm of a neuron = sum of w * dL/dw over its column of the FFN output projection."""
    model = _model(tiny_bert_config, seed=5)
    batch = _batches(model.config.vocab_size, count=1)
    imp = taylor_importance(model, batch)
    out = model(batch[0]["input_ids"], batch[0]["attention_mask"], batch[0]["token_type_ids"])
    torch.nn.functional.cross_entropy(out.logits, batch[0]["labels"]).backward()
    w = model.bert.encoder.layer[2].output.dense.weight
    torch.testing.assert_close(imp.neurons[2], (w * w.grad).sum(dim=0).abs(), atol=1e-6, rtol=1e-4)


def test_importance_errors(tiny_bert_config):
    model = _model(tiny_bert_config)
    with pytest.raises(ValueError, match="no batches"):
        taylor_importance(model, [])
    with pytest.raises(ValueError, match="labels"):
        taylor_importance(model, [{"input_ids": torch.ones(2, 4, dtype=torch.long)}])
    model.set_structured_masks(*_masks(model.config))
    with pytest.raises(ValueError, match="shrunk copy"):
        taylor_importance(shrink_structured(model), _batches(model.config.vocab_size, 1))


def test_top_unit_masks_keep_exactly_k_most_important():
    g = torch.Generator().manual_seed(0)
    imp = UnitImportance(torch.rand(3, 4, generator=g), torch.rand(3, 10, generator=g))
    heads_kept, neurons_kept = [4, 0, 2], [3, 10, 1]
    hm, nm = top_unit_masks(imp, heads_kept, neurons_kept)
    assert hm.sum(dim=1).tolist() == heads_kept and nm.sum(dim=1).tolist() == neurons_kept
    assert set(((hm == 0) | (hm == 1)).flatten().tolist()) == {True}
    for scores, mask in [(imp.heads[2], hm[2]), (imp.neurons[0], nm[0])]:
        assert scores[mask.bool()].min() > scores[~mask.bool()].max()
    with pytest.raises(ValueError, match="encoder layer 1 heads: cannot keep 5"):
        top_unit_masks(imp, [4, 5, 2], neurons_kept)
    with pytest.raises(ValueError, match="one per encoder layer"):
        top_unit_masks(imp, [4, 0], neurons_kept)


def test_importance_masks_then_shrink_end_to_end(tiny_bert_config):
    model = _model(tiny_bert_config, seed=6)
    imp = taylor_importance(model, _batches(model.config.vocab_size, 2))
    model.set_structured_masks(*top_unit_masks(imp, [2, 3, 1], [16, 32, 8]))
    small = shrink_structured(model)
    assert small.layer_structure() == [(2, 16), (3, 32), (1, 8)]


# ------------------------------------------------------------ errors, state dict


def test_bad_masks_name_the_layer_and_expected_length(tiny_bert_config):
    model = _model(tiny_bert_config)
    heads, neurons = _masks(model.config)
    with pytest.raises(ValueError, match=r"encoder layer 1 head mask: got shape \(3,\), expected \(4,\)"):
        model.set_structured_masks([heads[0], heads[1, :3], heads[2]])
    with pytest.raises(ValueError, match=r"encoder layer 0 neuron mask: got shape \(63,\), expected \(64,\)"):
        model.set_structured_masks(neurons=neurons[:, :63])
    with pytest.raises(ValueError, match="expected one per encoder layer"):
        model.set_structured_masks(heads[:2])
    with pytest.raises(ValueError, match="must be 0 .removed. or 1"):
        model.set_structured_masks(heads * 0.5)
    assert all(bool((h == 1).all()) for h in model.structured_masks()[0])  # failed calls changed nothing
    small = shrink_structured(model.eval())  # unmasked: same sizes
    assert small.layer_structure() == [(4, 64)] * 3


def test_state_dict_round_trip_of_masked_model(tiny_bert_config):
    model = _model(tiny_bert_config, seed=7)
    heads, neurons = _masks(model.config, seed=7)
    model.set_structured_masks(heads, neurons)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = _model(tiny_bert_config, seed=8)
    fresh.load_state_dict(state, strict=True)
    got_heads, got_neurons = fresh.structured_masks()
    assert torch.equal(torch.stack(got_heads), heads) and torch.equal(torch.stack(got_neurons), neurons)
    assert fresh.bert.encoder.layer[0].intermediate.neuron_mask_applied
    ids, mask, types = bert_inputs(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask, types).logits, model(ids, mask, types).logits)
    # a state dict without masks (HF, or a checkpoint from before masks existed) unmasks
    fresh.load_state_dict({k: v for k, v in state.items() if not k.endswith("_mask")}, strict=True)
    assert not fresh.bert.encoder.layer[0].intermediate.neuron_mask_applied
    assert all(bool((h == 1).all()) for h in fresh.structured_masks()[0])


def test_lightning_checkpoint_restores_masks(tmp_path, tiny_bert_config):
    import lightning as L

    from modules.lit.bert_classifier import BertClassifier

    module = BertClassifier(bert_config=tiny_bert_config, num_labels=3)
    heads, neurons = _masks(module.model.config)
    module.model.set_structured_masks(heads, neurons)
    trainer = L.Trainer(
        max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(module)
    path = tmp_path / "masked.ckpt"
    trainer.save_checkpoint(path)
    loaded = BertClassifier.load_from_checkpoint(path, map_location="cpu")
    got_heads, got_neurons = loaded.model.structured_masks()
    assert torch.equal(torch.stack(got_heads), heads) and torch.equal(torch.stack(got_neurons), neurons)
    assert loaded.model.bert.encoder.layer[2].attention.self.head_mask_applied
