"""D2S pruner: schedule, mask sparsity, regrowth, checkpoint round trip, served zeros, baselines."""

from __future__ import annotations

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from modules.lit.dlrm import DLRMModule
from modules.nn.dlrm import DLRM, export_served
from modules.data.stream_data import CsvStream
from pruners.base import PrunerConfigError
from pruners.d2s import D2SPruner, cubic_sparsity, keep_top

pytestmark = pytest.mark.usefixtures("one_thread")  # set per test and restored (tests/conftest.py)


def tiny_dlrm(seed=0):
    torch.manual_seed(seed)
    return DLRM(num_dense=3, num_embeddings=[10, 20], multi_num_embeddings=[], embedding_dim=4, bottom_mlp=[16, 8], top_mlp=[32, 16])


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    path = tmp_path_factory.mktemp("d2s") / "log.csv"
    rng = np.random.default_rng(0)
    n = 400
    user = rng.integers(0, 20, n)
    price = rng.uniform(0, 100, n)
    click = ((user % 3 == 0) ^ (price > 50) ^ (rng.random(n) < 0.2)).astype(int)
    pd.DataFrame({"ts": np.arange(n) * 3600, "user": user, "item": rng.integers(0, 9, n), "price": price, "click": click}).to_csv(path, index=False)
    return dict(path=str(path), timestamp_column="ts", label_column="click", categorical_columns=["user", "item"],
                numeric_columns=["price"], history_columns=["user"], window=50, batch_size=10)


def fit(stream, pruner, tmp_path=None, seed=0):
    dm = CsvStream(**stream)
    dm.setup()
    L.seed_everything(seed, verbose=False)
    module = DLRMModule(**dm.model_sizes(), embedding_dim=4, bottom_mlp=[16, 8], top_mlp=[32, 16], lr=0.01)
    callbacks = [pruner]
    if tmp_path is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=tmp_path is not None, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return module, dm


# ----------------------------------------------------------------------------- schedule
def test_cubic_schedule_values():
    # Zhu & Gupta 2017 eq. 1 with s_0 = 0, s_f = 0.9, t_0 = 10, n = 100
    assert cubic_sparsity(0, 0.9, 10, 100) == 0.0
    assert cubic_sparsity(10, 0.9, 10, 100) == 0.0
    assert cubic_sparsity(60, 0.9, 10, 100) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(35, 0.9, 10, 100) == pytest.approx(0.9 - 0.9 * 0.75**3)
    assert cubic_sparsity(110, 0.9, 10, 100) == pytest.approx(0.9)
    assert cubic_sparsity(10_000, 0.9, 10, 100) == pytest.approx(0.9)
    assert cubic_sparsity(5, 0.9, 10, 100, initial=0.2) == 0.2
    vals = [cubic_sparsity(t, 0.9, 0, 100) for t in range(0, 101, 10)]
    assert vals == sorted(vals)  # monotone, fastest early


def test_scheduled_sparsity_uses_fractions_of_the_stream():
    p = D2SPruner(target_sparsity=0.8, ramp_start=0.1, ramp_end=0.6, total_steps=200)
    assert p.scheduled_sparsity(20) == 0.0
    assert p.scheduled_sparsity(70) == pytest.approx(0.8 * (1 - 0.5**3))
    assert p.scheduled_sparsity(120) == pytest.approx(0.8)
    assert D2SPruner(target_sparsity=0.8, mode="static", total_steps=200).scheduled_sparsity(0) == 0.8


