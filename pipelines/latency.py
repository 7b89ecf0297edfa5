"""Wall-clock inference latency, measured the same way for every model a run compares.

Protocol (written into results.json by :func:`protocol`): CPU, ``torch.inference_mode``,
a fixed thread count, ``warmup`` untimed calls, then ``repeats`` timed calls of the
same inputs; the figure is the median in milliseconds. Models compared in one
run are measured in the same process, interleaved round by round, so that
machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def protocol(threads: int, warmup: int, repeats: int, what: str) -> dict:
    """Describe how latency was measured (stored next to the figures)."""
    return {
        "device": "cpu",
        "threads": threads,
        "warmup_calls": warmup,
        "timed_calls": repeats,
        "statistic": "median wall-clock ms per call (time.perf_counter), torch.inference_mode",
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
        threads: torch intra-op threads during the measurement (restored after);
            None keeps the current setting.

    Returns:
        name -> median ms.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0.")
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    times: dict[str, list[float]] = {k: [] for k in calls}
    try:
        with torch.inference_mode():
            for fn in calls.values():
                for _ in range(warmup):
                    fn()
            for _ in range(repeats):
                for name, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(old)
    return {k: statistics.median(v) for k, v in times.items()}
