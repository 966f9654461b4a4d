"""Table row -> text (docs/method.md, "Serialization": the TabLLM text template).

A ``DataDictionary`` says how a column and its coded values read as words; a
``RowSerializer`` turns rows into the text the model reads. Both are plain data
(``to_dict`` / ``from_dict``) so the packaged model carries them.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from mlflow_tabcons.errors import TabconsInputError, check_choice

Template = Literal["text", "compact"]
TEMPLATES: tuple[str, ...] = ("text", "compact")
# How numbers read: as they are, or followed by their quantile word among the training rows ("3 (high)").
NUMBER_STYLES: tuple[str, ...] = ("plain", "words")
# Words for the quantile bins of a numeric column, by number of bins.
QUANTILE_WORDS: dict[int, tuple[str, ...]] = {
    3: ("low", "medium", "high"),
    5: ("very low", "low", "medium", "high", "very high"),
}
# Free text longer than this many characters is cut (with "...") so one column cannot fill the token budget.
MAX_VALUE_CHARS = 80


@dataclass(frozen=True)
class ColumnInfo:
    """How one column reads: a phrase for its name and words for coded values."""

    text: str
    values: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DataDictionary:
    """Column phrases and value words; columns it does not name read as their own name."""

    columns: Mapping[str, ColumnInfo] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DataDictionary:
        if not data:
            return cls()
        columns = {}
        for name, info in data.items():
            if isinstance(info, str):
                info = {"text": info}
            if not isinstance(info, Mapping) or not isinstance(info.get("text", ""), str):
                raise TabconsInputError(f"data dictionary entry for column {name!r} must be a mapping with 'text'")
            values = {str(code): str(word) for code, word in (info.get("values") or {}).items()}
            columns[str(name)] = ColumnInfo(text=info.get("text") or _humanize(str(name)), values=values)
        return cls(columns)

    def to_dict(self) -> dict[str, Any]:
        return {name: {"text": info.text, "values": dict(info.values)} for name, info in self.columns.items()}

    def column_text(self, column: str) -> str:
        info = self.columns.get(column)
        return info.text if info else _humanize(column)

    def value_text(self, column: str, value: Any) -> str:
        rendered = format_value(value)
        info = self.columns.get(column)
        return info.values.get(rendered, rendered) if info else rendered


def _humanize(column: str) -> str:
    """A column name as a phrase: ``prior_offences``, ``priorOffences`` and ``prior.offences`` read "prior offences".

    Acronyms stay as they are (``LoyalCH`` reads "loyal CH").
    """
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", column.replace("_", " ").replace(".", " "))
    words = [w.lower() if w[:1].isupper() and w[1:].islower() else w for w in spaced.split()]
    return " ".join(words)


@dataclass(frozen=True)
class NumberWords:
    """Quantile cut points of numeric columns among the training rows, so a number says where it stands.

    A language model reads "prior offences: 3" as three tokens with no scale;
    "prior offences: 3 (high)" says how 3 compares with the other rows.
    """

    cuts: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    @classmethod
    def fit(cls, frame: pd.DataFrame, columns: Sequence[str], bins: int = 3) -> NumberWords:
        """Cut points of every numeric column of ``frame`` with more distinct values than ``bins``."""
        if bins not in QUANTILE_WORDS:
            raise TabconsInputError(f"quantile words exist for {sorted(QUANTILE_WORDS)} bins, not {bins}")
        cuts: dict[str, tuple[float, ...]] = {}
        for column in columns:
            values = frame[column]
            if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
                continue
            values = values.dropna().astype(float)
            if values.nunique() <= bins:
                continue
            points = np.quantile(values, np.arange(1, bins) / bins)
            cuts[str(column)] = tuple(float(p) for p in points)
        return cls(cuts)

    def word(self, column: str, value: Any) -> str | None:
        """The quantile word of ``value`` in ``column``; None for columns without cut points or non-numbers."""
        points = self.cuts.get(column)
        if points is None or isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            return None
        return QUANTILE_WORDS[len(points) + 1][int(np.searchsorted(points, float(value), side="right"))]

    def to_dict(self) -> dict[str, list[float]]:
        return {column: list(points) for column, points in self.cuts.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]] | None) -> NumberWords:
        cuts = {}
        for column, points in (data or {}).items():
            points = tuple(float(p) for p in points)
            if len(points) + 1 not in QUANTILE_WORDS or list(points) != sorted(points):
                raise TabconsInputError(f"quantile cut points of column {column!r} must be {sorted(QUANTILE_WORDS)} - 1 sorted numbers")
            cuts[str(column)] = points
        return cls(cuts)


def truncate(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` cut at a word boundary before ``limit`` characters, marked with "..."."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" ,;.") + "..."


def is_missing(value: Any) -> bool:
    """None, NaN, NA and blank strings are missing: they are skipped, never printed."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return math.isnan(float(value))
    return False


