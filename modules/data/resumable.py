"""Training data loaders that a resumed fit continues exactly where the killed one stopped.

Lightning restores a fit mid-epoch (``trainer.fit(ckpt_path=...)``) but restarts a plain
``DataLoader`` from its first batch, and a shuffled sampler draws its order from the
global RNG. :class:`ResumableLoader` implements Lightning's stateful-loader interface
(``state_dict`` / ``load_state_dict``): after a restore, its next iterator skips the batches
the restored loop had already processed in the epoch. :class:`EpochSeededSampler` makes a
sampler's order a function of (seed, epoch) only (Lightning calls ``set_epoch``), so the
skipped batches are the very ones the killed run had trained on.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler):
    """Wrap a sampler that takes a ``generator`` attribute (e.g. transformers' ``LengthGroupedSampler``).

    Each epoch's order comes from ``torch.Generator().manual_seed(seed * 1_000_003 + epoch)``,
    never from the global RNG, so a resumed run sees the same order as an uninterrupted one.
    """

    def __init__(self, base: Sampler, seed: int):
        self.base, self.seed, self.epoch = base, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        self.base.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose first iterator after a checkpoint restore skips the batches already trained on.

    Args:
        processed: a callable returning (epoch, batches of that epoch the restored training loop
            has processed); read only after :meth:`load_state_dict`.
        *args, **kwargs: ``torch.utils.data.DataLoader``'s. A ``generator`` is set when none is
            given, so creating an iterator never draws from the global RNG (which a resume restores).
    """

    def __init__(self, *args, processed: Callable[[], int] | None = None, **kwargs):
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(0)
        super().__init__(*args, **kwargs)
        self._processed = processed
        self._skip_pending = False

    def state_dict(self) -> dict[str, Any]:
        """Nothing to store: the position is the restored loop's own batch count."""
        return {"resumable": True}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Mark the next iterator to skip the batches the restored loop has processed."""
        self._skip_pending = True

    def __iter__(self):
        if not (self._skip_pending and self._processed is not None):
            return super().__iter__()
        self._skip_pending = False
        epoch, done = self._processed()
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):  # Lightning sets it only after this first iterator exists
                sampler.set_epoch(epoch)
        it = super().__iter__()
        if 0 < done < len(self):
            for _ in range(done):
                next(it)
        return it


def loop_progress(datamodule) -> Callable[[], tuple[int, int]]:
    """A callable giving (epoch, batches processed in it) of the training loop of ``datamodule.trainer``."""

    def processed() -> tuple[int, int]:
        trainer = getattr(datamodule, "trainer", None)
        if trainer is None:
            return 0, 0
        loop = trainer.fit_loop
        return int(loop.epoch_progress.current.processed), int(loop.epoch_loop.batch_progress.current.processed)

    return processed
