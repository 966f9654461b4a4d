import re

import numpy as np
import pandas as pd
import pytest

from mlflow_tabcons.data.tables import builtin_datasets, few_shot, load_dataset, split_dataset
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.data.serialize import RowSerializer


@pytest.mark.parametrize("name, rows, target, labels", [("credit-g", 1000, "credit_risk", ["bad", "good"]),
                                                          ("diabetes", 532, "type", ["No", "Yes"])])
def test_builtin_datasets_load_offline_with_dictionary(name, rows, target, labels, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # must not write into the home directory
    dataset = load_dataset(name)
    assert len(dataset.frame) == rows and dataset.target == target and dataset.labels == labels
    assert dataset.frame.notna().all().all()
    assert dataset.question.endswith("Yes or no?")
    assert list(tmp_path.iterdir()) == []
    text = RowSerializer(dataset.features, dataset.dictionary, dataset.question).serialize(dataset.frame.iloc[0])
    assert not re.search(r"\bA\d{2,3}\b", text) and not re.search(r"\bnan\b", text)


def test_credit_g_codes_read_as_words():
    dataset = load_dataset("credit-g")
    first = RowSerializer(dataset.features, dataset.dictionary, template="text").serialize(dataset.frame.iloc[0])
    assert first.startswith("The checking account status is below 0 DM. The duration in months is 6.")
    assert set(builtin_datasets()) == {"credit-g", "diabetes"}


def test_split_is_deterministic_stratified_and_disjoint():
    dataset = load_dataset("credit-g")
    a, b = split_dataset(dataset, seed=3), split_dataset(dataset, seed=3)
    pd.testing.assert_frame_equal(a.test, b.test)
    assert len(a.train) + len(a.validation) + len(a.test) == 1000
    for part in (a.train, a.validation, a.test):
        assert part["credit_risk"].eq("good").mean() == pytest.approx(0.7, abs=0.02)
    c = split_dataset(dataset, seed=4)
    assert not a.test.equals(c.test)


def test_few_shot_keeps_proportions_and_every_class():
    dataset = load_dataset("diabetes")
    train = split_dataset(dataset).train
    shots = few_shot(train, "type", 64, seed=1)
    assert len(shots) == 64 and set(shots["type"]) == {"No", "Yes"}
    assert shots["type"].eq("Yes").sum() == pytest.approx(64 * train["type"].eq("Yes").mean(), abs=1)
    assert few_shot(train, "type", 2, seed=0)["type"].nunique() == 2
    pd.testing.assert_frame_equal(few_shot(train, "type", 64, seed=1), shots)


def _csv(tmp_path, text, name="table.csv", mode="w"):
    path = tmp_path / name
    path.write_bytes(text) if mode == "wb" else path.write_text(text)
    return str(path)


def test_csv_and_parquet_load(tmp_path):
    frame = pd.DataFrame({"x": [1.5, None, 3.0, 4.0], "colour": ["red", "blue", None, "red"], "y": [0, 1, 0, 1]})
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "t.csv", index=False)
    for path in ("t.parquet", "t.csv"):
        dataset = load_dataset(str(tmp_path / path), "y")
        assert dataset.features == ["x", "colour"] and dataset.labels == [0, 1]


@pytest.mark.parametrize(
    "content, target, message",
    [
        ("a,b\n1,0\n2,1\n", "c", r"target column 'c' not in dataset"),
        ("a,b\n1,0\n2,0\n", "b", "single class"),
        ("a,b\n1,0\n2,\n3,1\n", "b", r"1 missing value\(s\), e.g. at rows \[1\]"),
        ("a,b\n", "b", "is empty"),
        ("b\n0\n1\n", "b", "no feature columns"),
        ("a,a,b\n1,2,0\n3,4,1\n", "b", r"duplicate column names: \['a'\]"),
    ],
)
def test_bad_tables_get_clear_errors(tmp_path, content, target, message):
    with pytest.raises(TabconsInputError, match=message):
        load_dataset(_csv(tmp_path, content), target)


def test_non_utf8_and_unknown_sources(tmp_path):
    with pytest.raises(TabconsInputError, match="not UTF-8 text .*byte 0xe9"):
        load_dataset(_csv(tmp_path, "a,b\ncaf\xe9,1\nx,0\n".encode("latin-1"), mode="wb"), "b")
    with pytest.raises(TabconsInputError, match="unknown dataset 'nope'.*credit-g, diabetes"):
        load_dataset("nope")
    with pytest.raises(TabconsInputError, match="--target"):
        load_dataset(_csv(tmp_path, "a,b\n1,0\n"))


def test_empty_feature_columns_are_dropped_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"no values: \['empty'\]"):
        dataset = load_dataset(_csv(tmp_path, "a,empty,b\n1,,0\n2,,1\n"), "b")
    assert dataset.features == ["a"]


def test_shots_larger_than_data_is_refused():
    dataset = load_dataset("diabetes")
    train = split_dataset(dataset).train
    with pytest.raises(TabconsInputError, match=f"shots=10000 is larger than the {len(train)} rows"):
        few_shot(train, "type", 10000, seed=0)
    with pytest.raises(TabconsInputError, match="one row of each"):
        few_shot(train, "type", 1, seed=0)


def test_openml_is_skipped_offline():
    try:
        dataset = load_dataset("openml:credit-g")
    except TabconsInputError as error:
        assert "needs network access" in str(error)
        pytest.skip(f"offline: {error}")
    assert len(dataset.frame) == 1000 and np.all(dataset.frame[dataset.target].notna())
