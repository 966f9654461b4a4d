"""Bad tables through `tabcons train`: a one-line usage error naming the problem, or a documented handling.

Never a traceback from inside pandas, the tokenizer or MLflow, and a refused
table leaves no run behind.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from mlflow_tabcons.cli import cli

FAST = ["--shots", "24", "--epochs", "1", "--eval-rows", "20", "--k", "16", "--batch-size", "8", "--seeds", "2",
        "--register", "none"]

# file name -> (bytes, what the error must say)
REFUSED: dict[str, tuple[bytes, str]] = {
    "duplicate_columns.csv": (b"a,b,a,y\n1,2,3,0\n4,5,6,1\n", "has duplicate column names: ['a']"),
    "duplicate_target.csv": (b"a,y,y\n1,0,1\n2,1,0\n", "has duplicate column names: ['y']"),
    "latin1.csv": ("name,y\nJos\xe9,0\nAna,1\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 10)"),
    "utf16.csv": ("a,y\n1,0\n".encode("utf-16"), "is not UTF-8 text (byte 0xff at offset 0)"),
    "empty_file.csv": (b"", "is not a readable CSV file: No columns to parse"),
    "header_only.csv": (b"a,b,y\n", "dataset 'header_only' is empty"),
    "ragged.csv": (b"a,y\n1,0\n2,1,3,4\n", "Expected 2 fields in line 3, saw 4"),
    "all_features_empty.csv": (b"a,b,y\n,,0\n,,1\n,,1\n", "has no feature columns besides the target 'y'"),
    "target_only.csv": (b"y\n0\n1\n", "has no feature columns besides the target 'y'"),
    "one_class.csv": (b"a,y\n1,0\n2,0\n3,0\n", "has a single class 0; a classifier needs two or more"),
    "rare_class.csv": (b"a,y\n" + b"".join(b"%d,%d\n" % (i, int(i == 0)) for i in range(30)),
                       "class 1 has 1 row(s); a stratified split needs at least 3 per class"),
    "empty_target.csv": (b"a,y\n1,\n2,\n3,1\n", "target column 'y' has 2 missing value(s)"),
    "no_target.csv": (b"a,b\n1,0\n2,1\n", "target column 'y' not in dataset"),
    "table.xlsx": (b"PK\x03\x04 not really", "unsupported file type '.xlsx'"),
    "broken.parquet": (b"PAR1 truncated", "is not a readable Parquet file"),
}


def _train(data: str, *extra: str, model: str = "minilm"):
    return CliRunner().invoke(cli, ["train", "--data", data, "--target", "y", "--model", model, *FAST, *extra])


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_bad_table_is_a_usage_error_naming_the_problem_and_leaves_no_run(tracking_uri, tmp_path, name):
    content, message = REFUSED[name]
    path = tmp_path / name
    path.write_bytes(content)
    result = _train(str(path))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and "np.int64" not in result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_dictionary_that_is_not_utf8_is_a_usage_error(tracking_uri, tmp_path):
    dictionary = tmp_path / "dictionary.yaml"
    dictionary.write_bytes("columns:\n  glu: {phrase: \"glucose \xb5g\"}\n".encode("latin-1"))
    result = CliRunner().invoke(cli, ["train", "--data", "diabetes", "--dictionary", str(dictionary), *FAST])
    assert result.exit_code == 2
    assert f"data dictionary {dictionary} is not valid UTF-8 YAML" in result.output


@pytest.fixture()
def messy_table(tmp_path: Path) -> Path:
    """Mixed types in one column, an empty column, a 1000-level categorical with long values, a 20 kB cell."""
    rng = np.random.default_rng(0)
    n = 240
    frame = pd.DataFrame(
        {
            "amount": rng.normal(size=n).round(3),
            "mixed": [("n/a" if i % 3 == 0 else i if i % 3 == 1 else f"{i / 7:.2f}") for i in range(n)],
            "empty": [None] * n,
            "merchant": [f"merchant-{rng.integers(0, 1000)}-" + "ü" * int(rng.integers(1, 200)) for _ in range(n)],
            "note": ["x" * 20000 if i == 5 else "ok" for i in range(n)],
            "y": rng.integers(0, 2, n),
        }
    )
    path = tmp_path / "messy.csv"
    frame.to_csv(path, index=False)
    return path


def test_mixed_types_an_empty_column_and_a_huge_categorical_train_as_documented(tracking_uri, tiny_model_dir, messy_table):
    with pytest.warns(UserWarning, match=r"dropping column\(s\) with no values: \['empty'\]"):
        result = _train(str(messy_table), model=tiny_model_dir)
    assert result.exit_code == 0, result.output
    parent = next(r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                  if r.data.tags.get("tabcons.role") == "ensemble")
    assert parent.info.status == "FINISHED"
    table = mlflow.load_table("tabcons/rows.json", run_ids=[parent.info.run_id])
    assert "empty" not in table.columns
    assert {"amount", "mixed", "merchant", "note"} <= set(table.columns)
    assert len(table) == 20 and table["merchant"].str.startswith("merchant-").all()
    source = pd.read_csv(messy_table)  # pandas reads 'n/a' as missing; the serializer skips missing values
    assert set(table["mixed"].dropna().astype(str)) <= set(source["mixed"].dropna().astype(str))


@pytest.mark.parametrize(("value", "message"), [("2", "class_prior must be"), ("majority", "one of ['data', 'uniform']")])
def test_an_absurd_class_prior_is_a_usage_error_naming_it(tracking_uri, value, message):
    result = CliRunner().invoke(cli, ["train", "--data", "diabetes", "--class-prior", value, *FAST])
    assert result.exit_code == 2, result.output
    assert "--class-prior" in result.output and message in result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
