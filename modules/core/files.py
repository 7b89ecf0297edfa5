"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every write goes to a temporary file in the destination's folder (same filesystem), named
``.<name>.<pid>.tmp`` so that ranks or concurrent jobs never share one, and is then renamed
onto the destination with ``os.replace`` (atomic on POSIX and Windows). With ``fsync=True``
the file's data and the folder entry are flushed to disk too, so a power loss after the call
cannot leave an empty file (used for completion records and checkpoints a resume trusts).
If the write raises, the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _fsync_path(path: Path) -> None:
    """Flush ``path``'s data (a file, or a folder's entries) to disk; folders that refuse are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows folders) do not fsync a read-only descriptor
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on a clean exit it replaces ``path``.

    For writers that want a file name (``torch.onnx.export``, ``fig.savefig``, ``torch.save``,
    ``DataFrame.to_csv``). The parent folder is created.

    Args:
        path: the destination.
        fsync: flush the written file and the folder entry to disk.

    Yields:
        the temporary path (same folder, ``.<name>.<pid>.tmp``).

    Raises:
        FileNotFoundError: the block wrote nothing to the temporary path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_path(path.parent)


def write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`) and return ``path`` as a Path."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`) and return ``path`` as a Path."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: str | Path, obj: Any, indent: int | None = 2, fsync: bool = False, **dumps_kwargs: Any) -> Path:
    """Write ``obj`` as JSON plus a final newline to ``path`` atomically and return ``path`` as a Path.

    ``dumps_kwargs`` go to ``json.dumps`` (``default=str``, ``sort_keys``...).

    Raises:
        TypeError / ValueError: ``obj`` is not JSON-serialisable (nothing is written).
    """
    return write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n", fsync=fsync)
