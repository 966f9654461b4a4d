"""Table row -> text (docs/method.md, "Serialization": the TabLLM text template).

A ``DataDictionary`` says how a column and its coded values read as words; a
``RowSerializer`` turns rows into the text the model reads. Both are plain data
(``to_dict`` / ``from_dict``) so the packaged model carries them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from mlflow_tabcons.errors import TabconsInputError, check_choice

Template = Literal["text", "compact"]
TEMPLATES: tuple[str, ...] = ("text", "compact")


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
    return column.replace("_", " ").replace(".", " ").strip()


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
    """

    columns: Sequence[str]
    dictionary: DataDictionary = field(default_factory=DataDictionary)
    question: str | None = None
    template: Template = "compact"

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
            name, text = self.dictionary.column_text(column), self.dictionary.value_text(column, value)
            lead = f"The {name} is " if self.template == "text" else f"{name}: "
            spans.append((at + len(lead), at + len(lead) + len(text)))
            parts.append(f"{lead}{text}.")
            at += len(parts[-1]) + 1  # the joining space
        if self.question:
            parts.append(self.question)
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
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RowSerializer:
        return cls(
            columns=list(data["columns"]),
            dictionary=DataDictionary.from_dict(data.get("dictionary")),
            question=data.get("question"),
            template=data.get("template", "compact"),
        )
