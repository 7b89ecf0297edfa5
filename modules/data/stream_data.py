"""Time-ordered click streams cut into consecutive windows, for prequential evaluation.

Three sources, one encoding:

* :class:`MovieLensStream` (``data=movielens``): MovieLens-100K shipped in recbole==1.2.1,
  sorted by timestamp, click = rating >= 4, with user / item side features and
  past-only history features.
* :class:`CsvStream` (``data=stream_csv``): any CSV or Parquet log with a timestamp, a
  binary label, categorical and numeric columns.
* :class:`CriteoStream` (``data=criteo``): the Criteo display-advertising TSV format
  (label, 13 integer, 26 hashed categorical features; empty fields allowed; rows are
  already in time order).

Every source yields a :class:`EncodedStream` of ``N`` rows in time order:

* ``dense`` ``(N, K)`` float32 numeric features (stateless transforms or past-only counts);
* ``sparse`` ``(N, F_s)`` int64 bucket ids of the single-valued categorical features,
  hashed into ``[1, hash_buckets)`` with a fixed hash (``pandas.util.hash_array``), so ids
  never seen before map to a valid row and no vocabulary is built from the future;
* ``multi`` ``(N, F_m, L)`` int64 bucket ids of multi-valued features, padded with 0;
* ``label`` ``(N,)`` float32 0/1; ``timestamp`` ``(N,)`` float64 (seconds, or the row
  number when the source has no clock); ``window`` ``(N,)`` int64, non-decreasing.

The stream is cut into windows by ``window``: an integer (rows per window) or a time
span string understood by ``pandas.Timedelta`` (``"7D"``, ``"12h"``). A training
"batch" is one whole window (see ``modules.lit.dlrm.DLRMModule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from modules.data.data_checks import delimiter_hint, integer_values
from modules.core.features import MISSING, hash_bucket, hash_multi, signed_log1p  # noqa: F401  (re-exported)
from modules.core.packages import package_file
from modules.data.resumable import ResumableLoader, loop_progress
from modules.data.stream_readers import count_lines, criteo_chunks, keep_earliest, log_chunks, log_columns
from modules.core.errors import DataError

def past_history(keys: pd.Series, timestamps: pd.Series, labels: pd.Series, prior: float = 0.5, strength: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many earlier events the same key had, and its smoothed past click rate.

    Only events with a strictly earlier timestamp count (ties are not "before"), so a
    feature never looks at the current event, an event at the same second, or the future.
    Rows must already be sorted by time.

    Args:
        keys: ``(N,)`` entity of each event (user id, item id, ...).
        timestamps: ``(N,)`` non-decreasing.
        labels: ``(N,)`` 0/1.
        prior, strength: the rate is ``(clicks + prior * strength) / (count + strength)``.

    Returns:
        ``count_before`` ``(N,)`` float and ``rate_before`` ``(N,)`` float.
    """
    frame = pd.DataFrame({"k": keys.to_numpy(), "t": timestamps.to_numpy(), "y": labels.to_numpy(dtype=float)})
    by_key = frame.groupby("k", sort=False)
    by_tie = frame.groupby(["k", "t"], sort=False)
    count = by_key.cumcount().to_numpy() - by_tie.cumcount().to_numpy()
    clicks = (by_key["y"].cumsum() - frame["y"]).to_numpy() - (by_tie["y"].cumsum() - frame["y"]).to_numpy()
    rate = (clicks + prior * strength) / (count + strength)
    return count.astype(float), rate


