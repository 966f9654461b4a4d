import math

import numpy as np
import pandas as pd
import pytest

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.data.serialize import DataDictionary, RowSerializer, format_value

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
