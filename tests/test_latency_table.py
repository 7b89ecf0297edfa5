"""Per-layer latency lookup table (SwiftPruner LUT): prediction, monotonicity, state, errors.

No assertion depends on timing ratios: measured figures are only checked for structure
(monotone rows, one row per layer, non-negative) so the tests hold on a busy machine.
"""

from __future__ import annotations

import io

import pytest
import torch
from transformers import BertConfig

from modules.nn.bert import PrunableBertForSequenceClassification
from modules.nn.structured import shrink_structured
from pruners.swiftpruner.latency_table import LatencyTable, measure_model_ms, synthetic_inputs

HEADS = [4, 0, 2]  # unsorted on purpose: measure sorts them
NEURONS = [0, 32, 64]
FAST = dict(warmup=1, repeats=3, threads=1, seq_len=8)


def _model(tiny_bert_config, seed: int = 0) -> PrunableBertForSequenceClassification:
    torch.manual_seed(seed)
    return PrunableBertForSequenceClassification(BertConfig(**tiny_bert_config, num_labels=2)).eval()


@pytest.fixture
def table(tiny_bert_config) -> LatencyTable:
    return LatencyTable.measure(_model(tiny_bert_config), HEADS, NEURONS, **FAST)


def _hand_table() -> LatencyTable:
    return LatencyTable.from_state_dict(
        {
            "head_choices": [0, 2, 4],
            "neuron_choices": [0, 32, 64],
            "attention_ms": [[0.1, 0.5, 0.9], [0.2, 0.6, 1.0]],
            "ffn_ms": [[0.05, 0.3, 0.7], [0.01, 0.4, 0.8]],
            "fixed_ms": 2.0,
            "batch_size": 1,
            "seq_len": 8,
            "threads": 1,
            "warmup": 0,
            "repeats": 1,
        }
    )


# ---------------------------------------------------------------- measuring


def test_measured_table_shape_and_monotone_prediction(table):
    assert table.head_choices == [0, 2, 4] and table.neuron_choices == NEURONS
    assert table.num_layers == 3 and table.layers == "shared"
    assert table.batch_size == 1 and table.seq_len == 8 and table.threads == 1
    assert table.attention_ms[0] == table.attention_ms[2]  # shared: layer 0's row reused
    assert table.smallest_model_ms > 0 and table.largest_model_ms > 0 and table.scale > 0
    assert all(v > 0 for row in table.raw_attention_ms + table.raw_ffn_ms for v in row)
    for layer in range(table.num_layers):
        rest_h, rest_n = [2] * 3, [32] * 3
        by_heads = [table.predict_ms(rest_h[:layer] + [h] + rest_h[layer + 1 :], rest_n) for h in table.head_choices]
        by_neurons = [
            table.predict_ms(rest_h, rest_n[:layer] + [n] + rest_n[layer + 1 :]) for n in table.neuron_choices
        ]
        assert by_heads == sorted(by_heads) and by_neurons == sorted(by_neurons)
    assert table.min_ms() == pytest.approx(table.predict_ms([0] * 3, [0] * 3))


@pytest.mark.parametrize("calibrate", [True, False])
def test_noisy_rows_are_made_monotone_and_calibrated(tiny_bert_config, monkeypatch, calibrate):
    """Fake timer: larger blocks "measure" faster; the table's rows must still be non-decreasing."""
    import pruners.swiftpruner.latency_table as lt

    fake = {"attention/0": 0.3, "attention/2": 0.2, "attention/4": 0.5, "ffn/0": 0.1, "ffn/32": 0.4, "ffn/64": 0.35}
    fake.update(smallest=5.0, largest=11.0)
    monkeypatch.setattr(lt, "measure_latency_ms", lambda calls, **kw: {k: fake[k] for k in calls})
    t = LatencyTable.measure(_model(tiny_bert_config), HEADS, NEURONS, calibrate=calibrate, **FAST)
    assert t.raw_attention_ms == [[0.3, 0.2, 0.5]] * 3 and t.raw_ffn_ms == [[0.1, 0.4, 0.35]] * 3
    # running max, then scale = (11 - 5) / (3 * 0.9 - 3 * 0.4) = 4 fitted through both anchors
    scale = 4.0 if calibrate else 1.0
    assert t.scale == pytest.approx(scale)
    assert t.attention_ms[0] == pytest.approx([scale * v for v in (0.3, 0.3, 0.5)])
    assert t.ffn_ms[2] == pytest.approx([scale * v for v in (0.1, 0.4, 0.4)])
    assert t.fixed_ms == pytest.approx(5.0 - scale * 3 * (0.3 + 0.1))
    assert t.min_ms() == pytest.approx(5.0) == pytest.approx(t.predict_ms([0] * 3, [0] * 3))
    if calibrate:
        assert t.predict_ms([4] * 3, [64] * 3) == pytest.approx(11.0)
    assert (t.smallest_model_ms, t.largest_model_ms) == (5.0, 11.0)
    assert LatencyTable.from_state_dict(t.state_dict()) == t


