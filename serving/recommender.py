"""Request rows for an exported DLRM: encode the features as in training, run, give click probabilities.

The feature schema in ``litprune.json`` (written from
:meth:`modules.data.stream_data.StreamDataModule.feature_schema`) says, per model input, which
column of a request row holds it and how it is transformed; categorical values are
hashed by :func:`modules.core.features.hash_bucket`, the function training used.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from modules.core.features import hash_bucket, hash_multi, signed_log1p
from serving.runtime import ServedModel, ServedModelError, sigmoid


class ClickModel:
    """Score request rows with a served recommender.

    Args:
        served: a loaded served folder of kind ``recommender``.

    Raises:
        ServedModelError: the folder is not a recommender.
    """

    def __init__(self, served: ServedModel):
        if served.kind != "recommender":
            raise ServedModelError(f"{served.folder} holds a {served.kind} model, not a recommender.")
        self.served = served
        self.schema = served.meta["features"]
        self.input_names = [i["name"] for i in served.meta["inputs"]]

    def required_columns(self) -> list[str]:
        """Columns a request row must have."""
        s = self.schema
        return list(dict.fromkeys([f["column"] for f in s["dense"] + s["sparse"] + s["multi"]]))

    def encode(self, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        """``dense`` (B, K) float32, ``sparse`` (B, F_s) int64[, ``multi`` (B, F_m, L) int64] from request rows.

        Raises:
            ServedModelError: a required column is missing (lists them and the columns found),
                or a numeric value is not a finite number (names the column and row).
        """
        missing = [c for c in self.required_columns() if c not in rows.columns]
        if missing:
            raise ServedModelError(
                f"Request rows lack feature column(s) {missing}; the model needs {self.required_columns()} "
                f"and the rows have {list(rows.columns)}."
            )
        s, buckets = self.schema, int(self.schema["hash_buckets"])
        dense = np.zeros((len(rows), len(s["dense"])), dtype=np.float32)
        for j, f in enumerate(s["dense"]):
            raw = pd.to_numeric(rows[f["column"]], errors="coerce")
            bad = ~np.isfinite(raw.to_numpy(dtype=float, na_value=np.nan)) & rows[f["column"]].notna().to_numpy()
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ServedModelError(f"Column {f['column']!r}, row {i}: {rows[f['column']].iloc[i]!r} is not a finite number.")
            values = raw.fillna(0.0).to_numpy(dtype=float)
            dense[:, j] = signed_log1p(values) if f["transform"] == "signed_log1p" else values
        feeds = {"dense": dense}
        feeds["sparse"] = (
            np.stack([hash_bucket(rows[f["column"]].where(rows[f["column"]] != "", None), buckets) for f in s["sparse"]], axis=1)
            if s["sparse"] else np.zeros((len(rows), 0), np.int64)
        )
        if "multi" in self.input_names:
            parts = [hash_multi(rows[f["column"]], buckets, s.get("multi_separator")) for f in s["multi"]]
            width = max(p.shape[1] for p in parts)
            feeds["multi"] = np.stack([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts], axis=1)
        return feeds

    def predict_proba(self, rows: pd.DataFrame) -> np.ndarray:
        """(B,) click probabilities."""
        return sigmoid(self.served.run(self.encode(rows)))
