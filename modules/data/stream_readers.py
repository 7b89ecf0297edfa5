"""Chunked readers for the stream sources: bounded memory, ``limit_rows`` applied while reading.

A file is read ``chunk_rows`` rows at a time (100,000 by default); each chunk is turned at
once into the compact arrays of an encoded stream (float32 features, int64 bucket ids,
float64 timestamps), and its strings are dropped before the next chunk is read. Memory is
the encoded rows kept plus one chunk of strings, instead of the whole file as strings.

* Criteo (:func:`criteo_chunks`): rows are in time order, so reading stops after
  ``limit_rows`` rows; every line's tab count is checked as it is read. The encoded
  arrays are allocated once (:func:`count_lines`) and filled chunk by chunk.
* CSV / TSV / Parquet logs (:func:`log_chunks`): only the configured columns are read
  (pandas ``chunksize`` / pyarrow ``iter_batches``; a CSV chunk is parsed whole, so a ragged
  row is still an error), categorical columns as text, so a
  value hashes the same in every chunk. A log need not be in time order; with
  ``limit_rows`` a chunk's rows are merged into the ``limit_rows`` earliest seen so far
  (:func:`keep_earliest`), so what is kept is exactly the first ``limit_rows`` rows of the
  time-sorted log, in bounded memory.

Each chunk keeps its rows' 0-based positions in the file as its index, so an error names
the right line.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from modules.data.data_checks import check_field_counts, parser_message, utf8_error
from modules.core.errors import DataError

#: rows per chunk (when a reader is given none)
CHUNK_ROWS = 100_000


def criteo_chunks(path: str | Path, columns: list[str], limit_rows: int | None = None,
                  chunk_rows: int | None = None) -> Iterator[pd.DataFrame]:
    """The Criteo TSV file as frames of at most ``chunk_rows`` rows (strings; empty field -> ""), the first
    ``limit_rows`` rows in all; index: row position in the file.

    Raises:
        DataError: a missing or empty file; a line with fewer tabs than ``columns`` need, or a
            malformed one (file and line).
    """
    path, chunk_rows = Path(path), chunk_rows or CHUNK_ROWS
    if not path.is_file():
        raise DataError(f"Criteo file not found: {path}. Set data.path to a Criteo TSV file (e.g. train.txt or day_0).")
    start = 0
    with open(path, "rb") as f:
        while limit_rows is None or start < limit_rows:
            n = chunk_rows if limit_rows is None else min(chunk_rows, limit_rows - start)
            lines = [line for line in itertools.islice(f, n) if line.strip(b"\r\n")]
            if not lines:
                break
            for i, line in enumerate(lines):  # pandas pads short rows silently: count the tabs
                fields = line.count(b"\t") + 1
                if fields > len(columns):  # named here with the line in the file (pandas counts within the chunk)
                    raise DataError(f"Malformed row in {path}: Expected {len(columns)} fields in line {start + i + 1}, saw "
                                    f"{fields}. Criteo rows have exactly {len(columns)} tab-separated fields.")
                if fields < len(columns):
                    raise DataError(f"{path} line {start + i + 1}: fewer than {len(columns)} tab-separated fields "
                                    "(label, 13 integer, 26 categorical; empty fields are allowed but the tabs must be there).")
            try:
                df = pd.read_csv(io.BytesIO(b"".join(lines)), sep="\t", header=None, names=columns, dtype=str,
                                 keep_default_na=False, na_values=[], quoting=3, on_bad_lines="error")
            except pd.errors.ParserError as err:
                raise DataError(f"Malformed row in {path} (in the rows from line {start + 1}): {parser_message(err)}. "
                                f"Criteo rows have exactly {len(columns)} tab-separated fields.") from None
            df.index = pd.RangeIndex(start, start + len(df))
            yield df
            start += len(df)
    if start == 0:
        raise DataError(f"Criteo file {path} is empty.")


def count_lines(path: str | Path, limit: int | None = None) -> int:
    """Lines of a file (a last line without a newline counts), at most ``limit``; read in 16 MiB blocks,
    so the arrays of a stream can be allocated once, at their final size."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n, last = n + block.count(b"\n"), block[-1:]
            if limit is not None and n >= limit:
                return limit
    return n + (last != b"\n")