def test_refit_recovers_a_known_affine_map_and_round_trips():
    t = _hand_table()
    configs = [([0, 2], [32, 0]), ([4, 4], [64, 32]), ([2, 0], [0, 64]), ([4, 2], [32, 32]), ([0, 0], [0, 0])]
    # Whole models that really take 1.5 x the table's blocks + 0.7 ms.
    samples = [(h, n, 1.5 * (t.predict_ms(h, n) - 2.0) + 0.7) for h, n in configs]
    r = t.refit(samples)
    assert r.scale == pytest.approx(1.5) and r.fixed_ms == pytest.approx(0.7) and r.calibration_points == 5
    for h, n, ms in samples:
        assert r.predict_ms(h, n) == pytest.approx(ms)
    assert r.attention_ms[1] == pytest.approx([0.3, 0.9, 1.5])
    assert t.scale == 1.0 and t.fixed_ms == 2.0  # the original is untouched
    assert LatencyTable.from_state_dict(r.state_dict()) == r
    # An affine fit with a negative fixed part is refitted through the origin.
    through_origin = t.refit([(h, n, 2.0 * (t.predict_ms(h, n) - 2.0) - 0.5) for h, n in configs])
    assert through_origin.fixed_ms == 0.0 and through_origin.min_ms() > 0
    # Degenerate fits keep the table: one point, or a slope <= 0 from noise.
    assert t.refit(samples[:1]) == t
    assert t.refit([(h, n, 10.0 - t.predict_ms(h, n)) for h, n in configs]) == t


def test_each_layer_mode_masked_model_and_model_unchanged(tiny_bert_config):
    model = _model(tiny_bert_config).train()
    heads = torch.ones(3, 4)
    heads[1, :2] = 0
    model.set_structured_masks(heads=heads)  # masked full-size model is accepted, masks are ignored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = LatencyTable.measure(model, HEADS, NEURONS, layers="each", **FAST)
    assert model.training  # mode restored
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.layer_structure() == [(4, 64)] * 3
    assert t.layers == "each" and len(t.raw_ffn_ms) == 3
    for row in t.attention_ms + t.ffn_ms:
        assert row == sorted(row)


def test_measure_model_ms_on_shrunk_model(tiny_bert_config):
    model = _model(tiny_bert_config)
    heads = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    neurons = torch.zeros(3, 64)
    neurons[0, :32] = 1
    model.set_structured_masks(heads, neurons)
    small = shrink_structured(model).train()
    ms = measure_model_ms(small, batch_size=2, seq_len=8, warmup=1, repeats=2, threads=1)
    assert ms > 0 and small.training


def test_synthetic_inputs():
    x = synthetic_inputs(2, 5, vocab_size=10, seed=1)
    assert {k: tuple(v.shape) for k, v in x.items()} == {k: (2, 5) for k in x}
    assert bool((x["attention_mask"] == 1).all()) and bool((x["token_type_ids"] == 0).all())
    assert int(x["input_ids"].max()) < 10
    assert torch.equal(x["input_ids"], synthetic_inputs(2, 5, 10, seed=1)["input_ids"])


# --------------------------------------------------------------- predicting


def test_predict_is_fixed_plus_picked_rows():
    t = _hand_table()
    assert t.predict_ms([2, 4], [64, 0]) == pytest.approx(2.0 + 0.5 + 0.7 + 1.0 + 0.01)
    assert t.predict_ms([0, 0], [0, 0]) == pytest.approx(t.min_ms()) == pytest.approx(2.0 + 0.1 + 0.05 + 0.2 + 0.01)
    assert t.predict_ms(torch.tensor([4, 4]), [64, 64]) == pytest.approx(2.0 + 0.9 + 0.7 + 1.0 + 0.8)


# -------------------------------------------------------------------- state


def test_state_round_trip_and_weights_only_load(table):
    d = table.state_dict()
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    loaded = LatencyTable.from_state_dict(torch.load(buf, weights_only=True))
    assert loaded == table == LatencyTable.from_state_dict(d)
    cfg = ([4, 0, 2], [64, 32, 0])
    assert loaded.predict_ms(*cfg) == table.predict_ms(*cfg)


def test_bad_state_is_rejected():
    d = _hand_table().state_dict()
    with pytest.raises(ValueError, match="missing"):
        LatencyTable.from_state_dict({k: v for k, v in d.items() if k != "fixed_ms"})
    with pytest.raises(ValueError, match="3 values"):
        LatencyTable.from_state_dict({**d, "ffn_ms": [[0.1, 0.2], [0.1, 0.2]]})
    with pytest.raises(ValueError, match="format"):
        LatencyTable.from_state_dict({**d, "format": 99})


# ------------------------------------------------------------------- errors


def test_predict_errors_name_layer_and_choices():
    t = _hand_table()
    with pytest.raises(ValueError, match=r"encoder layer 1: heads_kept=3 was not measured.*\[0, 2, 4\]"):
        t.predict_ms([2, 3], [0, 0])
    with pytest.raises(ValueError, match=r"encoder layer 0: neurons_kept=16.*\[0, 32, 64\]"):
        t.predict_ms([2, 2], [16, 0])
    with pytest.raises(ValueError, match="one per encoder layer"):
        t.predict_ms([2], [0])
    with pytest.raises(ValueError, match="integer"):
        t.predict_ms([2.0, 2], [0, 0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_choices=[0, 5]), r"\[5\], out of range.*\[0, 4\]"),
        (dict(neuron_choices=[-1, 64]), r"\[-1\], out of range.*\[0, 64\]"),
        (dict(head_choices=[]), "empty"),
        (dict(head_choices=[2, 2]), "repeats"),
        (dict(head_choices=[1.5]), "integer"),
        (dict(layers="odd"), "layers='odd'.*shared"),
        (dict(batch_size=0), "batch_size"),
        (dict(seq_len=129), "seq_len=129.*128"),
    ],
)
def test_measure_rejects_bad_arguments(tiny_bert_config, kwargs, match):
    args = dict(head_choices=HEADS, neuron_choices=NEURONS, **FAST)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LatencyTable.measure(_model(tiny_bert_config), **args)


def test_measure_rejects_shrunk_model(tiny_bert_config):
    model = _model(tiny_bert_config)
    model.set_structured_masks(heads=torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="unshrunk model"):
        LatencyTable.measure(shrink_structured(model), HEADS, NEURONS, **FAST)
