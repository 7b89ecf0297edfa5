"""Streams: windows in time order, prequential order, no-future features, formats and their errors."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from modules.lit.dlrm import DLRMModule
from modules.core.packages import package_file
from modules.data.stream_data import (
    CriteoStream,
    CsvStream,
    MovieLensStream,
    assign_windows,
    hash_bucket,
    movielens_frame,
    past_history,
    read_recbole_table,
)
from modules.core.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")  # set per test and restored (tests/conftest.py)


@pytest.fixture(scope="module")
def movielens_tables():
    base = "dataset_example/ml-100k/ml-100k"
    return tuple(read_recbole_table(package_file("recbole", f"{base}.{ext}")) for ext in ("inter", "user", "item"))


def write_log(path, n=60, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "ts": np.sort(rng.integers(0, 10 * 86400, n))[::-1],  # reverse time order on disk
            "user": rng.integers(0, 7, n),
            "item": rng.choice(["a", "b", "c", "d"], n),
            "price": rng.uniform(0, 100, n).round(2),
            "tags": rng.choice(["x|y", "y", "", "z|x|y"], n),
            "click": rng.integers(0, 2, n),
        }
    )
    for k, v in overrides.items():
        df[k] = v
    df.to_csv(path, index=False)
    return df


def csv_stream(path, **kw):
    args = dict(path=str(path), timestamp_column="ts", label_column="click", categorical_columns=["user", "item"],
                numeric_columns=["price"], multi_valued_columns=["tags"], history_columns=["user"], window="2D", batch_size=8)
    args.update(kw)
    return CsvStream(**args)


# ----------------------------------------------------------------------------- windows and time order
def test_movielens_stream_is_time_ordered_with_consecutive_windows():
    dm = MovieLensStream(window="7D", limit_rows=20000)
    dm.setup()
    s = dm.stream
    assert len(s) == 20000
    assert (s.timestamp[1:] >= s.timestamp[:-1]).all()
    assert (s.window[1:] - s.window[:-1]).ge(0).all() and (s.window[1:] - s.window[:-1]).le(1).all()
    for a, b in s.window_bounds():
        assert float(s.timestamp[b - 1] - s.timestamp[a]) < 7 * 86400  # a window spans less than 7 days
    assert s.sparse.shape == (20000, 7) and s.multi.shape[:2] == (20000, 1) and s.dense.shape == (20000, 5)
    assert set(s.label.unique().tolist()) == {0.0, 1.0}
    loader = dm.train_dataloader()
    starts = [float(batch["start"]) for batch in loader]
    assert starts == sorted(starts) and len(starts) == s.num_windows


def test_row_count_and_time_span_windows():
    ts = np.array([0.0, 10, 20, 100, 101, 500])
    assert assign_windows(ts, 4).tolist() == [0, 0, 0, 0, 1, 1]
    assert assign_windows(ts, "50s").tolist() == [0, 0, 0, 1, 1, 2]  # empty spans are skipped
    with pytest.raises(DataError, match="row count"):
        assign_windows(ts, "7D", has_clock=False)
    with pytest.raises(DataError, match="time span"):
        assign_windows(ts, "soon")


def test_hashing_is_stable_and_in_range():
    ids = hash_bucket(pd.Series(["u1", "u2", None, "never-seen-before"]), 16)
    assert ((ids >= 1) & (ids < 16)).all()
    assert (hash_bucket(pd.Series(["u1", "u2", None, "never-seen-before"]), 16) == ids).all()


# ----------------------------------------------------------------------------- no future
def test_past_history_counts_only_strictly_earlier_events():
    keys = pd.Series(["a", "a", "b", "a", "a"])
    ts = pd.Series([1, 2, 2, 2, 5])
    y = pd.Series([1, 0, 1, 1, 0])
    count, rate = past_history(keys, ts, y, prior=0.5, strength=2.0)
    assert count.tolist() == [0, 1, 0, 1, 3]  # the tie at t=2 is not "before"
    assert rate.tolist() == pytest.approx([0.5, (1 + 1) / 3, 0.5, (1 + 1) / 3, (2 + 1) / 5])


def test_movielens_features_never_look_at_the_future(movielens_tables):
    inter, users, items = movielens_tables
    ts = pd.to_numeric(inter["timestamp"])
    ordered = inter.iloc[np.argsort(ts.to_numpy(), kind="mergesort")].reset_index(drop=True)
    full = movielens_frame(ordered.iloc[:6000], users, items)
    k = 4000
    cols = ["user_count", "item_count", "user_rate", "item_rate", "item_age", "label"]
    past_only = movielens_frame(ordered.iloc[:k], users, items)
    pd.testing.assert_frame_equal(full[cols].iloc[:k].reset_index(drop=True), past_only[cols])
    # rewriting every future rating changes nothing before it
    changed = ordered.iloc[:6000].copy()
    changed.loc[k:, "rating"] = "1"
    again = movielens_frame(changed, users, items)
    pd.testing.assert_frame_equal(again[cols].iloc[:k], full[cols].iloc[:k])
    assert not again["user_rate"].iloc[k:].equals(full["user_rate"].iloc[k:])


def test_csv_stream_sorts_by_time_and_history_is_past_only(tmp_path):
    path = tmp_path / "log.csv"
    write_log(path)
    dm = csv_stream(path)
    dm.setup()
    s = dm.stream
    assert (s.timestamp[1:] >= s.timestamp[:-1]).all()
    assert s.dense.shape[1] == 3  # price + user count + user rate
    first = s.dense[0]
    assert first[1] == 0.0 and first[2] == pytest.approx(0.5)  # no history before the first event
    assert s.multi.shape[:2] == (60, 1)


# ----------------------------------------------------------------------------- prequential order
class Snapshots(L.Callback):
    """Copies the model's weights at the start of each window (before any training on it)."""

    def __init__(self):
        self.states = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states[int(batch["window"])] = copy.deepcopy(pl_module.model.state_dict())


