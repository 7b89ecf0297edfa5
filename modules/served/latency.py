"""Wall-clock inference latency, measured the same way for every model a run compares.

Protocol (written into results.json by :func:`protocol`): ``torch.inference_mode``, a
fixed thread count, ``warmup`` untimed calls, then ``repeats`` timed rounds; the figure
is the median in milliseconds. Models compared in one run are measured in the same
process, interleaved round by round, so that machine noise hits them alike. Each call
is timed by ``torch.utils.benchmark.Timer``, which sets the thread count for the call
and synchronises an accelerator (CUDA) before reading the clock.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch.utils.benchmark import Timer


def protocol(threads: int, warmup: int, repeats: int, what: str, device: str = "cpu") -> dict:
    """Describe how latency was measured (stored next to the figures)."""
    return {
        "device": device,
        "threads": threads,
        "warmup_calls": warmup,
        "timed_calls": repeats,
        "statistic": "median wall-clock ms per call (torch.utils.benchmark.Timer, rounds interleaved), "
        "torch.inference_mode",
        "what": what,
        "torch": torch.__version__,
    }


def measure_latency_rounds(
    calls: dict[str, Callable[[], object]], warmup: int = 3, repeats: int = 10, threads: int | None = None
) -> dict[str, list[float]]:
    """Latency in ms of each zero-argument callable in every round, measured interleaved.

    Args:
        calls: name -> callable running one inference (its inputs bound already).
        warmup: untimed calls per callable before timing.
        repeats: timed rounds; every round calls each callable once, in the order of ``calls``.
        threads: torch intra-op threads during the measurement; None keeps the current
            setting (``torch.get_num_threads()``).

    Returns:
        name -> ``repeats`` ms, one per round (round r of every name timed back to back).

    Raises:
        ValueError: ``repeats`` < 1, ``warmup`` < 0 or ``threads`` < 1.
    """
    if repeats < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise ValueError(f"repeats={repeats} must be >= 1, warmup={warmup} >= 0 and threads={threads} >= 1.")
    n_threads = threads or torch.get_num_threads()
    timers = {name: Timer("fn()", globals={"fn": fn}, num_threads=n_threads) for name, fn in calls.items()}
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        if warmup:
            for timer in timers.values():
                timer.timeit(warmup)
        for _ in range(repeats):
            for name, timer in timers.items():
                times[name].append(timer.timeit(1).median * 1000.0)
    return times


def measure_latency_ms(
    calls: dict[str, Callable[[], object]], warmup: int = 3, repeats: int = 10, threads: int | None = None
) -> dict[str, float]:
    """Median latency in ms of each zero-argument callable, measured interleaved
    (:func:`measure_latency_rounds`, whose arguments and errors it shares).

    Returns:
        name -> median ms.
    """
    return {k: statistics.median(v) for k, v in measure_latency_rounds(calls, warmup, repeats, threads).items()}


def ratio_over_rounds(numerator: list[float], denominator: list[float]) -> dict[str, float | int]:
    """Mean and standard error of the per-round ratio ``numerator[r] / denominator[r]``.

    Two models timed in the same interleaved rounds (:func:`measure_latency_rounds`) share each
    round's machine state, so the per-round ratio (e.g. dense ms / pruned ms: a speedup) is
    steadier than either time; its standard error says whether a speedup differs from a
    threshold by more than the timing noise.

    Args:
        numerator, denominator: ms per round, the same number of rounds (>= 2).

    Returns:
        ``mean`` (the mean ratio), ``se`` (its standard error, sample SD / sqrt(rounds)), ``rounds``.

    Raises:
        ValueError: the lists differ in length or hold fewer than 2 rounds.
    """
    if len(numerator) != len(denominator) or len(numerator) < 2:
        raise ValueError(f"need the same number (>= 2) of rounds, got {len(numerator)} and {len(denominator)}.")
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return {"mean": statistics.fmean(ratios), "se": statistics.stdev(ratios) / len(ratios) ** 0.5, "rounds": len(ratios)}
