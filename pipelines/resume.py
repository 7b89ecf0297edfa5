"""Resume a killed run: ``python run.py resume=DIR``, completion records, checkpoint policy.

A run dir holds, per phase (``dense``, ``pruned``, each baseline), a folder
``checkpoints/<phase>/`` with

* while the phase runs: ``last.ckpt``, the one resumable checkpoint (model, optimizer,
  loops, callback and pruner state, RNG state; rewritten at every validation, or every
  window for a stream), plus, when the phase monitors a metric, its best checkpoint by
  that metric, weights only (a third of a resumable one with Adam's state);
* when the phase is done: ``final.ckpt``, one checkpoint without optimizer or loop state
  (the chosen weights and the pruner's state at the end of the fit), and
  ``complete.json``, the completion record naming it, written last and atomically
  (temp file, fsync, rename). A phase is finished only when its record says so.

``resume=DIR`` (:func:`resume_argv`, called by run.py before Hydra composes) runs the
config saved in ``DIR/.hydra/config.yaml`` with ``hydra.run.dir=DIR`` (no new run dir).
:func:`fit_or_restore` (called by ``pipelines.common.fit_phase``) skips finished phases,
restoring their module and pruner state from ``final.ckpt``, and continues the open phase
through ``trainer.fit(ckpt_path=<newest checkpoint>)``; each continuation is recorded in
``checkpoints/resumed.json`` and results.json's ``resumed``, with the global step the restored
trainer starts from (:class:`ResumeRecord`). Every checkpoint is written
through :class:`AtomicCheckpointIO` (temp file in the same folder, fsync, rename), and all
load with ``torch.load(weights_only=True)``.

Overrides on resume: only settings that cannot change the result are accepted
(:data:`RESUME_ALLOWED`); any other is refused with a :class:`~modules.core.errors.ConfigError`
naming it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from modules.core.errors import ConfigError, UserError
from modules.core.files import atomic_path, write_json

RECORD_FILE = "complete.json"
FINAL_CKPT = "final.ckpt"
LAST_CKPT = "last.ckpt"  # the one resumable checkpoint of a phase in progress (LastCheckpoint)
RESUMED_FILE = "resumed.json"
#: settings a resume may override (exact keys or prefixes ending in "."): they change how a
#: run reports, never what it computes
RESUME_ALLOWED = (
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "logger.",
    "debug",
    "allow_majority_class_teacher",  # whether a run goes on past a dense model at the majority class, not what it computes
    "hydra.verbose",
    "hydra.job_logging.",
)


class DiskError(UserError):
    """The run dir cannot be written or has too little free space for the checkpoints."""


class NonFiniteLossError(UserError):
    """A training loss became NaN or infinite; the last good checkpoint is kept for a resume."""


# ----------------------------------------------------------------------------- resume=DIR
def resume_argv(argv: list[str]) -> tuple[list[str], Path | None]:
    """Turn ``run.py resume=DIR [overrides]`` into the Hydra command line that continues DIR.

    Returns:
        (the new argv, DIR) or (``argv`` unchanged, None) when there is no ``resume=``.

    Raises:
        ConfigError: DIR holds no saved config, or an override is not in :data:`RESUME_ALLOWED`.
    """
    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return argv, None
    run_dir = Path(resume[-1].split("=", 1)[1]).expanduser().resolve()
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume={run_dir}: no saved config {saved}; give the run dir of an earlier run.")
    rest = [a for a in argv[1:] if not a.startswith("resume=")]
    for arg in rest:
        key = arg.split("=", 1)[0].lstrip("+~")
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_ALLOWED):
            raise ConfigError(
                f"resume={run_dir}: the override {arg!r} would change the result of the run ({key} is fixed by "
                f"{saved}); on resume only {list(RESUME_ALLOWED)} may be set. Start a new run to change {key}."
            )
    new = [argv[0], "--config-path", str(saved.parent), "--config-name", "config",
           f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", *rest]
    return new, run_dir


def is_finished(out_dir: str | Path) -> bool:
    """True when results.json exists and every phase folder's completion record says done."""
    out_dir = Path(out_dir)
    if not (out_dir / "results.json").is_file():
        return False
    phases = [p for p in (out_dir / "checkpoints").glob("*") if p.is_dir()]
    return all((read_record(p) or {}).get("done") for p in phases)