def assign_windows(timestamps: np.ndarray, window: int | str, has_clock: bool = True) -> np.ndarray:
    """Window index ``(N,)`` (0, 1, 2, ... consecutive, empty spans skipped) of time-ordered rows.

    Args:
        timestamps: ``(N,)`` non-decreasing, in seconds.
        window: rows per window (int >= 1) or a time span (``"7D"``, ``"1h"``; pandas Timedelta).
        has_clock: False when the source has no timestamps (then only row counts are allowed).

    Raises:
        DataError: a bad window setting.
    """
    n = len(timestamps)
    if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        if window < 1:
            raise DataError(f"data.window={window} must be >= 1 rows or a time span such as '7D'.")
        return np.arange(n, dtype=np.int64) // int(window)
    if isinstance(window, str) and window.strip().isdigit():
        return assign_windows(timestamps, int(window), has_clock)
    if not has_clock:
        raise DataError(f"data.window={window!r}: this stream has no timestamps; give a row count, e.g. data.window=10000.")
    try:
        span = pd.Timedelta(window).total_seconds()
    except (ValueError, TypeError):
        raise DataError(f"data.window={window!r} is neither a row count nor a time span like '7D' or '12h'.") from None
    if span <= 0:
        raise DataError(f"data.window={window!r} must be a positive time span.")
    raw = np.floor((timestamps - timestamps[0]) / span).astype(np.int64) if n else np.zeros(0, np.int64)
    _, dense_ids = np.unique(raw, return_inverse=True)
    return dense_ids.astype(np.int64)


@dataclass
class EncodedStream:
    """A time-ordered, encoded stream (shapes in the module docstring)."""

    dense: torch.Tensor
    sparse: torch.Tensor
    multi: torch.Tensor
    label: torch.Tensor
    timestamp: torch.Tensor
    window: torch.Tensor
    dense_names: list[str]
    sparse_names: list[str]
    multi_names: list[str]
    num_embeddings: list[int]
    multi_num_embeddings: list[int]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def num_windows(self) -> int:
        """Number of windows."""
        return int(self.window[-1]) + 1 if len(self) else 0

    def window_bounds(self) -> list[tuple[int, int]]:
        """``[(start_row, end_row), ...]`` of each window (end exclusive)."""
        counts = torch.bincount(self.window, minlength=self.num_windows).tolist()
        ends = np.cumsum(counts).tolist()
        return [(e - c, e) for c, e in zip(counts, ends)]


def encode(
    frame: pd.DataFrame,
    *,
    timestamps: np.ndarray,
    labels: np.ndarray,
    dense_columns: list[str],
    sparse_columns: list[str],
    multi_columns: list[str],
    hash_buckets: int,
    window: int | str,
    multi_separator: str | None = None,
    has_clock: bool = True,
    info: dict | None = None,
) -> EncodedStream:
    """Encode a time-sorted frame whose numeric columns are already transformed (see module docstring).

    Raises:
        DataError: no categorical feature, no numeric feature, or a bad window.
    """
    n = len(frame)
    dense = frame[dense_columns].to_numpy(dtype=np.float32) if n else np.zeros((0, len(dense_columns)), np.float32)
    sparse = np.stack([hash_bucket(frame[c], hash_buckets) for c in sparse_columns], axis=1) if sparse_columns else np.zeros((n, 0), np.int64)
    if multi_columns:
        parts = [hash_multi(frame[c], hash_buckets, multi_separator) for c in multi_columns]
        width = max(p.shape[1] for p in parts)
        multi = np.stack([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts], axis=1)
    else:
        multi = np.zeros((n, 0, 1), np.int64)
    return assemble(dense, sparse, multi, labels, timestamps, dense_columns, sparse_columns, multi_columns,
                    hash_buckets, window, has_clock, info)


