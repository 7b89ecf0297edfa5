"""Thread counts of a run: training (``threads``) and latency measurement (``latency.threads``).

No count is tuned to one machine. ``threads: null`` (the default) takes the cores this
process may run on (``os.sched_getaffinity``: a SLURM allocation, ``taskset``, a
container's CPU set), capped by torch's own default (its physical-core count), so a job
given 4 cores of a 64-core node uses 4. ``latency.threads`` is a separate setting (null:
the training count), so the timing protocol is explicit and can stay fixed while training
uses whatever the machine offers.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig


def available_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where that is missing)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def training_threads(cfg: DictConfig) -> int:
    """``cfg.threads``, or (null) the smaller of torch's default and :func:`available_cores`."""
    if cfg.get("threads"):
        return int(cfg.threads)
    return max(1, min(torch.get_num_threads(), available_cores()))


def latency_threads(cfg: DictConfig) -> int:
    """``cfg.latency.threads``, or (null) :func:`training_threads`."""
    lat = cfg.get("latency")
    if lat is not None and lat.get("threads"):
        return int(lat.threads)
    return training_threads(cfg)


def apply_threads(cfg: DictConfig) -> dict[str, int | str]:
    """Set torch's intra-op threads for training; return what results.json records under ``threads``."""
    n = training_threads(cfg)
    torch.set_num_threads(n)
    return {
        "train": n,
        "latency": latency_threads(cfg),
        "available_cores": available_cores(),
        "source": "threads setting" if cfg.get("threads") else "cores available to the process (threads=null)",
    }
