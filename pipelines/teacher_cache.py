"""Reuse of dense teachers across runs: a sweep over pruner settings fine-tunes each distinct teacher once.

The same cache holds a stream run's dense reference (``pipelines.tasks.stream``): a sweep over D2S
settings trains it once.

An entry lives in ``<paths.teacher_cache_dir>/<key>/`` (default
``${paths.log_dir}/teacher_cache``): ``teacher.ckpt`` and ``complete.json``, written last,
holding the checkpoint's size and SHA-256 and what the key was made of. The key is a
SHA-256 of everything the teacher's weights depend on: the model node (architecture,
optimiser settings: learning rate, weight decay, warm-up; pretrained folder and the sizes
and times of its files), the data node (batch size, lengths, ``limit_per_split``, and the
size and time of any file it names), the seed, the teacher's epochs and monitored metric,
the trainer settings (limits, gradient clipping and accumulation, ``min_epochs`` /
``min_steps``, validation interval; those that only show or log left out), the model's own
trainer settings, the early-stopping callback's settings (``callbacks.early_stopping``:
patience, ``min_epochs``, ``min_delta``; issue 33), the checkpoint callback's settings, and
the torch, Lightning and transformers versions.

Only a dense model that beats the majority-class rate (``pipelines.teacher.teacher_check``,
the ``usable`` argument of :func:`dense_teacher`) is stored or served: a fitted one that does
not is left out of the cache, and an entry that does not (stored by an older version) is
deleted and fitted again.

An entry whose record is missing, whose checkpoint is missing or differs in size or
checksum is stale: it is deleted and rebuilt. Concurrent jobs (joblib, submitit) take a
file lock per key while they look up or build the entry, so the second of two jobs with
the same teacher waits for the first and then loads its checkpoint; the checkpoint is
written under a temporary name and renamed into place.

On a hit, the run's ``checkpoints/dense/`` gets ``final.ckpt``, a hard link (a copy across
file systems) of the cached checkpoint, so its results.json stays relative to the run dir,
and the phase's completion record (``pipelines.resume``): a resumed job restores that
finished phase and never fits its teacher again, whatever ``teacher_cache`` says then.
``teacher_cache``: null (default) uses the cache in multirun jobs only, true always,
false never.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from modules.core.files import atomic_path, write_json
from pipelines.resume import FINAL_CKPT, read_record, write_record

log = logging.getLogger(__name__)

CKPT = "teacher.ckpt"
DENSE_PHASE = "dense"  # the run's phase (checkpoints/dense/) a cached teacher stands in for
RECORD = "complete.json"
#: trainer keys that change what is shown or logged, not the teacher's weights
IGNORED_TRAINER_KEYS = ("default_root_dir", "enable_progress_bar", "enable_model_summary", "log_every_n_steps",
                        "logger", "callbacks", "profiler", "barebones")


def enabled(cfg: DictConfig, multirun: bool) -> bool:
    """Whether this run uses the cache (``cfg.teacher_cache``; null: only in a multirun job).

    Never for a run on several devices or nodes: every rank must join the dense fit, so one
    rank may not wait on the lock while another fits.
    """
    setting = cfg.get("teacher_cache")
    devices, nodes = OmegaConf.select(cfg, "trainer.devices"), OmegaConf.select(cfg, "trainer.num_nodes")
    if devices not in (1, "1", None) or nodes not in (1, None) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return False
    return multirun if setting is None else bool(setting)


def _file_stamp(value: Any) -> Any:
    """(size, mtime) of each file under ``value`` when it names an existing path, else None."""
    if not isinstance(value, str) or not value or not os.path.exists(value):
        return None
    path = Path(value)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]


def _stamps(node: Any) -> dict:
    """File stamps of every string in ``node`` (a plain container) that names an existing path."""
    out: dict[str, Any] = {}

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{key}.{k}")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{key}.{i}")
        else:
            stamp = _file_stamp(v)
            if stamp is not None:
                out[key] = stamp

    walk(node, "")
    return out


def key_material(cfg: DictConfig, epochs: int | None, monitor: str | None) -> dict[str, Any]:
    """Everything the dense teacher depends on, as plain values (the cache key is its hash)."""
    import lightning
    import torch
    import transformers

    plain = lambda node: OmegaConf.to_container(node, resolve=True) if node is not None else None  # noqa: E731
    trainer = {k: v for k, v in (plain(cfg.trainer) or {}).items() if k not in IGNORED_TRAINER_KEYS}
    callback = {k: v for k, v in (plain(OmegaConf.select(cfg, "callbacks.model_checkpoint")) or {}).items() if k != "dirpath"}
    # when the dense phase stops: its patience, min_delta and minimum of training (None: every epoch)
    early_stopping = plain(OmegaConf.select(cfg, "callbacks.early_stopping"))
    model, data = plain(cfg.model), plain(cfg.data)
    return {
        "model": model,
        "data": data,
        "files": _stamps({"model": model, "data": data}),
        "seed": cfg.seed,
        "epochs": epochs,
        "monitor": monitor,
        "trainer": trainer,
        "checkpoint_callback": callback,
        "early_stopping": early_stopping,
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "transformers": transformers.__version__},
    }


def cache_key(material: dict[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of ``material`` as sorted JSON."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def valid_entry(entry: Path) -> bool:
    """Whether ``entry`` holds a complete record and a checkpoint of the recorded size and checksum."""
    record, ckpt = entry / RECORD, entry / CKPT
    try:
        rec = json.loads(record.read_text())
        return ckpt.is_file() and ckpt.stat().st_size == rec["size"] and sha256_file(ckpt) == rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _link_or_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def store(entry: Path, ckpt: Path, material: dict[str, Any]) -> None:
    """Put ``ckpt`` into ``entry`` (temporary name, then rename) and write its record last."""
    entry.mkdir(parents=True, exist_ok=True)
    _link_or_copy(ckpt, entry / CKPT)
    record = {"size": (entry / CKPT).stat().st_size, "sha256": sha256_file(entry / CKPT), "created": time.time(),
              "key_material": material}
    write_json(entry / RECORD, record, indent=2, default=str)


def dense_teacher(
    cfg: DictConfig, out_dir: Path, epochs: int | None, monitor: str | None, fit: Callable[[], str], multirun: bool,
    usable: Callable[[str], bool] | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """The dense checkpoint: from the cache when an entry matches, else ``fit()`` (stored for later runs).

    Args:
        cfg: the run's config (``paths.teacher_cache_dir``, ``teacher_cache``, what the key hashes).
        out_dir: the run dir (a cached checkpoint is linked into ``checkpoints/dense/``).
        epochs, monitor: the dense phase's plan.
        fit: runs the dense phase and returns its checkpoint path.
        multirun: whether this is a multirun job (the default uses the cache only then).
        usable: ``usable(checkpoint path)``: whether that teacher may be stored and served (a text
            teacher: it beats the majority class); None: every teacher is. Asked only when the cache is on.

    Returns:
        (checkpoint path, the results.json record ``{"key", "hit", "entry", "stored"}``, or None when
        the cache is off).
    """
    phase_dir = out_dir / "checkpoints" / DENSE_PHASE
    own = read_record(phase_dir) or {}
    if own.get("done"):  # a resumed run whose dense phase finished: fit() restores it (fitted here or cached)
        return fit(), own.get("teacher_cache")
    if not enabled(cfg, multirun):
        return fit(), None
    from filelock import FileLock

    root = Path(OmegaConf.select(cfg, "paths.teacher_cache_dir") or Path(cfg.paths.log_dir) / "teacher_cache")
    material = key_material(cfg, epochs, monitor)
    key = cache_key(material)
    entry = root / key
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if valid_entry(entry) and usable is not None and not usable(str(entry / CKPT)):
            log.warning("teacher cache entry %s holds a dense model at the majority-class rate; deleting it and "
                        "fitting the teacher again", entry)
            shutil.rmtree(entry)
        if valid_entry(entry):
            # the run's dense phase is then finished like a fitted one: final.ckpt and its completion
            # record, so a resume of this run restores it instead of fitting the teacher again
            _link_or_copy(entry / CKPT, phase_dir / FINAL_CKPT)
            cached = {"key": key, "hit": True, "entry": str(entry), "stored": True}
            write_record(phase_dir, DENSE_PHASE, None, None, teacher_cache=cached)
            log.info("dense teacher from the cache: %s", entry)
            return str(phase_dir / FINAL_CKPT), cached
        if entry.exists():
            log.warning("teacher cache entry %s is incomplete or corrupt; rebuilding it", entry)
            shutil.rmtree(entry)
        path = fit()
        if usable is not None and not usable(path):
            log.warning("the dense model does not beat the majority-class rate: it is not stored in the teacher cache")
            return path, {"key": key, "hit": False, "entry": str(entry), "stored": False}
        store(entry, Path(path), material)
        return path, {"key": key, "hit": False, "entry": str(entry), "stored": True}