def test_keep_top_exact_count_and_forced():
    s = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert keep_top(s, 2).tolist() == [True, False, True, False, False]
    forced = torch.tensor([False, True, False, False, False])
    assert keep_top(s, 2, forced).tolist() == [False, True, True, False, False]


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.9])
def test_mask_sparsity_matches_target_unstructured(sparsity):
    model = tiny_dlrm()
    p = D2SPruner(target_sparsity=0.9, importance="magnitude", min_density=0.0, total_steps=10)
    p.attach(model)
    rec = p.update_masks(sparsity)
    total = sum(l.mask.numel() for l in model.mlp_layers().values())
    assert rec["masked"] == pytest.approx(sparsity, abs=1.0 / total)
    kept = torch.cat([(l.weight.abs() * l.mask).flatten() for l in model.mlp_layers().values()])
    dropped = torch.cat([l.weight.abs()[~l.mask] for l in model.mlp_layers().values()])
    if sparsity > 0:  # one global magnitude threshold; only each layer's one forced survivor may lie below it
        assert int((kept[kept > 0] < dropped.max()).sum()) <= len(model.mlp_layers())
    assert rec["overall"] >= rec["masked"] - 1e-9  # dead neurons only add to the served sparsity


def test_global_allocation_learns_layer_sparsity_uniform_does_not():
    model = tiny_dlrm()
    g = D2SPruner(importance="magnitude", min_density=0.0, total_steps=10)
    g.attach(model)
    g.update_masks(0.8)
    per_layer = [1 - float(l.mask.float().mean()) for l in model.mlp_layers().values()]
    assert max(per_layer) - min(per_layer) > 0.1
    u = D2SPruner(importance="magnitude", allocation="uniform", min_density=0.0, total_steps=10)
    u.attach(model)
    u.update_masks(0.8)
    for l in model.mlp_layers().values():
        assert 1 - float(l.mask.float().mean()) == pytest.approx(0.8, abs=1.0 / l.mask.numel() + 1e-9)


def test_neuron_granularity_removes_the_target_fraction_and_shrinks_the_served_model():
    model = tiny_dlrm().eval()
    p = D2SPruner(granularity="neuron", importance="magnitude", total_steps=10)
    p.attach(model)
    rec = p.update_masks(0.5)
    hidden = sum(prod.out_features for prod, _ in model.hidden_neurons().values())
    assert rec["neurons_removed"] == pytest.approx(0.5, abs=1.0 / hidden)
    served = export_served(model)
    kept = sum(served.mlp_layers()[name].weight.shape[0] for name in model.hidden_neurons())
    assert kept == hidden - round(0.5 * hidden)
    x = (torch.randn(7, 3), torch.randint(1, 30, (7, 2)), None)
    with torch.no_grad():
        assert torch.allclose(served(*x), model(*x), atol=1e-5)


def test_regrowth_when_importance_changes():
    model = tiny_dlrm()
    p = D2SPruner(importance="magnitude", min_density=0.0, total_steps=10)
    p.attach(model)
    p.update_masks(0.5)
    layer = model.over_arch.mlp.layers[1]
    pruned = (~layer.mask).nonzero()[:5]
    kept = layer.mask.nonzero()[:5]
    with torch.no_grad():  # the data shifted: pruned shadows became important, kept ones did not
        for (i, j), (a, b) in zip(pruned.tolist(), kept.tolist()):
            layer.weight[i, j] = 10.0
            layer.weight[a, b] = 0.0
    rec = p.update_masks(0.5)
    assert rec["regrown"] >= 5
    assert all(layer.mask[i, j] for i, j in pruned.tolist())
    assert not any(layer.mask[a, b] for a, b in kept.tolist())
    assert rec["masked"] == pytest.approx(0.5, abs=0.01)


# ----------------------------------------------------------------------------- training
def test_adaptive_training_follows_schedule_and_pruned_shadows_keep_learning(stream):
    p = D2SPruner(target_sparsity=0.8, update_every=4, ramp_end=0.5)
    module, dm = fit(stream, p)
    assert p.step == dm.num_optimizer_steps() == 40
    for rec in p.history:
        assert rec["masked"] == pytest.approx(rec["target"], abs=0.02)
    assert p.history[-1]["target"] == pytest.approx(0.8)
    assert p.regrown_total > 0  # masks moved with the data
    assert p.results()["per_layer"].keys() == module.model.mlp_layers().keys()
    # the served model has exact zeros where masked and computes the training model's logits
    served = export_served(module.model, remove_neurons=False)
    for name, layer in module.model.mlp_layers().items():
        assert (served.mlp_layers()[name].weight[~layer.mask] == 0).all()
        assert (layer.weight.detach()[~layer.mask] != 0).any()  # dense shadows are kept
    batch = next(iter(dm.train_dataloader()))
    shrunk = export_served(module.model)
    with torch.no_grad():
        ref = module.score(batch)
        assert torch.allclose(served(batch["dense"], batch["sparse"], None), ref, atol=1e-5)
        assert torch.allclose(shrunk(batch["dense"], batch["sparse"], None), ref, atol=1e-5)