def test_prequential_scores_each_window_before_training_on_it(tmp_path):
    path = tmp_path / "log.csv"
    write_log(path, n=90)
    dm = csv_stream(path)
    dm.setup()
    torch.manual_seed(0)
    module = DLRMModule(**dm.model_sizes(), embedding_dim=4, bottom_mlp=[8], top_mlp=[8], lr=0.05, keep_predictions=True)
    snaps = Snapshots()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[snaps], num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert [r["window"] for r in module.window_records] == list(range(dm.stream.num_windows))
    probe = copy.deepcopy(module)
    loader = list(dm.train_dataloader())
    for batch in loader:
        w = int(batch["window"])
        probe.model.load_state_dict(snaps.states[w])
        assert torch.allclose(probe.score(batch), module.predictions[w])  # scored by the model as it stood
    last = loader[-1]
    assert not torch.allclose(module.score(last), module.predictions[int(last["window"])])  # then trained on


# ----------------------------------------------------------------------------- formats and errors
def test_csv_errors_name_file_line_and_fix(tmp_path):
    path = tmp_path / "log.csv"
    write_log(path)
    with pytest.raises(DataError, match=r"categorical_columns.*'nope'.*has columns"):
        csv_stream(path, categorical_columns=["nope"]).setup()
    bad = tmp_path / "bad_label.csv"
    labels = np.zeros(60, dtype=int)
    labels[6] = 2
    write_log(bad, click=labels)
    with pytest.raises(DataError, match=r"bad_label.csv line 8: label column 'click' has value '2'"):
        csv_stream(bad).setup()
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("ts,user,item,price,tags,click\n1,1,a,2.0,x,0\n2,1,a,2.0,x,1,EXTRA\n")
    with pytest.raises(DataError, match=r"ragged.csv.*line 3"):
        csv_stream(ragged).setup()
    text = tmp_path / "text_price.csv"
    prices = np.zeros(60).astype(object)
    prices[3] = "cheap"
    write_log(text, price=prices)
    with pytest.raises(DataError, match=r"line 5: numeric column 'price'"):
        csv_stream(text).setup()