def assemble(dense: np.ndarray, sparse: np.ndarray, multi: np.ndarray, labels: np.ndarray, timestamps: np.ndarray,
             dense_names: list[str], sparse_names: list[str], multi_names: list[str], hash_buckets: int,
             window: int | str, has_clock: bool = True, info: dict | None = None) -> EncodedStream:
    """An :class:`EncodedStream` of encoded, time-sorted arrays (shapes in the module docstring), windows assigned.

    Raises:
        DataError: no categorical feature, no numeric feature, or a bad window.
    """
    if not sparse_names and not multi_names:
        raise DataError("The stream needs at least one categorical column (data.categorical_columns).")
    if not dense_names:
        raise DataError("The stream needs at least one numeric feature (data.numeric_columns or history columns).")
    ts = np.asarray(timestamps, dtype=np.float64)
    return EncodedStream(
        dense=torch.from_numpy(np.require(dense, np.float32, ["C", "W"])),  # copied if read-only (a pandas view)
        sparse=torch.from_numpy(np.ascontiguousarray(sparse)),
        multi=torch.from_numpy(np.ascontiguousarray(multi)),
        label=torch.from_numpy(np.array(labels, dtype=np.float32)),
        timestamp=torch.from_numpy(ts.copy()),
        window=torch.from_numpy(assign_windows(ts, window, has_clock)),
        dense_names=list(dense_names),
        sparse_names=list(sparse_names),
        multi_names=list(multi_names),
        num_embeddings=[hash_buckets] * len(sparse_names),
        multi_num_embeddings=[hash_buckets] * len(multi_names),
        info=dict(info or {}),
    )


# ----------------------------------------------------------------------------- datasets
class WindowDataset(Dataset):
    """Item ``w`` is window ``w`` as one dict: ``dense``, ``sparse``, ``multi``, ``label`` (rows of the
    window), ``window`` (int), ``start`` (first timestamp) and ``minibatch_size`` (int)."""

    def __init__(self, stream: EncodedStream, minibatch_size: int):
        self.stream, self.minibatch_size = stream, minibatch_size
        self.bounds = stream.window_bounds()

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, w: int) -> dict:
        a, b = self.bounds[w]
        s = self.stream
        return {
            "dense": s.dense[a:b],
            "sparse": s.sparse[a:b],
            "multi": s.multi[a:b],
            "label": s.label[a:b],
            "window": w,
            "start": float(s.timestamp[a]) if b > a else math.nan,
            "minibatch_size": self.minibatch_size,
        }


