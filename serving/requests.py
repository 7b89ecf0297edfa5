"""Read prediction requests from a file or stdin, and write one CSV row per request.

Text models take CSV, TSV or JSONL with a text column, or any other file as one text per
line; recommenders take CSV or Parquet rows. ``-`` reads stdin (lines for text, CSV for
a recommender).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pandas as pd

from modules.core.errors import MissingFileError
from serving.runtime import ServedModelError

FORMATS = ("auto", "csv", "tsv", "jsonl", "parquet", "lines")
_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def input_format(path: str, fmt: str, kind: str) -> str:
    """The format to read ``path`` as (``auto``: by extension; stdin: lines for text, CSV otherwise).

    Raises:
        ServedModelError: an unknown format, or lines/JSONL for a recommender.
    """
    if fmt not in FORMATS:
        raise ServedModelError(f"input_format={fmt!r} is not one of {list(FORMATS)}.")
    if fmt == "auto":
        if path == "-":
            fmt = "lines" if kind == "text" else "csv"
        else:
            fmt = _BY_SUFFIX.get(Path(path).suffix.lower(), "lines" if kind == "text" else "csv")
    if kind == "recommender" and fmt in ("lines", "jsonl"):
        raise ServedModelError(f"A recommender reads CSV or Parquet rows, not {fmt}; set input_format=csv or parquet.")
    return fmt


def read_requests(path: str, fmt: str) -> pd.DataFrame:
    """Read the requests (``lines`` become one ``text`` column, empty lines skipped).

    Raises:
        modules.core.errors.MissingFileError: no such file.
        ServedModelError: a file the format cannot parse (names the file and the parser's reason).
    """
    if path != "-" and not Path(path).is_file():
        raise MissingFileError(f"input={path}: no such file.")
    source = io.StringIO(sys.stdin.read()) if path == "-" else path
    try:
        if fmt == "lines":
            text = source.getvalue() if path == "-" else Path(path).read_text(encoding="utf-8")
            return pd.DataFrame({"text": [line for line in text.splitlines() if line.strip()]})
        if fmt == "csv":
            return pd.read_csv(source, keep_default_na=True)
        if fmt == "tsv":
            return pd.read_csv(source, sep="\t", quoting=3)
        if fmt == "jsonl":
            return pd.read_json(source, lines=True)
        return pd.read_parquet(source)
    except UnicodeDecodeError as err:
        raise ServedModelError(f"input={path} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8.") from None
    except (ValueError, pd.errors.ParserError) as err:
        raise ServedModelError(f"input={path} could not be read as {fmt}: {err}") from None


def text_columns(frame: pd.DataFrame, text_column: str, pair_column: str | None, path: str) -> tuple[list[str], list[str] | None]:
    """The texts (and second texts) of each request.

    Raises:
        ServedModelError: a missing column (lists the columns found) or an empty text (its row).
    """
    for col in [text_column, *([pair_column] if pair_column else [])]:
        if col not in frame.columns:
            raise ServedModelError(
                f"input={path} has no column {col!r}; its columns are {list(frame.columns)}. Set text_column=NAME."
            )
    texts = frame[text_column]
    empty = texts.isna() | (texts.astype(str).str.strip() == "")
    if empty.any():
        raise ServedModelError(f"input={path}: row {int(empty.to_numpy().nonzero()[0][0])} has no text in column {text_column!r}.")
    pairs = frame[pair_column].astype(str).tolist() if pair_column else None
    return texts.astype(str).tolist(), pairs
