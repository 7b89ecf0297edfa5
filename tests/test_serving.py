"""Serving without the training stack: served folders, predict.py, the README snippet.

The served folders here are written by the pipeline's own ``write_served_folder`` from
tiny models and the real tokenizer; ``predict.py`` and the README snippet run in
subprocesses where torch, Lightning and transformers cannot be imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from modules.lit.bert_classifier import BertClassifier
from modules.lit.dlrm import DLRMModule
from modules.data.stream_data import CsvStream
from pipelines.export import write_served_folder
from serving.recommender import ClickModel
from serving.runtime import load_served, sigmoid, softmax
from serving.text import TextClassifier

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("torch", "lightning", "transformers", "torchmetrics")


@pytest.fixture(scope="module")
def no_torch_path(tmp_path_factory) -> Path:
    """A folder of stand-in packages that refuse to import: first on PYTHONPATH, they hide the real ones."""
    hide = tmp_path_factory.mktemp("hide")
    for name in HIDDEN:
        (hide / name).mkdir()
        (hide / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden: serving must not need it')\n")
    return hide


def run_without_torch(args: list[str], hide: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def served_text(tiny_setup, tmp_path_factory):
    """A served folder of the tiny teacher with its real tokenizer, and (module, datamodule)."""
    dm, ckpt, _ = tiny_setup
    module = BertClassifier.load_from_checkpoint(ckpt, map_location="cpu").served_model()
    exportable = module.exportable()
    out = tmp_path_factory.mktemp("run")
    batch = dm.collate([dm.datasets["test"][i] for i in range(4)])
    folder = write_served_folder(out, "pruned", exportable, exportable.feeds(batch), exportable.dynamic_axes(),
                                 {"kind": "text", **exportable.io_meta(), "pruning": exportable.summary()},
                                 dm.write_serving_files)
    return folder, module, dm


def test_served_text_folder_holds_what_serving_needs(served_text):
    folder, _, dm = served_text
    meta = json.loads((folder / "litprune.json").read_text())
    assert {"model.onnx", "litprune.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert meta["kind"] == "text" and meta["max_length"] == dm.max_length and meta["labels"] == ["0", "1"]
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["outputs"][0]["shape"] == ["batch", 2] and meta["opset"] >= 17
    assert meta["pruning"]["heads_per_layer"] == [4, 4, 4] and meta["project"]["name"] == "litprune"
    assert not list(folder.parent.glob(".*partial"))  # written beside, then renamed


def test_serving_tokenizes_exactly_as_training_did(served_text):
    folder, _, dm = served_text
    texts = ["good film, great acting", "the plot was boring " * 40, "fun"]  # the second is truncated
    ours = TextClassifier(load_served(folder)).encode(texts)
    theirs = dm.collate([{k: v for k, v in dm.tokenizer(t, truncation=True, max_length=dm.max_length).items()} for t in texts])
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key].numpy())
    assert ours["input_ids"].shape[1] == dm.max_length


def test_served_text_probabilities_equal_pytorch(served_text):
    folder, module, dm = served_text
    texts = ["good film", "awful boring plot", "the acting was fun and great"]
    probs = TextClassifier(load_served(folder)).predict_proba(texts)
    batch = dm.collate([dict(dm.tokenizer(t, truncation=True, max_length=dm.max_length)) for t in texts])
    with torch.no_grad():
        ref = softmax(module(batch).logits.numpy())
    np.testing.assert_allclose(probs, ref, atol=1e-5)


def test_predict_runs_without_torch_and_matches(served_text, no_torch_path, tmp_path):
    folder, module, dm = served_text
    texts = ["good film", "awful boring plot", "fun", "the the the bad"]
    inp = tmp_path / "in.csv"
    pd.DataFrame({"id": range(4), "review": texts}).to_csv(inp, index=False)
    out = tmp_path / "out.csv"
    proc = run_without_torch(["predict.py", f"served={folder}", f"input={inp}", f"output={out}", "text_column=review",
                              "batch_size=3"], no_torch_path)
    assert proc.returncode == 0, proc.stderr
    got = pd.read_csv(out)
    assert list(got.columns) == ["prediction", "prob_0", "prob_1"] and len(got) == 4
    expected = TextClassifier(load_served(folder)).predict_proba(texts)
    np.testing.assert_allclose(got[["prob_0", "prob_1"]].to_numpy(), expected, atol=1e-6)
    assert got["prediction"].astype(str).tolist() == [str(i) for i in expected.argmax(axis=1)]

    # stdin, one text per line, CSV to stdout
    proc = run_without_torch(["predict.py", f"served={folder}", "input=-", "progress=false"], no_torch_path, stdin="\n".join(texts) + "\n")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(pd.read_csv(__import__("io").StringIO(proc.stdout))[["prob_0", "prob_1"]].to_numpy(), expected, atol=1e-6)


def test_the_readme_snippet_serves_an_exported_model(served_text, no_torch_path):
    folder, _, _ = served_text
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- serve-snippet -->\s*```python\n(.*?)```", readme, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 10
    code = re.sub(r'folder = ".*?"', f'folder = "{folder}"', snippet, count=1)
    proc = run_without_torch(["-c", code], no_torch_path)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"\[('[01]'(, )?)+\]\s*", proc.stdout), proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["served=/nonexistent/served/pruned", "input=x.txt"], "is not a folder"),
        (["input={inp}", "text_column=nope"], "has no column 'nope'"),
        (["input=/nonexistent.csv"], "no such file"),
        (["input={inp}", "input_format=xml"], "input_format='xml'"),
    ],
)
def test_predict_bad_input_is_one_line_and_status_2(served_text, no_torch_path, tmp_path, args, message):
    folder, _, _ = served_text
    inp = tmp_path / "in.csv"
    pd.DataFrame({"text": ["good"]}).to_csv(inp, index=False)
    args = [a.format(inp=inp) for a in args]
    if not any(a.startswith("served=") for a in args):
        args.insert(0, f"served={folder}")
    proc = run_without_torch(["predict.py", *args], no_torch_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


# ----------------------------------------------------------------------------- recommender
@pytest.fixture(scope="module")
def served_recommender(tmp_path_factory):
    """A served folder of an (untrained) DLRM over a small CSV stream, and the stream's rows and module."""
    tmp = tmp_path_factory.mktemp("rec")
    g = np.random.default_rng(0)
    n = 60
    rows = pd.DataFrame({
        "ts": np.sort(g.integers(0, 10_000, n)), "clicked": g.integers(0, 2, n),
        "user": g.choice(["u1", "u2", "u3", None], n), "item": g.choice(["a", "b", "c"], n),
        "price": g.normal(10, 5, n).round(2), "tags": g.choice(["x|y", "y", "", "x|z|y"], n),
    })
    path = tmp / "log.csv"
    rows.to_csv(path, index=False)
    dm = CsvStream(path=str(path), timestamp_column="ts", label_column="clicked", categorical_columns=["user", "item"],
                   numeric_columns=["price"], multi_valued_columns=["tags"], window=20, hash_buckets=50)
    dm.setup()
    torch.manual_seed(0)
    module = DLRMModule(**dm.model_sizes(), embedding_dim=4, bottom_mlp=[8], top_mlp=[8])
    exportable = module.exportable()
    s = dm.stream
    folder = write_served_folder(tmp, "dense", exportable, exportable.feeds(s.dense[:4], s.sparse[:4], s.multi[:4]),
                                 exportable.dynamic_axes(), {"kind": "recommender", **exportable.io_meta(),
                                 "pruning": exportable.summary()}, dm.write_serving_files)
    ordered = pd.read_csv(path, keep_default_na=True).sort_values("ts", kind="mergesort").reset_index(drop=True)
    return folder, module, dm, ordered