def test_static_mode_prunes_once_and_trains_sparse(stream):
    p = D2SPruner(target_sparsity=0.7, mode="static")
    module, _ = fit(stream, p)
    assert len(p.history) == 1 and p.history[0]["step"] == 0
    for layer in module.model.mlp_layers().values():
        assert (layer.weight.detach()[~layer.mask] == 0).all()  # pruned weights never learned again
    assert p.results()["masked"] == pytest.approx(0.7, abs=0.01)


def test_state_survives_a_checkpoint_round_trip(stream, tmp_path):
    p = D2SPruner(target_sparsity=0.8, update_every=4, ramp_end=0.5, prune_embeddings=True)
    module, _ = fit(stream, p, tmp_path=tmp_path)
    ckpt_path = tmp_path / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)  # plain values and tensors only
    restored = DLRMModule.load_from_checkpoint(ckpt_path, weights_only=True)
    for (name, a), b in zip(module.model.mlp_layers().items(), restored.model.mlp_layers().values()):
        assert torch.equal(a.mask, b.mask), name
        assert torch.equal(a.weight, b.weight), name  # the dense shadows
    for a, b in zip(module.model.embedding_tables().values(), restored.model.embedding_tables().values()):
        assert torch.equal(a.mask, b.mask) and not bool(a.mask.all())
    q = D2SPruner(target_sparsity=0.8, update_every=4, ramp_end=0.5, prune_embeddings=True)
    q.load_state_dict(ckpt["callbacks"][p.state_key])
    assert q.step == p.step and q.history == p.history and q.regrown_total == p.regrown_total
    assert q.grad_ema.keys() == p.grad_ema.keys()
    assert all(torch.equal(q.grad_ema[k], p.grad_ema[k]) for k in p.grad_ema)
    assert restored.window_records == module.window_records
    q.attach(restored.model)
    assert q.results()["per_layer"] == p.results()["per_layer"]


def test_dense_loss_adds_the_unmasked_models_loss_and_restores_masks():
    model = tiny_dlrm()
    p = D2SPruner(importance="magnitude", dense_loss_weight=0.5, total_steps=10)
    p.attach(model)
    p.update_masks(0.6)
    mb = {"dense": torch.randn(6, 3), "sparse": torch.randint(1, 10, (6, 2)), "multi": None, "label": torch.ones(6)}
    sparse_logits = model(mb["dense"], mb["sparse"])
    task = torch.nn.functional.binary_cross_entropy_with_logits(sparse_logits, mb["label"])
    loss, extra = p.training_loss(None, mb, sparse_logits, task)
    for layer in model.mlp_layers().values():
        layer.straight_through = None
    dense = torch.nn.functional.binary_cross_entropy_with_logits(model(mb["dense"], mb["sparse"]), mb["label"])
    for layer in model.mlp_layers().values():
        layer.straight_through = True
    assert extra["dense_loss"] == pytest.approx(float(dense))
    assert float(loss) == pytest.approx(float(task) + 0.5 * float(dense))
    assert torch.allclose(model(mb["dense"], mb["sparse"]), sparse_logits)  # masks are back on