def format_value(value: Any) -> str:
    """Numbers without float noise (6.0 -> "6", 0.1 + 0.2 -> "0.3"), everything else as str."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if number.is_integer() and abs(number) < 1e15:
            return str(int(number))
        return np.format_float_positional(number, precision=6, unique=True, fractional=False, trim="-")
    return str(value).strip()


@dataclass(frozen=True)
class RowSerializer:
    """Serializes rows with a fixed column order, dictionary, template and question.

    ``text`` is TabLLM's template ("The age is 42."); ``compact`` ("age: 42.")
    reads the same facts in fewer tokens, which is what every forward pass pays for.
    ``answer_cue`` ("Answer:") ends the text for generative members, which read
    their answer word right after it; encoders have none.
    """

    columns: Sequence[str]
    dictionary: DataDictionary = field(default_factory=DataDictionary)
    question: str | None = None
    template: Template = "compact"
    numbers: NumberWords | None = None
    answer_cue: str | None = None

    def __post_init__(self) -> None:
        check_choice("template", self.template, TEMPLATES)
        if not self.columns:
            raise TabconsInputError("a serializer needs at least one feature column")
        duplicates = sorted({c for c in self.columns if list(self.columns).count(c) > 1})
        if duplicates:
            raise TabconsInputError(f"duplicate feature columns: {duplicates}")

    def serialize(self, row: Mapping[str, Any]) -> str:
        return self.serialize_with_spans(row)[0]

    def serialize_with_spans(self, row: Mapping[str, Any]) -> tuple[str, list[tuple[int, int]]]:
        """The row's text and the character spans [start, end) of its values (not the template, names or question)."""
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        at = 0
        for column in self.columns:
            value = row[column]
            if is_missing(value):
                continue
            name, text = self.dictionary.column_text(column), truncate(self.dictionary.value_text(column, value))
            word = self.numbers.word(column, value) if self.numbers else None
            if word:
                text = f"{text} ({word})"
            lead = f"The {name} is " if self.template == "text" else f"{name}: "
            spans.append((at + len(lead), at + len(lead) + len(text)))
            parts.append(f"{lead}{text}.")
            at += len(parts[-1]) + 1  # the joining space
        if self.question:
            parts.append(self.question)
        if self.answer_cue:
            parts.append(self.answer_cue)
        return " ".join(parts), spans

    def _records(self, frame: pd.DataFrame) -> list[dict[str, Any]]:
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise TabconsInputError(f"input is missing column(s) {missing}; expected {list(self.columns)}")
        return frame[list(self.columns)].to_dict(orient="records")

    def serialize_frame(self, frame: pd.DataFrame) -> list[str]:
        return [self.serialize(row) for row in self._records(frame)]

    def serialize_frame_with_spans(self, frame: pd.DataFrame) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """Texts and value spans of every row (what the scorer's ``values`` site perturbs)."""
        pairs = [self.serialize_with_spans(row) for row in self._records(frame)]
        return [text for text, _ in pairs], [spans for _, spans in pairs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": list(self.columns),
            "dictionary": self.dictionary.to_dict(),
            "question": self.question,
            "template": self.template,
            "numbers": self.numbers.to_dict() if self.numbers else None,
            "answer_cue": self.answer_cue,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RowSerializer:
        return cls(
            columns=list(data["columns"]),
            dictionary=DataDictionary.from_dict(data.get("dictionary")),
            question=data.get("question"),
            template=data.get("template", "compact"),
            numbers=NumberWords.from_dict(data["numbers"]) if data.get("numbers") is not None else None,
            answer_cue=data.get("answer_cue"),
        )
