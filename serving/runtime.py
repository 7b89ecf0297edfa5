"""Load an exported model folder (``served/<name>/``) into an ONNX Runtime session.

A served folder holds ``model.onnx``, ``litprune.json`` (what the model needs and
gives, and how it was pruned) and, for text models, ``tokenizer.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modules.core.errors import MissingFileError, UserError

MODEL_FILE = "model.onnx"
META_FILE = "litprune.json"


class ServedModelError(UserError, ValueError):
    """A served folder or a request that the served model cannot use; the message says how to fix it."""


def make_session(path: str | Path, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU with every graph optimisation on.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (None: ONNX Runtime's choice). Inter-op parallelism is
            off and idle threads do not spin, so timing it beside PyTorch in one process
            does not steal the other's cores.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def graph_feeds(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The entries of ``feeds`` the session's graph takes (an input no output depends on, e.g. the
    attention mask of a model with every head removed, is not in the exported graph)."""
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}


@dataclass
class ServedModel:
    """An exported model ready to run.

    Attributes:
        folder: the served folder.
        meta: the parsed ``litprune.json``.
        session: the ONNX Runtime session.
    """

    folder: Path
    meta: dict[str, Any]
    session: Any

    @property
    def kind(self) -> str:
        """``text`` (a BERT classifier) or ``recommender`` (a DLRM)."""
        return self.meta["kind"]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The model's first output for ``feeds`` (input name -> array)."""
        return self.session.run(None, graph_feeds(self.session, feeds))[0]


def load_served(folder: str | Path, threads: int | None = None) -> ServedModel:
    """Open ``folder`` (a ``served/<name>`` folder of a run).

    Raises:
        modules.core.errors.MissingFileError: no such folder, or no model.onnx / litprune.json in it.
        ServedModelError: litprune.json is not valid JSON or lacks its ``kind``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(
            f"served={folder} is not a folder; give a run's served model folder, e.g. RUN_DIR/served/pruned "
            "(python export.py run_dir=RUN_DIR writes it)."
        )
    for name in (MODEL_FILE, META_FILE):
        if not (folder / name).is_file():
            raise MissingFileError(f"{folder} has no {name}; re-export the run with python export.py run_dir=RUN_DIR.")
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ServedModelError(f"{folder / META_FILE} is not valid JSON ({err}); re-export the run.") from None
    if meta.get("kind") not in ("text", "recommender"):
        raise ServedModelError(f"{folder / META_FILE} names no model kind ('text' or 'recommender'); re-export the run.")
    return ServedModel(folder, meta, make_session(folder / MODEL_FILE, threads))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, C) logits, float64."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Elementwise logistic function, float64."""
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