class StreamDataModule(L.LightningDataModule):
    """Base class: subclasses implement :meth:`load` returning an :class:`EncodedStream`.

    The train dataloader yields the windows in time order, one window per batch, never
    shuffled. There is no validation loop: evaluation is prequential inside training.

    Args:
        window: rows per window (int) or a time span (``"7D"``).
        batch_size: training minibatch size inside a window.
        hash_buckets: rows of every embedding table (ids are hashed into ``[1, hash_buckets)``).
        limit_rows: keep only the first ``limit_rows`` rows of the time-ordered stream.

    Raises:
        DataError: bad settings (at construction) or unusable data (at :meth:`setup`).
    """

    def __init__(self, window: int | str = "7D", batch_size: int = 256, hash_buckets: int = 4096, limit_rows: int | None = None):
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"data.batch_size={batch_size!r} must be an integer >= 1.")
        if isinstance(hash_buckets, bool) or not isinstance(hash_buckets, int) or hash_buckets < 2:
            raise DataError(f"data.hash_buckets={hash_buckets!r} must be an integer >= 2.")
        if limit_rows is not None and (not isinstance(limit_rows, int) or limit_rows < 1):
            raise DataError(f"data.limit_rows={limit_rows!r} must be null or an integer >= 1.")
        self.window, self.batch_size, self.hash_buckets, self.limit_rows = window, batch_size, hash_buckets, limit_rows
        self.stream: EncodedStream | None = None

    def load(self) -> EncodedStream:
        """Read, sort, featurize and encode the whole stream."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load the stream once and check it can be evaluated prequentially.

        Raises:
            DataError: no rows; fewer than two windows (every window is scored before the model
                trains on it, so a single window is scored only by the untrained model); a single
                class (AUC and normalized entropy are undefined).
        """
        if self.stream is None:
            stream = self.load()
            if len(stream) == 0:
                raise DataError("The stream has no rows after loading; check the file and data.limit_rows.")
            if stream.num_windows < 2:
                raise DataError(
                    f"The stream is one window of {len(stream)} rows (data.window={self.window!r}): every window is "
                    "scored before the model trains on it, so the model would only ever be scored untrained. Use a "
                    "smaller data.window (a shorter time span, e.g. 1D, or a row count) so that the stream has at "
                    "least two windows; the headline metrics average the second half of them."
                )
            clicks = float(stream.label.sum())
            if clicks in (0.0, float(len(stream))):
                raise DataError(
                    f"Every label of the stream is {int(clicks > 0)}: a click model needs both classes (0 and 1), and "
                    "AUC and normalized entropy are undefined without them. Check data.label_column."
                )
            self.stream = stream

    def model_sizes(self) -> dict[str, Any]:
        """Feature sizes the DLRM needs: ``num_dense``, ``num_embeddings``, ``multi_num_embeddings``."""
        self.setup()
        s = self.stream
        return {"num_dense": len(s.dense_names), "num_embeddings": s.num_embeddings, "multi_num_embeddings": s.multi_num_embeddings}

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        # a resumed fit continues at the window after the last one it trained on
        return ResumableLoader(WindowDataset(self.stream, self.batch_size), batch_size=None, shuffle=False, num_workers=0,
                               processed=loop_progress(self))

    def num_optimizer_steps(self) -> int:
        """Minibatch (optimizer) steps of one pass over the stream."""
        self.setup()
        return sum(math.ceil((b - a) / self.batch_size) for a, b in self.stream.window_bounds())

    def describe(self) -> dict[str, Any]:
        """Stream statistics for results.json (rows, windows, click rate, time span, features)."""
        self.setup()
        s = self.stream
        return {
            "rows": len(s),
            "windows": s.num_windows,
            "window": self.window,
            "click_rate": float(s.label.mean()),
            "first_timestamp": float(s.timestamp[0]),
            "last_timestamp": float(s.timestamp[-1]),
            "numeric_features": s.dense_names,
            "categorical_features": s.sparse_names,
            "multi_valued_features": s.multi_names,
            "hash_buckets": self.hash_buckets,
            **s.info,
        }

    def _limit(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame.iloc[: self.limit_rows] if self.limit_rows else frame

    def feature_schema(self) -> dict[str, Any]:
        """How a request row becomes the served model's inputs (written to ``litprune.json``).

        ``dense``: one entry per numeric input, in model order: ``name`` (the model's
        feature), ``column`` (the row's column holding it) and ``transform`` (``identity``
        or ``signed_log1p``: ``sign(x) log(1 + |x|)``, missing -> 0); ``sparse`` and
        ``multi``: the categorical columns in model order, hashed as
        :func:`modules.core.features.hash_bucket` does into ``[1, hash_buckets)``; multi-valued
        columns are split on ``multi_separator`` (whitespace when null).
        """
        self.setup()
        s = self.stream
        return {
            "dense": [{"name": n, **self._dense_feature(n)} for n in s.dense_names],
            "sparse": [{"name": n, "column": n} for n in s.sparse_names],
            "multi": [{"name": n, "column": n.removeprefix("multi:")} for n in s.multi_names],
            "multi_separator": getattr(self, "multi_separator", None),
            "hash_buckets": self.hash_buckets,
            "hash": "pandas.util.hash_array of the value as a string (missing -> '<missing>'), mod (hash_buckets - 1), plus 1",
        }

    def write_serving_files(self, folder: Path) -> dict[str, Any]:
        """Nothing to write beside the model: return litprune.json's ``features`` (:meth:`feature_schema`) and ``labels``."""
        return {"features": self.feature_schema(), "labels": ["no_click", "click"]}

    def _dense_feature(self, name: str) -> dict[str, str]:
        """Where numeric input ``name`` comes from in a request row (default: a column of that name, as is)."""
        return {"column": name, "transform": "identity"}


def _line_of(index_label: Any, header: bool = True) -> int:
    """1-based file line of a row with 0-based position ``index_label`` (header line counted)."""
    return int(index_label) + (2 if header else 1)


# ----------------------------------------------------------------------------- MovieLens
AGE_BINS = [0, 18, 25, 35, 45, 50, 56, 200]
AGE_LABELS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]