def test_invalid_settings_raise_with_allowed_values():
    with pytest.raises(PrunerConfigError, match=r"granularity='channel'.*\['unstructured', 'neuron'\]"):
        D2SPruner(granularity="channel")
    with pytest.raises(PrunerConfigError, match="target_sparsity"):
        D2SPruner(target_sparsity=1.0)
    with pytest.raises(PrunerConfigError, match="update_every"):
        D2SPruner(update_every=0)
    with pytest.raises(PrunerConfigError, match="ramp_end"):
        D2SPruner(ramp_start=0.5, ramp_end=0.2)
    with pytest.raises(PrunerConfigError, match="DLRM"):
        D2SPruner().attach(torch.nn.Linear(2, 2))


def test_a_stream_shorter_than_the_update_period_still_reaches_the_target(stream):
    """400 rows in batches of 10 are 40 optimizer steps: with update_every=50 only the step-0 update
    would run; the update at the ramp's end (step 20) brings the masks to the target."""
    pruner = D2SPruner(target_sparsity=0.8, update_every=50)
    fit(stream, pruner)
    assert [h["step"] for h in pruner.history] == [0, 20]
    assert pruner.masked_sparsity() == pytest.approx(0.8, abs=0.01)
    assert pruner.results()["target_met"] is True
    short = D2SPruner(target_sparsity=0.8, update_every=50)
    short.total_steps, short.model = 40, None
    assert short.ramp_end_step() == 20


# ----------------------------------------------------------------------------- taylor importance by value (issue 33)
class TwoLayers(torch.nn.Module):
    """What D2SPruner asks of a DLRM, with two prunable layers and no removable hidden neuron."""

    def __init__(self):
        super().__init__()
        from modules.nn.dlrm import MaskedLinear

        self.a = MaskedLinear(2, 2, bias=False)
        self.b = MaskedLinear(2, 1, bias=False)

    def mlp_layers(self):
        return {"bottom.0": self.a, "top.0": self.b}

    def hidden_neurons(self):
        return {}


def test_taylor_importance_and_global_masks_on_two_layers_by_hand():
    """``taylor`` (the default) is |w| times the moving average of |grad| (decay 0.5 here, first gradient
    taken as it is); with w_a = [[1, -2], [0.5, 4]], w_b = [[-3, 0.1]] and two steps of gradients the
    average is [[2, 1], [1, 0.2]] and [[0.4, 6]], the importance [[2, 2], [0.5, 0.8]] and [[1.2, 0.6]],
    and one global ranking at sparsity 0.5 keeps a[0, 0], a[0, 1] and b[0, 0]. Magnitude alone would
    keep a[1, 1] instead of a[0, 0]; dropping the gradient average from ``weight_importance`` (magnitude
    again): checked, it fails."""
    model = TwoLayers()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 4.0]]))
        model.b.weight.copy_(torch.tensor([[-3.0, 0.1]]))
    p = D2SPruner(importance="taylor", grad_decay=0.5, min_density=0.0, total_steps=10)
    p.attach(model)
    for ga, gb in (([[1.0, 1.0], [2.0, 0.1]], [[0.2, 8.0]]), ([[3.0, -1.0], [0.0, 0.3]], [[-0.6, 4.0]])):
        model.a.weight.grad, model.b.weight.grad = torch.tensor(ga), torch.tensor(gb)
        p.accumulate_gradients()
    torch.testing.assert_close(p.grad_ema["bottom.0"], torch.tensor([[2.0, 1.0], [1.0, 0.2]]))
    torch.testing.assert_close(p.grad_ema["top.0"], torch.tensor([[0.4, 6.0]]))
    torch.testing.assert_close(p.weight_importance("bottom.0", model.a), torch.tensor([[2.0, 2.0], [0.5, 0.8]]))
    torch.testing.assert_close(p.weight_importance("top.0", model.b), torch.tensor([[1.2, 0.6]]))
    record = p.update_masks(0.5)
    assert model.a.mask.tolist() == [[True, True], [False, False]] and model.b.mask.tolist() == [[True, False]]
    assert record["masked"] == pytest.approx(0.5) and record["layers"] == {"bottom.0": 0.5, "top.0": 0.5}
