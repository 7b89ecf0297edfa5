"""Entry point: ``python predict.py served=RUN_DIR/served/pruned input=FILE output=OUT.csv`` (see README.md).

Runs an exported model with ONNX Runtime and nothing of the training stack (no torch,
Lightning or transformers; requirements-serve.txt). Writes one CSV row per input:
text models give ``prediction`` (the label) and ``prob_<label>`` per class; recommenders
give ``click_probability``. Inputs are processed in batches with a progress bar. A user
error (missing file, wrong column, a row lacking a feature) prints one line
``error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import os
import sys

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from modules.core.errors import UserError
from modules.core.files import atomic_path

USER_ERROR_STATUS = 2


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Predictions for every request in ``cfg.input`` (see conf/predict.yaml), as a frame.

    Raises:
        modules.core.errors.UserError: an unusable served folder, input file or setting.
    """
    from tqdm import tqdm

    from serving.recommender import ClickModel
    from serving.requests import input_format, read_requests, text_columns
    from serving.runtime import ServedModelError, load_served
    from serving.text import TextClassifier

    if int(cfg.batch_size) < 1:
        raise ServedModelError(f"batch_size={cfg.batch_size} must be >= 1.")
    served = load_served(cfg.served, cfg.threads)
    fmt = input_format(str(cfg.input), cfg.input_format, served.kind)
    frame = read_requests(str(cfg.input), fmt)
    bs = int(cfg.batch_size)

    def batches():
        """Batch start rows, with a progress bar on stderr."""
        starts = range(0, len(frame), bs)
        return tqdm(starts, total=len(starts), unit="batch", disable=not cfg.progress, file=sys.stderr)

    if served.kind == "text":
        model = TextClassifier(served)
        texts, pairs = text_columns(frame, cfg.text_column, cfg.text_pair_column, str(cfg.input))
        probs = [model.predict_proba(texts[i : i + bs], None if pairs is None else pairs[i : i + bs]) for i in batches()]
        p = np.concatenate(probs) if probs else np.zeros((0, len(model.labels)))
        out = pd.DataFrame({"prediction": [model.labels[j] for j in p.argmax(axis=1)]})
        for j, label in enumerate(model.labels):
            out[f"prob_{label}"] = p[:, j]
        return out
    model = ClickModel(served)
    model.encode(frame.iloc[:1])  # a missing column fails before any work
    probs = [model.predict_proba(frame.iloc[i : i + bs]) for i in batches()]
    return pd.DataFrame({"click_probability": np.concatenate(probs) if probs else np.zeros(0)})


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Predict and write the CSV (to ``output``, or stdout)."""
    try:
        out = predict(cfg)
    except UserError as err:
        if cfg.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    if cfg.output:
        with atomic_path(cfg.output) as tmp:
            out.to_csv(tmp, index=False)
    else:
        out.to_csv(sys.stdout, index=False)


if __name__ == "__main__":
    main()
