"""Classical baselines: logistic regression and histogram gradient boosting on the members' rows."""

import numpy as np
import pandas as pd
import pytest

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.evaluation.classical import classical_baselines, numeric_columns

KEYS = {"baseline_logistic_accuracy", "baseline_logistic_auroc", "baseline_boosting_accuracy", "baseline_boosting_auroc",
        "baseline_logistic_majority_pvalue", "baseline_boosting_majority_pvalue"}


def _table(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Class 1 iff income is high or the colour is red: learnable by both models."""
    rng = np.random.default_rng(seed)
    income = rng.normal(size=n)
    colour = rng.choice(["red", "green", "blue"], size=n)
    labels = ((income > 0.5) | (colour == "red")).astype(np.int64)
    frame = pd.DataFrame({"income": income, "colour": colour, "noise": rng.normal(size=n)})
    return frame, labels


def test_both_models_learn_a_learnable_table():
    train, y_train = _table(200, 0)
    evaluation, y_eval = _table(300, 1)
    scores = classical_baselines(train, y_train, evaluation, y_eval, ["income", "colour", "noise"])
    assert set(scores) == KEYS
    assert scores["baseline_logistic_accuracy"] > 0.85 and scores["baseline_logistic_auroc"] > 0.9
    assert scores["baseline_boosting_accuracy"] > 0.85 and scores["baseline_boosting_auroc"] > 0.9
    assert scores["baseline_logistic_majority_pvalue"] < 1e-6 and scores["baseline_boosting_majority_pvalue"] < 1e-6


def test_on_labels_unrelated_to_the_features_no_baseline_beats_the_majority_class():
    train, _ = _table(200, 0)
    evaluation, _ = _table(300, 1)
    rng = np.random.default_rng(2)
    y_train, y_eval = (rng.random(200) < 0.3).astype(np.int64), (rng.random(300) < 0.3).astype(np.int64)
    scores = classical_baselines(train, y_train, evaluation, y_eval, ["income", "colour", "noise"])
    assert scores["baseline_logistic_majority_pvalue"] > 0.1 and scores["baseline_boosting_majority_pvalue"] > 0.1


def test_missing_values_unseen_categories_and_booleans_are_handled():
    train, y_train = _table(60, 0)
    evaluation, y_eval = _table(40, 1)
    train.loc[::7, "income"] = np.nan
    train.loc[::5, "colour"] = None
    train["flag"] = y_train.astype(bool)
    evaluation["flag"] = y_eval.astype(bool)
    evaluation.loc[0, "colour"] = "purple"
    assert numeric_columns(train, ["income", "colour", "flag"]) == ["income"]
    scores = classical_baselines(train, y_train, evaluation, y_eval, ["income", "colour", "flag"])
    assert scores["baseline_logistic_accuracy"] == 1.0  # the boolean column is the label


def test_three_classes_and_a_class_absent_from_evaluation():
    train, _ = _table(90, 0)
    y_train = np.arange(90) % 3
    evaluation, _ = _table(20, 1)
    y_eval = np.zeros(20, dtype=np.int64)
    scores = classical_baselines(train, y_train, evaluation, y_eval, ["income", "colour"], num_classes=3)
    assert 0.0 <= scores["baseline_logistic_accuracy"] <= 1.0
    assert np.isnan(scores["baseline_logistic_auroc"])  # one class only: AUROC undefined


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, y: (t.drop(columns=["colour"]), y), "lack feature column"),
        (lambda t, y: (t, y[:-1]), "labels"),
        (lambda t, y: (t, np.zeros_like(y)), "two classes"),
    ],
)
def test_bad_input_is_named(change, message):
    train, y_train = _table(30, 0)
    train, y_train = change(train, y_train)
    evaluation, y_eval = _table(10, 1)
    with pytest.raises(TabconsInputError, match=message):
        classical_baselines(train, y_train, evaluation, y_eval, ["income", "colour"])