# ----------------------------------------------------------------------------- records
def read_record(phase_dir: Path) -> dict[str, Any] | None:
    """The phase's completion record, or None when the phase has not finished."""
    path = Path(phase_dir) / RECORD_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_record(phase_dir: Path, phase: str, score: float | None, global_step: int | None, **extra: Any) -> None:
    """Write the phase's completion record (``final.ckpt`` is its checkpoint) atomically; ``extra`` adds keys."""
    record = {"done": True, "phase": phase, "checkpoint": FINAL_CKPT, "score": score, "global_step": global_step, **extra}
    write_json(Path(phase_dir) / RECORD_FILE, record, indent=1, fsync=True)


def newest_checkpoint(phase_dir: Path) -> Path | None:
    """The resumable checkpoint of a phase in progress, ``last.ckpt`` (None: none yet).

    The phase's best checkpoint holds weights only (``pipelines.common.build_callbacks``), so it
    is never resumed from, even when a kill fell between its write and last.ckpt's.
    """
    last = Path(phase_dir) / LAST_CKPT
    return last if last.is_file() else None


def resumed_events(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every continuation of this run: ``{"phase", "global_step"}`` in order (for results.json)."""
    path = Path(out_dir) / "checkpoints" / RESUMED_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def _record_resume(out_dir: Path, phase: str, global_step: int) -> None:
    events = resumed_events(out_dir) + [{"phase": phase, "global_step": int(global_step)}]
    write_json(out_dir / "checkpoints" / RESUMED_FILE, events, indent=1, fsync=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO writing each checkpoint atomically next to its destination (same filesystem)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        """``torch.save`` into a temp file next to ``path``, fsync, rename onto ``path`` (:func:`modules.core.files.atomic_path`)."""
        with atomic_path(path, fsync=True) as tmp:
            torch.save(checkpoint, tmp)


# ----------------------------------------------------------------------------- callbacks
class RunState(L.Callback):
    """Saves the global RNG states (torch, numpy, random) in each checkpoint and restores them on resume,
    so dropout and sampled gates after a resume draw what the uninterrupted run drew.

    A phase that starts afresh is seeded with ``seed`` when its training starts (after any
    search in ``on_fit_start``), so its draws do not depend on what the process did before
    (earlier phases fitted here or restored from their records).
    """

    state_key = "RunState"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def state_dict(self) -> dict[str, Any]:
        """RNG states as tensors and plain values (``weights_only`` loadable)."""
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
            "random": [int(version), list(internal), gauss],
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Seed a fresh fit; hand a restored fit's data position to its loaders when Lightning could not.

        Lightning loads the loaders' state when it sets up the training data, but a module
        whose ``configure_optimizers`` asks ``trainer.estimated_stepping_batches`` (BERT's
        warm-up schedule) sets the data up before the checkpoint is restored; then the states
        are still pending here, and the training iterator is rebuilt after loading them.
        """
        loop = trainer.fit_loop
        if not loop.restarting:
            L.seed_everything(self.seed, workers=True, verbose=False)
        if loop.restarting and loop._combined_loader_states_to_load and loop._combined_loader is not None:
            loop._combined_loader._load_state_dicts(loop._combined_loader_states_to_load)
            loop._combined_loader_states_to_load = []
            iter(loop._data_fetcher)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the RNG states."""
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = state_dict["random"]
        random.setstate((version, tuple(internal), gauss))


class NonFiniteLossGuard(L.Callback):
    """Stops the fit at the first NaN or infinite loss, before its backward pass (no checkpoint is written).

    Raises:
        NonFiniteLossError: naming the phase, the global step and the logged loss terms that are not finite.
    """

    def __init__(self, phase: str):
        self.phase = phase

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        bad = []
        try:  # this step's logged values (Lightning's ResultCollection)
            items = list(trainer._results.items())
        except AttributeError:
            items = []
        for key, metric in items:
            try:
                value = metric.value
            except AttributeError:
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not bool(torch.isfinite(value)):
                bad.append(key.split(".", 1)[-1])
        terms = f"non-finite terms logged this step: {sorted(set(bad))}" if bad else "the task loss itself (no logged term is non-finite)"
        raise NonFiniteLossError(
            f"phase {self.phase}: the training loss is {float(loss.detach().float().sum())} at global step "
            f"{trainer.global_step} ({terms}). Check the inputs for NaN/inf values and lower the learning rate; "
            "the last good checkpoint is kept, so `python run.py resume=<run dir>` continues from it."
        )


# ----------------------------------------------------------------------------- disk
def check_disk(out_dir: Path, module: torch.nn.Module, copies: int = 3) -> None:
    """Fail before training when the run dir is not writable or its disk has too little room.

    The estimate of a checkpoint is 3 x the module's parameter bytes (weights and Adam's two
    moments); ``copies`` of it must fit (the resumable one, the best one, a temp file).

    Raises:
        DiskError: naming the folder and the bytes needed / free.
    """
    folder = Path(out_dir) / "checkpoints"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"  # per process: DDP ranks probe the same folder at once
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as err:
        raise DiskError(f"the run dir {out_dir} is not writable ({err.strerror}); set hydra.run.dir or paths.log_dir to a writable folder.") from None
    need = copies * 3 * sum(p.numel() * p.element_size() for p in module.state_dict().values() if isinstance(p, torch.Tensor))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DiskError(
            f"the disk of {folder} has {free / 1e6:.0f} MB free; the checkpoints of this run need about {need / 1e6:.0f} MB. "
            "Free some space or write the run elsewhere (paths.log_dir=...)."
        )


# ----------------------------------------------------------------------------- phases
def _states(callbacks: list[L.Callback]) -> dict[str, Any]:
    return {cb.state_key: state for cb in callbacks if (state := cb.state_dict())}


def finish_phase(out_dir: Path, phase: str, trainer: L.Trainer, chosen: str, score: float | None) -> str:
    """Keep one checkpoint of a finished phase and write its completion record; return the kept path.

    ``final.ckpt`` holds the chosen checkpoint's weights and module extras, without optimizer
    and loop state, and the callbacks' (pruner's) state as it stands at the end of the fit.
    Then the completion record is written, then every other checkpoint of the phase is deleted.
    """
    phase_dir = Path(out_dir) / "checkpoints" / phase
    final = phase_dir / FINAL_CKPT
    if trainer.is_global_zero:  # under DDP rank 0 writes (every rank holds the same state); the others wait
        ckpt = torch.load(chosen, map_location="cpu", weights_only=True)
        for key in ("optimizer_states", "lr_schedulers", "loops"):
            ckpt.pop(key, None)
        ckpt["callbacks"] = _states([cb for cb in trainer.callbacks if not isinstance(cb, RunState)])
        AtomicCheckpointIO().save_checkpoint(ckpt, final)
        write_record(phase_dir, phase, score, int(trainer.global_step))
        remove_resumable(phase_dir)
    trainer.strategy.barrier("litprune_finish_phase")
    return str(final)


def remove_resumable(phase_dir: Path) -> None:
    """Delete a finished phase's other checkpoints (after its record: a kill before that resumes from them)."""
    for p in Path(phase_dir).glob("*.ckpt*"):
        if p.name != FINAL_CKPT:
            p.unlink(missing_ok=True)


