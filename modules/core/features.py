"""Feature encodings shared by training and serving, in numpy and pandas only (no torch).

The stream data modules (``modules.data.stream_data``) encode training rows with these, and
the served recommender (``serving.recommender``) encodes request rows with the very
same functions, so a row is hashed and transformed identically in both.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

MISSING = "<missing>"


def hash_bucket(values: pd.Series | np.ndarray, buckets: int) -> np.ndarray:
    """Stable hash of values (as strings; missing -> ``"<missing>"``) into ``[1, buckets)``.

    Row 0 of every table is reserved for padding. The hash is ``pandas.util.hash_array``
    (SipHash with a fixed key), identical across runs and machines.

    Returns:
        ``(N,)`` int64 ids.
    """
    s = pd.Series(values, copy=False).astype(object)
    s = s.where(s.notna(), MISSING).astype(str)
    h = pd.util.hash_array(s.to_numpy(dtype=object))
    return (h % np.uint64(buckets - 1)).astype(np.int64) + 1


def hash_multi(values: pd.Series, buckets: int, separator: str | None) -> np.ndarray:
    """Multi-valued strings (tokens split on ``separator``, whitespace when None) -> ``(N, L)`` ids, 0-padded."""
    lists = [[] if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v).split(separator) for v in values]
    lists = [[t.strip() for t in row if t.strip()] for row in lists]
    width = max(1, max((len(r) for r in lists), default=1))
    out = np.zeros((len(lists), width), dtype=np.int64)
    flat = [t for r in lists for t in r]
    if flat:
        ids = hash_bucket(np.asarray(flat, dtype=object), buckets)
        pos = 0
        for i, r in enumerate(lists):
            out[i, : len(r)] = ids[pos : pos + len(r)]
            pos += len(r)
    return out


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """``sign(x) * log(1 + |x|)``: a stateless squashing of counts (needs no statistics of the future)."""
    return np.sign(x) * np.log1p(np.abs(x))