def read_recbole_table(path: Path) -> pd.DataFrame:
    """Read a recbole atomic file (tab-separated, header ``name:type``), stripping the ``:type`` suffix.

    Raises:
        DataError: the file cannot be parsed.
    """
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"Could not parse {path}: {err}") from None
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def movielens_frame(inter: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Join MovieLens interactions with user and item side data, sort by time, add features.

    Adds (all per row, using only events with a strictly earlier timestamp for history):
    ``label`` (rating >= 4), ``age_bucket``, ``zip_prefix`` (first 3 characters),
    ``user_count`` / ``item_count`` (log1p of earlier events), ``user_rate`` / ``item_rate``
    (smoothed earlier click rate), ``item_age`` (event year - release year, signed log).

    Raises:
        DataError: missing columns or non-numeric rating / timestamp.
    """
    for name, df, cols in (("ml-100k.inter", inter, ["user_id", "item_id", "rating", "timestamp"]),
                           ("ml-100k.user", users, ["user_id", "age", "gender", "occupation", "zip_code"]),
                           ("ml-100k.item", items, ["item_id", "release_year", "class"])):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise DataError(f"{name} lacks columns {missing}; it has {list(df.columns)}. Reinstall recbole==1.2.1.")
    df = inter.copy()
    df["rating"] = pd.to_numeric(df["rating"], errors="coerce")
    df["timestamp"] = pd.to_numeric(df["timestamp"], errors="coerce")
    bad = df["rating"].isna() | df["timestamp"].isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"ml-100k.inter line {_line_of(df.index[i])}: rating and timestamp must be numbers.")
    df = df.merge(users, on="user_id", how="left").merge(items[["item_id", "release_year", "class"]], on="item_id", how="left")
    df = df.sort_values("timestamp", kind="mergesort").reset_index(drop=True)
    df["label"] = (df["rating"] >= 4).astype(np.float32)
    age = pd.to_numeric(df["age"], errors="coerce")
    df["age_bucket"] = pd.cut(age, AGE_BINS, right=False, labels=AGE_LABELS).astype(object)
    df["zip_prefix"] = df["zip_code"].astype(str).str[:3]
    for key in ("user", "item"):
        count, rate = past_history(df[f"{key}_id"], df["timestamp"], df["label"])
        df[f"{key}_count"] = np.log1p(count)
        df[f"{key}_rate"] = rate
    year = pd.to_datetime(df["timestamp"], unit="s").dt.year
    release = pd.to_numeric(df["release_year"], errors="coerce")
    df["item_age"] = signed_log1p((year - release).fillna(0).to_numpy(dtype=float))
    return df


class MovieLensStream(StreamDataModule):
    """MovieLens-100K from recbole==1.2.1 as a time-ordered click stream (``data=movielens``).

    Categorical: user_id, item_id, gender, occupation, age bucket, zip prefix, release year;
    multi-valued: genres (an embedding bag). Numeric (past only): log user / item
    interaction counts so far, smoothed user / item click rates so far, item age.

    Raises:
        modules.core.packages.MissingDataPackageError: recbole is not installed (names the pip command).
    """

    def __init__(self, window: int | str = "7D", batch_size: int = 256, hash_buckets: int = 4096, limit_rows: int | None = None):
        super().__init__(window, batch_size, hash_buckets, limit_rows)

    SPARSE = ["user_id", "item_id", "gender", "occupation", "age_bucket", "zip_prefix", "release_year"]
    MULTI = ["class"]
    DENSE = ["user_count", "item_count", "user_rate", "item_rate", "item_age"]

    def load(self) -> EncodedStream:
        base = "dataset_example/ml-100k/ml-100k"
        inter = read_recbole_table(package_file("recbole", f"{base}.inter"))
        users = read_recbole_table(package_file("recbole", f"{base}.user"))
        items = read_recbole_table(package_file("recbole", f"{base}.item"))
        df = self._limit(movielens_frame(inter, users, items))
        return encode(
            df, timestamps=df["timestamp"].to_numpy(float), labels=df["label"].to_numpy(), dense_columns=self.DENSE,
            sparse_columns=self.SPARSE, multi_columns=self.MULTI, hash_buckets=self.hash_buckets, window=self.window,
            multi_separator=None, info={"source": "MovieLens-100K (recbole==1.2.1), click = rating >= 4"},
        )


# ----------------------------------------------------------------------------- generic CSV / Parquet logs
def check_binary_labels(values: pd.Series, path: str | Path, column: str, header: bool = True) -> np.ndarray:
    """0/1 labels as float32 ``(N,)``; accepts 0/1 numbers, booleans and "0"/"1"/"true"/"false".

    Raises:
        DataError: a missing or non-binary label, naming the file, line and value.
    """
    if values.dtype == bool:
        return values.to_numpy(dtype=np.float32)
    mapping = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "false": 0.0, "true": 1.0}
    text = values.astype(str).str.strip().str.lower()
    mapped = text.map(mapping)
    bad = mapped.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path} line {_line_of(values.index[i], header)}: label column {column!r} has value {str(values.iloc[i])!r}; labels must be "
            f"binary (0/1 or true/false). Map your label to 0/1 first."
        )
    return mapped.to_numpy(dtype=np.float32)


def numeric_column(values: pd.Series, path: str | Path, column: str, header: bool = True) -> np.ndarray:
    """A numeric feature column as float ``(N,)``; an empty field (missing) becomes 0.

    Raises:
        DataError: a non-numeric or infinite value, naming the file, line, column and value.
    """
    num = pd.to_numeric(values, errors="coerce")
    bad = (num.isna() & values.notna() & (values.astype(str).str.strip() != "")).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path} line {_line_of(values.index[i], header)}: numeric column {column!r} has non-numeric value {str(values.iloc[i])!r}.")
    infinite = np.isinf(num.to_numpy(dtype=float))
    if infinite.any():
        i = int(np.flatnonzero(infinite)[0])
        raise DataError(
            f"{path} line {_line_of(values.index[i], header)}: numeric column {column!r} has the infinite value {str(values.iloc[i])!r}; "
            "numeric features must be finite (leave the field empty for a missing value, which counts as 0)."
        )
    return num.fillna(0.0).to_numpy(dtype=float)


def timestamp_seconds(values: pd.Series, path: str | Path, column: str) -> np.ndarray:
    """A timestamp column as float seconds ``(N,)``: Unix seconds (numbers) or date-time strings.

    A column whose values are mostly numbers is read as Unix seconds (every value must
    then be a finite number); otherwise every value must parse as a date-time. Either way the error names the first bad line and its value.

    Raises:
        DataError: an empty, non-finite or unparsable timestamp (file, line, column, value).
    """
    if values.isna().any():
        i = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise DataError(f"{path} line {_line_of(values.index[i])}: timestamp column {column!r} is empty.")
    num = pd.to_numeric(values, errors="coerce")
    if num.notna().mean() >= 0.5:  # mostly numbers: Unix seconds, and a value that is not one is the bad line
        bad = (num.isna() | np.isinf(num.to_numpy(dtype=float, na_value=np.nan))).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path} line {_line_of(values.index[i])}: timestamp column {column!r} has {str(values.iloc[i])!r}, but the column "
                "holds Unix seconds; give a finite number for every row."
            )
        return num.to_numpy(dtype=float)
    parsed = pd.to_datetime(values.astype(str), errors="coerce", utc=True, format="ISO8601")
    if parsed.isna().any():
        parsed = pd.to_datetime(values.astype(str), errors="coerce", utc=True, format="mixed")
    if parsed.isna().any():
        i = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise DataError(
            f"{path} line {_line_of(values.index[i])}: cannot parse timestamp {str(values.iloc[i])!r} in column {column!r}; "
            "use Unix seconds or ISO dates (2024-05-01 12:00:00)."
        )
    return (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=float)


class CsvStream(StreamDataModule):
    """Any CSV / Parquet interaction log (``data=stream_csv``).

    Args:
        path: the file.
        timestamp_column: Unix seconds (numbers) or date-time strings.
        label_column: binary label.
        categorical_columns: single-valued categorical columns (hashed).
        numeric_columns: numeric columns (missing -> 0, then ``sign(x) log(1+|x|)``).
        multi_valued_columns: columns holding several tokens separated by ``multi_separator``.
        multi_separator: token separator of multi-valued columns.
        history_columns: columns (e.g. a user id) for which past-only interaction counts and
            smoothed click rates are added as numeric features.
        window, batch_size, hash_buckets, limit_rows: see :class:`StreamDataModule`.

    Raises:
        DataError: unknown columns (listing the file's columns), a missing or unparsable
            timestamp, a non-binary label, a non-numeric numeric value (file and line).
    """

    def __init__(
        self,
        path: str,
        timestamp_column: str,
        label_column: str,
        categorical_columns: list[str] = (),
        numeric_columns: list[str] = (),
        multi_valued_columns: list[str] = (),
        multi_separator: str = "|",
        history_columns: list[str] = (),
        window: int | str = "7D",
        batch_size: int = 256,
        hash_buckets: int = 4096,
        limit_rows: int | None = None,
    ):
        super().__init__(window, batch_size, hash_buckets, limit_rows)
        self.path = path
        self.timestamp_column, self.label_column = timestamp_column, label_column
        self.categorical_columns = list(categorical_columns or [])
        self.numeric_columns = list(numeric_columns or [])
        self.multi_valued_columns = list(multi_valued_columns or [])
        self.multi_separator = multi_separator
        self.history_columns = list(history_columns or [])

    def _dense_feature(self, name: str) -> dict[str, str]:
        if name.startswith("num:"):
            return {"column": name.removeprefix("num:"), "transform": "signed_log1p"}
        return {"column": name, "transform": "identity"}  # history features: computed by the caller

    def load(self) -> EncodedStream:
        path, kept = self.path, None
        settings = {"timestamp_column": [self.timestamp_column], "label_column": [self.label_column],
                    "categorical_columns": self.categorical_columns, "numeric_columns": self.numeric_columns,
                    "multi_valued_columns": self.multi_valued_columns, "history_columns": self.history_columns}
        columns = log_columns(path)
        for setting, cols in settings.items():
            unknown = [c for c in cols if c not in columns]
            if unknown:
                raise DataError(f"data.{setting}: column(s) {unknown} not in {path}; the file has columns {columns}."
                                + delimiter_hint(columns, "\t" if str(path).lower().endswith((".tsv", ".tab")) else ","))
        text = list(dict.fromkeys(self.categorical_columns + self.multi_valued_columns + self.history_columns))
        wanted = list(dict.fromkeys([self.timestamp_column, self.label_column, *self.numeric_columns, *text]))
        for df in log_chunks(path, wanted, text):  # bounded memory: each chunk encoded, the earliest limit_rows kept
            n = len(df)
            chunk = {
                "ts": timestamp_seconds(df[self.timestamp_column], path, self.timestamp_column),
                "row": df.index.to_numpy(np.int64),
                "y": check_binary_labels(df[self.label_column], path, self.label_column).astype(np.float32),
                "num": np.stack([signed_log1p(numeric_column(df[c], path, c)) for c in self.numeric_columns], 1)
                .astype(np.float32) if self.numeric_columns else np.zeros((n, 0), np.float32),
                "cat": np.stack([hash_bucket(df[c], self.hash_buckets) for c in self.categorical_columns], 1)
                if self.categorical_columns else np.zeros((n, 0), np.int64),
                "multi": _stack_multi([hash_multi(df[c], self.hash_buckets, self.multi_separator) for c in self.multi_valued_columns], n),
                "key": np.stack([hash_bucket(df[c], 2**62) for c in self.history_columns], 1)
                if self.history_columns else np.zeros((n, 0), np.int64),
            }
            kept = keep_earliest(kept, chunk, self.limit_rows)
        order = np.lexsort((kept["row"], kept["ts"]))
        k = {name: v[order] for name, v in kept.items()}
        ts, y = pd.Series(k["ts"]), pd.Series(k["y"])
        dense, dense_names = [k["num"]], [f"num:{c}" for c in self.numeric_columns]
        for j, c in enumerate(self.history_columns):
            count, rate = past_history(pd.Series(k["key"][:, j]), ts, y)
            dense.append(np.stack([np.log1p(count), rate], 1).astype(np.float32))
            dense_names += [f"{c}_count", f"{c}_rate"]
        return assemble(
            np.concatenate(dense, 1), k["cat"], k["multi"], k["y"], k["ts"], dense_names, self.categorical_columns,
            [f"multi:{c}" for c in self.multi_valued_columns], self.hash_buckets, self.window, info={"source": str(path)},
        )


def _stack_multi(parts: list[np.ndarray], n: int) -> np.ndarray:
    """Per-column ``(N, L_c)`` multi-valued ids -> ``(N, F_m, L)``, 0-padded to the widest."""
    if not parts:
        return np.zeros((n, 0, 1), np.int64)
    width = max(p.shape[1] for p in parts)
    return np.stack([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts], axis=1)


# ----------------------------------------------------------------------------- Criteo
CRITEO_INT = [f"I{i}" for i in range(1, 14)]
CRITEO_CAT = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label", *CRITEO_INT, *CRITEO_CAT]


class CriteoStream(StreamDataModule):
    """The Criteo display-advertising TSV format as a stream (``data=criteo data.path=FILE``).

    Rows are in time order and carry no timestamp: ``data.window`` must be a row count.
    Integer features: missing -> 0, then ``sign(x) log(1 + |x|)``; categoricals: hashed,
    an empty field is its own "missing" bucket.

    Args:
        path: the TSV file.
        window, batch_size, hash_buckets, limit_rows: see :class:`StreamDataModule`.
    """

    def __init__(
        self, path: str, window: int | str = 100000, batch_size: int = 1024, hash_buckets: int = 100000, limit_rows: int | None = None
    ):
        super().__init__(window, batch_size, hash_buckets, limit_rows)
        self.path = path

    def _dense_feature(self, name: str) -> dict[str, str]:
        return {"column": name, "transform": "signed_log1p"}

    def load(self) -> EncodedStream:
        n = count_lines(self.path, self.limit_rows) if Path(self.path).is_file() else 0
        dense, sparse, labels = np.empty((n, 13), np.float32), np.empty((n, 26), np.int64), np.empty(n, np.float32)
        end = 0
        for df in criteo_chunks(self.path, CRITEO_COLUMNS, self.limit_rows):  # bounded memory; stops at limit_rows
            a, end = end, end + len(df)
            labels[a:end] = check_binary_labels(df["label"], self.path, "label (first field)", header=False)
            for j, c in enumerate(CRITEO_INT):
                for i in np.flatnonzero(integer_values(df[c]))[:1]:
                    raise DataError(f"{self.path} line {df.index[i] + 1}: integer column {c!r} has {df[c].iloc[i]!r}; Criteo's "
                                    "I1..I13 fields hold integers (or nothing, for a missing value).")
                dense[a:end, j] = signed_log1p(numeric_column(df[c], self.path, c, header=False))
            for j, c in enumerate(CRITEO_CAT):
                sparse[a:end, j] = hash_bucket(df[c].where(df[c] != "", None), self.hash_buckets)
        n, dense, sparse, labels = end, dense[:end], sparse[:end], labels[:end]  # blank lines are not rows
        return assemble(
            dense, sparse, np.zeros((n, 0, 1), np.int64), labels, np.arange(n, dtype=float), CRITEO_INT, CRITEO_CAT, [], self.hash_buckets,
            self.window, has_clock=False,
            info={"source": str(self.path), "timestamp": "row number (Criteo rows are in time order)"},
        )
