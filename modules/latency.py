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


def measure_latency_ms(
    calls: dict[str, Callable[[], object]], warmup: int = 3, repeats: int = 10, threads: int | None = None
) -> dict[str, float]:
    """Median latency in ms of each zero-argument callable, measured interleaved.

    Args:
        calls: name -> callable running one inference (its inputs bound already).
        warmup: untimed calls per callable before timing.
        repeats: timed rounds; every round calls each callable once.
        threads: torch intra-op threads during the measurement; None keeps the current
            setting (``torch.get_num_threads()``).

    Returns:
        name -> median ms.

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
    return {k: statistics.median(v) for k, v in times.items()}