def restore_finished(phase_dir: Path, module: L.LightningModule, trainer: L.Trainer, callbacks: list[L.Callback]) -> tuple[str, float | None]:
    """Load a finished phase's module and callback state from its kept checkpoint; return (path, score)."""
    record = read_record(phase_dir)
    remove_resumable(phase_dir)  # left over by a kill between the record and the clean-up
    path = Path(phase_dir) / record["checkpoint"]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    for cb in callbacks:
        cb.setup(trainer, module, "fit")
        if cb.state_key in ckpt.get("callbacks", {}):
            cb.load_state_dict(ckpt["callbacks"][cb.state_key])
    return str(path), record.get("score")


def fit_or_restore(
    out_dir: Path, phase: str, trainer: L.Trainer, module: L.LightningModule, datamodule, extra_callbacks: list,
    choose: Callable[[L.Trainer], tuple[str, float | None]],
) -> tuple[str, float | None, bool]:
    """Run a phase's fit, continue it from its newest checkpoint, or restore it when finished.

    Args:
        choose: picks (checkpoint path, score) from the trainer after the fit.

    Returns:
        (kept checkpoint, its score, whether the fit ran in this process).
    """
    phase_dir = Path(out_dir) / "checkpoints" / phase
    if (read_record(phase_dir) or {}).get("done"):
        path, score = restore_finished(phase_dir, module, trainer, list(extra_callbacks))
        return path, score, False
    ckpt_path = newest_checkpoint(phase_dir)
    # A fit continued from a checkpoint is recorded by ResumeRecord once Lightning has restored it.
    if ckpt_path is None and phase_dir.is_dir() and any(phase_dir.iterdir()):  # killed before its first checkpoint (e.g. mid-search)
        _record_resume(Path(out_dir), phase, 0)
    else:
        check_disk(Path(out_dir), module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    path, score = choose(trainer)
    return finish_phase(Path(out_dir), phase, trainer, path, score), score, True


def phase_callbacks(phase: str, stream: bool, seed: int, out_dir: str | Path) -> list[L.Callback]:
    """Callbacks every phase gets: RNG state (seeded with ``seed`` when the phase starts), the NaN guard,
    the record of a continued fit (:class:`ResumeRecord`, in ``out_dir``) and the resumable ``last.ckpt``
    (after every validation and epoch; for a stream also after every window)."""
    return [RunState(seed), NonFiniteLossGuard(phase), ResumeRecord(out_dir, phase), LastCheckpoint(every_batch=stream)]


class ResumeRecord(L.Callback):
    """Records a fit continued from a checkpoint (``trainer.fit(ckpt_path=...)``) in ``checkpoints/resumed.json``:
    ``{"phase", "global_step"}`` with the global step the trainer holds when training starts, i.e. after
    Lightning restored the checkpoint (0 if it restored nothing). Rank 0 writes."""

    def __init__(self, out_dir: str | Path, phase: str):
        self.out_dir = Path(out_dir)
        self.phase = phase

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None and trainer.is_global_zero:
            _record_resume(self.out_dir, self.phase, int(trainer.global_step))


class LastCheckpoint(Checkpoint):
    """Rewrite ``<ModelCheckpoint dirpath>/last.ckpt`` (full state: resumable) after every validation and
    epoch, and with ``every_batch`` after every training batch (a stream's window).

    Lightning's ModelCheckpoint rewrites ``last`` only when a top-k checkpoint was saved at the
    same step, so a phase whose monitored score never improves would otherwise resume from its
    first validation. Being a ``Checkpoint``, this runs after the ModelCheckpoint in every hook.
    """

    def __init__(self, every_batch: bool = False):
        self.every_batch = every_batch
        self._saved_step = -1

    @staticmethod
    def path(trainer: L.Trainer) -> Path | None:
        """Where the last checkpoint of this trainer's phase goes (None: no ModelCheckpoint)."""
        ckpt = trainer.checkpoint_callback
        if ckpt is None or ckpt.dirpath is None:
            return None
        return Path(ckpt.dirpath) / LAST_CKPT

    def _save(self, trainer: L.Trainer) -> None:
        path = self.path(trainer)
        if path is None or trainer.sanity_checking or self._saved_step == trainer.global_step:
            return
        self._saved_step = trainer.global_step
        trainer.save_checkpoint(str(path), weights_only=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_batch:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)
