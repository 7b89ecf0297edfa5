"""Checks the data readers share, so a malformed file is refused with one line naming the file, line and column.

* :func:`parser_message`: a pandas parser error as one line (pandas ends some with a newline).
* :func:`delimiter_hint`: when a file was read as a single column whose name holds another
  delimiter, the sentence that says so.
* :func:`check_field_counts`: the first line whose field count differs from the header's
  (pandas pads short lines with missing values silently).
* :func:`integer_values`: the first value of a column that is not an integer.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

#: delimiters a file read with the wrong one may hold in its single column's name
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


def parser_message(err: Exception) -> str:
    """``str(err)`` on one line (pandas' ``ParserError`` text ends with a newline)."""
    return " ".join(str(err).split())


def delimiter_hint(columns, sep: str) -> str:
    """A sentence for a missing-column error when the header was not split by ``sep``, else "".

    Args:
        columns: the columns the file was read with.
        sep: the delimiter it was read with (``","`` for .csv, ``"\\t"`` for .tsv).
    """
    if len(columns) != 1:
        return ""
    found = [name for d, name in DELIMITERS.items() if d != sep and d in str(columns[0])]
    if not found:
        return ""
    expected = DELIMITERS.get(sep, repr(sep))
    return (f" The header was read as one column: the file seems to be {found[0]}-separated, but its extension says "
            f"{expected}-separated (.csv: comma, .tsv: tab); convert it or rename it.")


def check_field_counts(path: str | Path, sep: str, error: type[Exception]) -> None:
    """Raise ``error`` naming the first line whose number of fields differs from the header's.

    Quoted fields (CSV quoting) may hold the delimiter and newlines. Empty lines are skipped.

    Raises:
        error: the file, the line number, the counts, and how to fix it.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=sep)
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if row and len(row) != len(header):
                raise error(
                    f"{path} line {reader.line_num}: {len(row)} fields, but the header has {len(header)} "
                    f"({header}); every line needs one field per column (leave a field empty, not out)."
                )


def utf8_error(path: str | Path) -> str:
    """Where ``path`` stops being UTF-8, e.g. ``"invalid continuation byte on line 2, byte 14"`` ("" if it is UTF-8)."""
    raw = Path(path).read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return f"{err.reason} on line {line}, byte {err.start}"
    return ""


def integer_values(values: pd.Series) -> np.ndarray:
    """(N,) bool: which non-empty values are not integers (``"1.5"``, ``"inf"``, ``"abc"``); empty fields pass."""
    text = values.astype(str).str.strip()
    num = pd.to_numeric(text.where(text != "", "0"), errors="coerce")
    finite = np.isfinite(num.to_numpy(dtype=float, na_value=np.nan))
    return ~(finite & (num.fillna(0.5) % 1 == 0).to_numpy())
