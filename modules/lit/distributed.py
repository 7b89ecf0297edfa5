"""Rank-aware helpers shared by the modules, the pruners and the pipelines (Lightning strategies, not our own).

A run under ``trainer=ddp`` is several processes (ranks) running the same script; Lightning's
strategy (``trainer.strategy``) does the communication. Pruning decisions must be identical on
every rank (NNI issue #5205: per-rank Taylor masks), so the pruners all-reduce the statistics
they decide from (:func:`mean_`), gather what each rank saw (:func:`gather_rows`), split a list of
evaluations between the ranks (:func:`shared_map`) or decide on rank 0 and share the outcome
(:func:`broadcast`, :func:`on_rank_zero`); rank 0 alone writes files (:func:`is_global_zero`).
:func:`state_digest` hashes a model's masks and gates so that results.json can show every rank
ended with the same pruning.

Every helper is a no-op (or the identity) in a single process.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn


def distributed() -> bool:
    """True when a torch.distributed process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    return dist.get_world_size() if distributed() else 1


def global_rank() -> int:
    """This process's global rank: the process group's, else Lightning's launch variables (``NODE_RANK``,
    ``LOCAL_RANK``, SLURM's ``SLURM_PROCID``, ``RANK``), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    if "LOCAL_RANK" in os.environ:
        # Lightning's subprocess launcher sets LOCAL_RANK and NODE_RANK before the process group exists.
        local = int(os.environ["LOCAL_RANK"])
        node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or max(local + 1, 1)
        return node * per_node + local if node else local
    return 0


def is_global_zero() -> bool:
    """True on the process that writes results, plots and exports (rank 0, or the only process)."""
    return global_rank() == 0


def mean_(tensors: Iterable[torch.Tensor | None]) -> None:
    """Average each tensor over the ranks, in place (None entries skipped; a no-op in one process).

    Every rank must call it with the same tensors (shapes, dtypes, order); results are bitwise
    identical on every rank.
    """
    if not distributed():
        return
    n = dist.get_world_size()
    for t in tensors:
        if t is None:
            continue
        if t.dtype == torch.bool:
            raise TypeError("mean_ needs float tensors, got bool.")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(n)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the (N_r, ...) tensor of every rank, in rank order (the identity in one process).

    Ranks may hold different numbers of rows; the other dims must agree. Returns a tensor on
    ``t``'s device.
    """
    if not distributed():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; the identity in one process)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` in one process)."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


T = TypeVar("T")
R = TypeVar("R")


def shared_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` computed in shares: rank r evaluates the items i with i % world_size == r,
    and every rank gets all the results, in the order of ``items`` (a plain loop in one process).

    Every rank must call it with the same items; ``fn``'s results must be picklable (host
    tensors). Results are gathered with :func:`gather_objects`, so each is bitwise the value
    the rank that computed it got.
    """
    if not distributed():
        return [fn(x) for x in items]
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = gather_objects([fn(x) for x in items[rank::world]])
    out: list[Any] = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


class RankZeroError(RuntimeError):
    """On the other ranks: what rank 0 raised in :func:`on_rank_zero` when the exception itself could not be sent."""


def on_rank_zero(fn: Callable[[], R]) -> R:
    """``fn()`` run on rank 0 alone; every rank returns its value, or raises what it raised.

    The other ranks wait in a broadcast, so a failure on rank 0 fails every rank with the same
    exception instead of leaving them waiting (an exception that cannot be pickled arrives as
    :class:`RankZeroError` with its type and message). ``fn``'s value must be picklable. In one
    process it is ``fn()``.
    """
    if not distributed():
        return fn()
    outcome: tuple[bool, Any] | None = None
    if dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as exc:  # noqa: BLE001 - sent to the other ranks, then raised again here
            try:
                broadcast((False, exc))
            except Exception:  # noqa: BLE001 - the exception could not be pickled: send its text
                broadcast((False, RankZeroError(f"{type(exc).__name__} on rank 0: {exc}")))
            raise
    ok, value = broadcast(outcome)
    if not ok:
        raise value
    return value


#: state-dict key endings that hold a pruning decision (masks and gates)
DECISION_KEYS = ("mask", "bias_mask", "head_mask", "neuron_mask", "frozen_flag", "frozen_layer_on", "frozen_kept", "log_alpha")


def state_digest(module: nn.Module, keys: tuple[str, ...] = DECISION_KEYS) -> str:
    """SHA-256 (hex, first 16 digits) of the module's pruning: the name and shape of every state-dict entry
    (a physically shrunk model's shapes are its decisions) and the values of those whose name ends with one
    of ``keys`` (masks and gates), in name order, as host bytes. Equal digests on two ranks mean equal pruning."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            continue
        h.update(f"{name}{tuple(value.shape)}".encode())
        if name.rsplit(".", 1)[-1] in keys:
            h.update(value.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