def log_columns(path: str | Path) -> list[str]:
    """The column names of a CSV / TSV / Parquet log (its header), read without reading its rows.

    Raises:
        DataError: missing file, unknown extension, an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file not found: {path}. Set data.path to an existing CSV or Parquet file.")
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv", ".tsv", ".tab"):
        raise DataError(f"Unknown log file type {suffix!r} for {path}; use .csv, .tsv or .parquet.")
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        sep = "," if suffix == ".csv" else "\t"
        check_field_counts(path, sep, DataError)
        return list(pd.read_csv(path, sep=sep, nrows=0).columns)
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"Data file {path} is empty; it needs a header row and rows.") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({utf8_error(path) or err.reason}); convert it to UTF-8 first.") from None
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"Could not read {path}: {parser_message(err).rstrip('.')}. Give a Parquet file, or a .csv/.tsv with one "
                        "header row and as many fields on every line.") from None


def log_chunks(path: str | Path, columns: list[str], text_columns: list[str],
               chunk_rows: int | None = None) -> Iterator[pd.DataFrame]:
    """The ``columns`` of a CSV / TSV / Parquet log in frames of at most ``chunk_rows`` rows
    (``text_columns`` as strings, missing -> NaN); index: row position in the file.

    Raises:
        DataError: malformed rows (with pandas' line), a log with a header but no rows.
    """
    path, chunk_rows = Path(path), chunk_rows or CHUNK_ROWS
    suffix = path.suffix.lower()
    start = 0
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=columns):
            df = batch.to_pandas()
            for c in text_columns:
                df[c] = df[c].astype(object).where(df[c].notna(), None).map(lambda v: v if v is None else str(v))
            df.index = pd.RangeIndex(start, start + len(df))
            start += len(df)
            yield df
    else:
        try:
            # every column is parsed (pandas checks each row's field count only then); ``columns`` are kept
            reader = pd.read_csv(path, sep="," if suffix == ".csv" else "\t", on_bad_lines="error",
                                 dtype={c: str for c in text_columns}, chunksize=chunk_rows)
            with reader:
                for df in reader:
                    start += len(df)
                    yield df[columns]
        except pd.errors.ParserError as err:
            raise DataError(f"Malformed row in {path}: {parser_message(err)}. Every row needs as many fields as the header.") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text ({utf8_error(path) or err.reason}); convert it to UTF-8 first.") from None
    if start == 0:
        raise DataError(f"Data file {path} has a header but no rows.")


def keep_earliest(kept: dict[str, np.ndarray] | None, chunk: dict[str, np.ndarray], limit: int | None) -> dict[str, np.ndarray]:
    """Merge a chunk's arrays into ``kept`` and keep the ``limit`` earliest rows by (``ts``, ``row``).

    Args:
        kept, chunk: name -> array, every array with the same first dimension; both hold ``ts``
            (timestamps) and ``row`` (row position in the file).
        limit: rows to keep (None: all).

    Returns:
        The merged arrays, at most ``limit`` rows (in no particular order).
    """
    merged = chunk if kept is None else {k: _concat([kept[k], chunk[k]]) for k in chunk}
    n = len(merged["ts"])
    if limit is None or n <= limit:
        return merged
    order = np.lexsort((merged["row"], merged["ts"]))[:limit]
    return {k: v[order] for k, v in merged.items()}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate along rows; 2-D+ id arrays of different widths (multi-valued) are 0-padded to the widest."""
    if parts[0].ndim >= 2 and parts[0].dtype == np.int64:
        width = max(p.shape[-1] for p in parts)
        parts = [np.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, width - p.shape[-1])]) for p in parts]
    return np.concatenate(parts)
