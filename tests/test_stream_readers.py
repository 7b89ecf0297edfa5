"""Chunked stream readers (issue 21): any chunk size gives the same stream; limit_rows is applied while reading."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import modules.data.stream_readers as readers
from modules.data.stream_data import CriteoStream
from test_stream_data import criteo_line, csv_stream, write_log


def tensors(stream) -> dict:
    return {k: getattr(stream, k) for k in ("dense", "sparse", "multi", "label", "timestamp", "window")}


def assert_same(a, b) -> None:
    for k, v in tensors(a).items():
        w = getattr(b, k)
        assert v.shape == w.shape and bool((v == w).all()), k


def load(dm, chunk_rows: int, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_ROWS", chunk_rows)
    dm.setup()
    return dm.stream


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_csv_log_in_small_chunks_equals_one_chunk_and_limit_keeps_the_earliest_rows(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"log.{suffix}"
    write_log(tmp_path / "log.csv", n=60)  # stored in reverse time order
    if suffix == "parquet":
        pd.read_csv(tmp_path / "log.csv").to_parquet(path)
    whole = load(csv_stream(path), 10**6, monkeypatch)
    assert_same(load(csv_stream(path), 7, monkeypatch), whole)
    limited = load(csv_stream(path, limit_rows=20), 7, monkeypatch)
    assert len(limited) == 20 and bool((limited.timestamp == whole.timestamp[:20]).all())
    assert bool((limited.dense == whole.dense[:20]).all())  # past-only history features agree too
    assert bool((limited.sparse == whole.sparse[:20]).all())


def test_criteo_in_small_chunks_equals_one_chunk_and_stops_at_limit_rows(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    lines = [criteo_line(int(rng.integers(0, 2)), ["" if rng.random() < 0.2 else int(rng.integers(0, 99)) for _ in range(13)],
                         ["" if rng.random() < 0.2 else f"{rng.integers(0, 999):x}" for _ in range(26)]) for _ in range(50)]
    path = tmp_path / "day_0"
    path.write_text("\n".join(lines) + "\n")
    whole = load(CriteoStream(path=str(path), window=10, hash_buckets=64), 10**6, monkeypatch)
    assert_same(load(CriteoStream(path=str(path), window=10, hash_buckets=64), 7, monkeypatch), whole)
    path.write_text("\n".join(lines) + "\n" + "not\ta\tcriteo\tline\n")  # never read: past limit_rows
    limited = load(CriteoStream(path=str(path), window=10, hash_buckets=64, limit_rows=23), 7, monkeypatch)
    assert len(limited) == 23 and bool((limited.sparse == whole.sparse[:23]).all())


def test_keep_earliest_keeps_the_first_rows_by_time_then_position():
    a = {"ts": np.array([5.0, 1.0, 3.0]), "row": np.array([0, 1, 2]), "x": np.array([[50], [10], [30]])}
    b = {"ts": np.array([1.0, 0.0]), "row": np.array([3, 4]), "x": np.array([[11], [0]])}
    kept = readers.keep_earliest(readers.keep_earliest(None, a, 3), b, 3)
    order = np.lexsort((kept["row"], kept["ts"]))
    assert kept["row"][order].tolist() == [4, 1, 3] and kept["x"][order, 0].tolist() == [0, 10, 11]
