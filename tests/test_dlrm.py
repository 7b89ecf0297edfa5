"""DLRM blocks: shapes, a hand-checked interaction, unseen ids, served copies, window metrics."""

from __future__ import annotations

import math

import pytest
import torch

from modules.nn.dlrm import (
    DLRM,
    DenseArch,
    InteractionArch,
    MaskedLinear,
    OverArch,
    SparseArch,
    export_served,
    wrap_ids,
)
from modules.lit.dlrm import DLRMModule, window_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # set per test and restored (tests/conftest.py)


def tiny_dlrm(seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    return DLRM(num_dense=3, num_embeddings=[10, 20], multi_num_embeddings=[7], embedding_dim=4, bottom_mlp=[8], top_mlp=[6, 5])


def tiny_inputs(b: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(b, 3, generator=g)
    sparse = torch.stack([torch.randint(1, 10, (b,), generator=g), torch.randint(1, 20, (b,), generator=g)], 1)
    multi = torch.randint(0, 7, (b, 1, 3), generator=g)
    return dense, sparse, multi


def test_block_shapes():
    b = 5
    dense, sparse, multi = tiny_inputs(b)
    sa = SparseArch([10, 20], [7], 4)
    assert sa(sparse, multi).shape == (b, 3, 4)  # (B, F, D)
    da = DenseArch(3, [8, 4])
    assert da(dense).shape == (b, 4)  # (B, D)
    ia = InteractionArch(3)
    out = ia(da(dense), sa(sparse, multi))
    assert out.shape == (b, 4 + 3 * 4 // 2)  # (B, D + F(F+1)/2)
    oa = OverArch(out.shape[1], [6])
    assert oa(out).shape == (b,)
    assert tiny_dlrm()(dense, sparse, multi).shape == (b,)


def test_interaction_hand_checked():
    dense = torch.tensor([[1.0, 2.0]])  # v0
    sparse = torch.tensor([[[3.0, 0.0], [1.0, -1.0]]])  # v1, v2
    out = InteractionArch(2)(dense, sparse)
    # [dense..., <v0,v1>, <v0,v2>, <v1,v2>] = [1, 2, 3, 1 - 2, 3]
    assert torch.equal(out, torch.tensor([[1.0, 2.0, 3.0, -1.0, 3.0]]))


def test_embedding_bag_mean_ignores_padding():
    sa = SparseArch([5], [5], 2)
    with torch.no_grad():
        sa.multi_tables[0].weight.copy_(torch.arange(10.0).view(5, 2))
    out = sa(torch.tensor([[1]]), torch.tensor([[[2, 4, 0, 0]]]))
    assert torch.allclose(out[0, 1], torch.tensor([(4 + 8) / 2, (5 + 9) / 2]))
    empty = sa(torch.tensor([[1]]), torch.tensor([[[0, 0, 0, 0]]]))
    assert torch.equal(empty[0, 1], torch.zeros(2))


def test_unseen_ids_wrap_instead_of_crashing():
    ids = torch.tensor([0, 1, 9, 10, 11, 10**9])
    wrapped = wrap_ids(ids, 10)
    assert wrapped.tolist()[:3] == [0, 1, 9]  # in range: unchanged
    assert ((wrapped >= 1) & (wrapped < 10))[3:].all()
    model = tiny_dlrm().eval()
    dense, sparse, multi = tiny_inputs(2)
    big = sparse.clone()
    big[:, 1] = torch.tensor([10**12, 20 + 3])  # never-seen ids of feature 1 (table of 20)
    same = big.clone()
    same[:, 1] = wrap_ids(big[:, 1], 20)
    with torch.no_grad():
        assert torch.equal(model(dense, big, multi), model(dense, same, multi))
    with pytest.raises(ValueError, match=">= 0"):
        wrap_ids(torch.tensor([-1]), 10)


def test_bad_sizes_and_inputs_raise():
    with pytest.raises(ValueError, match="bottom_mlp"):
        DLRM(3, [10], [], 4, [], [6])
    with pytest.raises(ValueError, match="sparse ids must be"):
        SparseArch([10, 20], [], 4)(torch.ones(2, 3, dtype=torch.long))


def test_straight_through_mask_keeps_shadow_gradient():
    lin = MaskedLinear(3, 2)
    lin.mask[0, 0] = False
    x = torch.randn(4, 3)
    with torch.no_grad():
        expected = x @ (lin.weight * lin.mask).T + lin.bias
    out = lin(x)
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert lin.weight.grad[0, 0] != 0  # pruned shadow still learns
    lin.weight.grad = None
    lin.straight_through = False
    lin(x).sum().backward()
    assert lin.weight.grad[0, 0] == 0  # static: masked gradient


def test_export_served_folds_masks_and_removes_dead_neurons():
    model = tiny_dlrm().eval()
    top = model.over_arch.mlp.layers
    top[0].mask[:, 1] = False  # unstructured zeros
    top[1].mask[:, 2] = False  # neuron 2 of top.0 is never read: removable
    top[1].mask[3] = False
    top[1].bias_mask[3] = False  # neuron 3 of top.1 outputs ReLU(0) = 0: removable
    dense, sparse, multi = tiny_inputs(6)
    served = export_served(model)
    assert served.over_arch.mlp.layers[0].weight.shape == (5, top[0].in_features)
    assert served.over_arch.mlp.layers[1].weight.shape == (4, 5)
    assert served.over_arch.mlp.layers[2].weight.shape == (1, 4)
    assert (served.over_arch.mlp.layers[0].weight[:, 1] == 0).all()
    with torch.no_grad():
        assert torch.allclose(served(dense, sparse, multi), model(dense, sparse, multi), atol=1e-6)
    assert isinstance(served.over_arch.mlp.layers[0], torch.nn.Linear)
    assert not isinstance(served.over_arch.mlp.layers[0], MaskedLinear)


def test_served_model_is_the_module_class_in_eval_mode_holding_the_served_network():
    """The contract BertClassifier.served_model shares: a copy of the LightningModule, eval mode, ``.model``
    the served plain network; the training module keeps its masked network and its mode."""
    torch.manual_seed(0)
    module = DLRMModule(num_dense=3, num_embeddings=[10, 20], multi_num_embeddings=[7], embedding_dim=4,
                        bottom_mlp=[8], top_mlp=[6, 5]).train()
    module.model.over_arch.mlp.layers[1].mask[:, 2] = False  # neuron 2 of top.0 is never read: removed when served
    served = module.served_model()
    assert type(served) is DLRMModule and served is not module and not served.training
    assert served.model.over_arch.mlp.layers[0].weight.shape == (5, module.model.over_arch.mlp.layers[0].in_features)
    assert not any(isinstance(m, MaskedLinear) for m in served.model.modules())
    assert module.training and isinstance(module.model.over_arch.mlp.layers[0], MaskedLinear)
    assert module.model.over_arch.mlp.layers[0].weight.shape[0] == 6
    x = tiny_inputs(4)
    with torch.no_grad():
        assert torch.allclose(served(*x), module.eval()(*x), atol=1e-6)


def test_window_metrics_hand_computed_ne():
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0])
    probs = torch.tensor([0.8, 0.3, 0.6, 0.4])
    m = window_metrics(torch.logit(probs), labels)
    ll = -(math.log(0.8) + math.log(0.7) + math.log(0.6) + math.log(0.4)) / 4
    p = 0.75
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert m["log_loss"] == pytest.approx(ll, rel=1e-6)
    assert m["ne"] == pytest.approx(ll / h, rel=1e-6)
    assert m["auc"] == pytest.approx(1.0)  # the negative (0.3) is below every positive
    # predicting the base rate gives NE = 1
    base = window_metrics(torch.logit(torch.full((4,), 0.75)), labels)
    assert base["ne"] == pytest.approx(1.0, rel=1e-6)
    one_class = window_metrics(torch.zeros(3), torch.ones(3))
    assert math.isnan(one_class["auc"]) and math.isnan(one_class["ne"])
