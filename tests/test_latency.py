"""The latency protocol's pieces: interleaved rounds, their medians, per-round ratios with standard errors."""

from __future__ import annotations

import statistics

import pytest

from modules.served.latency import measure_latency_ms, measure_latency_rounds, ratio_over_rounds


def test_rounds_interleave_the_calls_after_their_warmup():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("dense", "pruned")}
    rounds = measure_latency_rounds(calls, warmup=2, repeats=3, threads=1)
    assert {k: len(v) for k, v in rounds.items()} == {"dense": 3, "pruned": 3}
    assert all(ms > 0 for v in rounds.values() for ms in v)
    # torch's Timer may call a statement more than once per timing (its own warm-up): compare runs of calls
    runs = [name for i, name in enumerate(order) if i == 0 or order[i - 1] != name]
    assert runs == ["dense", "pruned"] * (1 + 3)  # the warm-up, then every round: dense, then pruned


def test_median_latency_is_the_median_of_the_rounds(monkeypatch):
    import modules.served.latency as latency

    monkeypatch.setattr(latency, "measure_latency_rounds", lambda calls, *a: {"m": [3.0, 1.0, 2.0, 10.0, 2.5]})
    assert measure_latency_ms({"m": lambda: None}) == {"m": statistics.median([3.0, 1.0, 2.0, 10.0, 2.5])}


def test_ratio_over_rounds_known_values():
    stats = ratio_over_rounds([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])  # ratios 2, 2, 3
    assert stats == pytest.approx({"mean": 7 / 3, "se": statistics.stdev([2, 2, 3]) / 3 ** 0.5, "rounds": 3})
    assert ratio_over_rounds([5.0, 5.0], [2.0, 2.0]) == {"mean": 2.5, "se": 0.0, "rounds": 2}


@pytest.mark.parametrize("a, b", [([1.0, 2.0], [1.0]), ([1.0], [1.0]), ([], [])])
def test_ratio_over_rounds_needs_paired_rounds(a, b):
    with pytest.raises(ValueError, match="same number"):
        ratio_over_rounds(a, b)


def test_bad_protocol_settings_are_refused():
    for kwargs in ({"repeats": 0}, {"warmup": -1}, {"threads": 0}):
        with pytest.raises(ValueError, match="repeats="):
            measure_latency_rounds({"m": lambda: None}, **kwargs)
