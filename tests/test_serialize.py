import math

import numpy as np
import pandas as pd
import pytest

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.data.serialize import DataDictionary, NumberWords, RowSerializer, format_value, truncate

DICTIONARY = DataDictionary.from_dict(
    {"checking": {"text": "checking account", "values": {"A11": "below 0 DM"}}, "age_years": "age"}
)


def test_text_template_reads_as_tabllm():
    serializer = RowSerializer(["checking", "age_years", "job_title"], DICTIONARY, "Good risk? Yes or no?", "text")
    text = serializer.serialize({"checking": "A11", "age_years": 42.0, "job_title": "clerk"})
    assert text == "The checking account is below 0 DM. The age is 42. The job title is clerk. Good risk? Yes or no?"


def test_compact_template_is_shorter_and_says_the_same():
    row = {"checking": "A11", "age_years": 42, "job_title": "clerk"}
    compact = RowSerializer(["checking", "age_years", "job_title"], DICTIONARY, template="compact").serialize(row)
    assert compact == "checking account: below 0 DM. age: 42. job title: clerk."


@pytest.mark.parametrize("missing", [None, float("nan"), np.nan, pd.NA, "", "   "])
def test_missing_values_are_skipped_never_printed(missing):
    serializer = RowSerializer(["checking", "age_years"], DICTIONARY, template="text")
    text = serializer.serialize({"checking": missing, "age_years": 30})
    assert text == "The age is 30."
    assert "nan" not in text.lower() and "none" not in text.lower()


@pytest.mark.parametrize(
    "value, expected",
    [(6.0, "6"), (0.1 + 0.2, "0.3"), (30.2, "30.2"), (1169, "1169"), (np.int64(3), "3"), (True, "yes"), (" x ", "x"),
     (1e20, "100000000000000000000"), (0.000123, "0.000123")],
)
def test_numbers_read_without_float_noise(value, expected):
    assert format_value(value) == expected


def test_frame_serialization_checks_columns():
    serializer = RowSerializer(["a", "b"])
    with pytest.raises(TabconsInputError, match=r"missing column\(s\) \['b'\]"):
        serializer.serialize_frame(pd.DataFrame({"a": [1]}))


def test_round_trip_through_dict():
    serializer = RowSerializer(["checking", "age_years"], DICTIONARY, "Q?", "text")
    assert RowSerializer.from_dict(serializer.to_dict()) == serializer


def test_bad_serializer_arguments():
    with pytest.raises(TabconsInputError, match="template"):
        RowSerializer(["a"], template="json")
    with pytest.raises(TabconsInputError, match="duplicate"):
        RowSerializer(["a", "a"])
    with pytest.raises(TabconsInputError, match="at least one"):
        RowSerializer([])
    assert math.isnan(float("nan"))


def test_quantile_words_come_from_the_training_rows():
    train = pd.DataFrame({"priors": [0, 0, 1, 1, 2, 3, 5, 8, 13], "sex": ["f", "m"] * 4 + ["f"], "flag": [True] * 9})
    words = NumberWords.fit(train, ["priors", "sex", "flag"])
    assert set(words.cuts) == {"priors"}  # only numeric columns, never booleans or text
    serializer = RowSerializer(["priors", "sex"], numbers=words)
    assert serializer.serialize({"priors": 0, "sex": "f"}) == "priors: 0 (low). sex: f."
    assert serializer.serialize({"priors": 2, "sex": "m"}) == "priors: 2 (medium). sex: m."
    assert serializer.serialize({"priors": 40, "sex": "m"}) == "priors: 40 (high). sex: m."
    assert serializer.serialize({"priors": float("nan"), "sex": "m"}) == "sex: m."
    assert RowSerializer.from_dict(serializer.to_dict()) == serializer


def test_five_quantile_words_and_columns_with_few_values():
    train = pd.DataFrame({"x": np.arange(100.0), "children": [0, 1, 2] * 33 + [0]})
    words = NumberWords.fit(train, ["x", "children"], bins=5)
    assert set(words.cuts) == {"x"}  # three distinct values cannot fill five bins: read as they are
    assert [words.word("x", v) for v in (0, 30, 50, 70, 99)] == ["very low", "low", "medium", "high", "very high"]
    with pytest.raises(TabconsInputError, match="bins"):
        NumberWords.fit(train, ["x"], bins=4)
    with pytest.raises(TabconsInputError, match="sorted"):
        NumberWords.from_dict({"x": [3.0, 1.0]})


@pytest.mark.parametrize(
    "column, phrase",
    [("prior_offences", "prior offences"), ("priorOffences", "prior offences"), ("LoyalCH", "loyal CH"),
     ("credit.amount", "credit amount"), ("HTTPServer", "HTTP server"), ("age", "age")],
)
def test_column_names_read_as_phrases(column, phrase):
    assert DataDictionary().column_text(column) == phrase


def test_long_free_text_is_cut_at_a_word():
    text = "Felony grand theft in the third degree " * 5
    cut = RowSerializer(["charge"]).serialize({"charge": text})
    assert cut.endswith("....") and len(cut) < 100 and "degree Felony" in cut
    assert truncate("short text") == "short text"