def test_parquet_log(tmp_path):
    df = write_log(tmp_path / "log.csv")
    df.to_parquet(tmp_path / "log.parquet")
    a, b = csv_stream(tmp_path / "log.csv"), csv_stream(tmp_path / "log.parquet")
    a.setup(), b.setup()
    assert torch.equal(a.stream.sparse, b.stream.sparse) and torch.allclose(a.stream.dense, b.stream.dense)


def criteo_line(label, ints, cats):
    return "\t".join([str(label), *[str(i) for i in ints], *cats])


def test_criteo_format_with_empty_fields(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(50):
        ints = ["" if rng.random() < 0.2 else int(rng.integers(-2, 500)) for _ in range(13)]
        cats = ["" if rng.random() < 0.2 else f"{rng.integers(0, 2**32):08x}" for _ in range(26)]
        lines.append(criteo_line(int(rng.integers(0, 2)), ints, cats))
    path = tmp_path / "day_0"
    path.write_text("\n".join(lines) + "\n")
    dm = CriteoStream(path=str(path), window=20, batch_size=8, hash_buckets=64)
    dm.setup()
    s = dm.stream
    assert s.dense.shape == (50, 13) and s.sparse.shape == (50, 26) and s.multi.shape[1] == 0
    assert s.window.tolist() == [0] * 20 + [1] * 20 + [2] * 10
    assert ((s.sparse >= 1) & (s.sparse < 64)).all()
    module = DLRMModule(**dm.model_sizes(), embedding_dim=4, bottom_mlp=[8], top_mlp=[8])
    batch = next(iter(dm.train_dataloader()))
    assert module.score(batch).shape == (20,)
    with pytest.raises(DataError, match="row count"):
        CriteoStream(path=str(path), window="1D").setup()


def test_criteo_errors_name_file_and_line(tmp_path):
    good = criteo_line(1, range(13), ["aa"] * 26)
    short = tmp_path / "short.tsv"
    short.write_text(good + "\n" + "\t".join(good.split("\t")[:30]) + "\n")
    with pytest.raises(DataError, match=r"short.tsv line 2: fewer than 40"):
        CriteoStream(path=str(short), window=10).setup()
    long = tmp_path / "long.tsv"
    long.write_text(good + "\n" + good + "\textra\n")
    with pytest.raises(DataError, match=r"long.tsv.*line 2"):
        CriteoStream(path=str(long), window=10).setup()
    label = tmp_path / "label.tsv"
    label.write_text(good + "\n" + criteo_line(3, range(13), ["aa"] * 26) + "\n")
    with pytest.raises(DataError, match=r"label.tsv line 2: label column .* value '3'"):
        CriteoStream(path=str(label), window=10).setup()
    ints = tmp_path / "ints.tsv"
    ints.write_text(good + "\n" + criteo_line(0, ["x", *range(12)], ["aa"] * 26) + "\n")
    with pytest.raises(DataError, match=r"ints.tsv line 2: integer column 'I1'"):
        CriteoStream(path=str(ints), window=10).setup()
    with pytest.raises(DataError, match="not found"):
        CriteoStream(path=str(tmp_path / "missing"), window=10).setup()


def test_bad_settings():
    with pytest.raises(DataError, match="batch_size"):
        MovieLensStream(batch_size=0)
    with pytest.raises(DataError, match="hash_buckets"):
        MovieLensStream(hash_buckets=1)


def test_movielens_non_numeric_rating_names_its_file_line(movielens_tables):
    """A malformed rating is a DataError naming the file line (it was a NameError before ruff's F821 found it)."""
    inter, users, items = movielens_tables
    broken = inter.iloc[:50].reset_index(drop=True).copy()
    broken.loc[7, "rating"] = "four"
    with pytest.raises(DataError, match=r"ml-100k.inter line 9: rating and timestamp must be numbers"):
        movielens_frame(broken, users, items)