def test_recommender_rows_encode_as_in_training_and_score_as_pytorch(served_recommender):
    folder, module, dm, rows = served_recommender
    model = ClickModel(load_served(folder))
    feeds = model.encode(rows)
    s = dm.stream
    np.testing.assert_allclose(feeds["dense"], s.dense.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(feeds["sparse"], s.sparse.numpy())
    np.testing.assert_array_equal(feeds["multi"], s.multi.numpy())
    with torch.no_grad():
        ref = sigmoid(module.served_model()(s.dense, s.sparse, s.multi).numpy())
    np.testing.assert_allclose(model.predict_proba(rows), ref, atol=1e-5)


def test_recommender_row_missing_a_feature_is_named(served_recommender, no_torch_path, tmp_path):
    folder, _, _, rows = served_recommender
    inp = tmp_path / "rows.csv"
    rows.drop(columns=["price"]).to_csv(inp, index=False)
    proc = run_without_torch(["predict.py", f"served={folder}", f"input={inp}"], no_torch_path)
    assert proc.returncode == 2 and "lack feature column(s) ['price']" in proc.stderr, proc.stderr
    ok = tmp_path / "ok.csv"
    rows.to_csv(ok, index=False)
    out = tmp_path / "out.csv"
    proc = run_without_torch(["predict.py", f"served={folder}", f"input={ok}", f"output={out}"], no_torch_path)
    assert proc.returncode == 0, proc.stderr
    got = pd.read_csv(out)["click_probability"].to_numpy()
    np.testing.assert_allclose(got, ClickModel(load_served(folder)).predict_proba(rows), atol=1e-6)
