"""Classical baselines on the members' own rows: what a language model has to add to (docs/recipe.md).

A logistic regression (one-hot categories, scaled numbers) and scikit-learn's
histogram gradient boosting are fit on the same few-shot training rows as the
members and scored on the same evaluation rows, so a run shows at a glance
whether fine-tuning learned what a one-second model learns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from mlflow_tabcons.errors import TabconsInputError, check_array
from mlflow_tabcons.metrics.classification import classification_scores, mcnemar_vs_majority

BASELINES = ("logistic", "boosting")


def numeric_columns(frame: pd.DataFrame, features: Sequence[str]) -> list[str]:
    """Columns read as numbers; booleans and everything else are categories."""
    return [c for c in features if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]


def _as_categories(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Categorical columns as strings, missing values kept as NaN (what the imputers and encoders expect)."""
    part = frame[list(columns)]
    return part.astype(str).where(part.notna(), np.nan)


def _design(frame: pd.DataFrame, features: Sequence[str], numeric: Sequence[str]) -> pd.DataFrame:
    categorical = [c for c in features if c not in numeric]
    out = frame[list(numeric)].astype(float)
    return pd.concat([out, _as_categories(frame, categorical)], axis=1)[list(features)]


def logistic_model(features: Sequence[str], numeric: Sequence[str], seed: int = 0):
    """One-hot categories and standardized numbers (medians for missing ones) into L2 logistic regression."""
    categorical = [c for c in features if c not in numeric]
    prepare = ColumnTransformer(
        [
            ("numbers", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), list(numeric)),
            (
                "categories",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value="missing"), OneHotEncoder(handle_unknown="ignore")
                ),
                categorical,
            ),
        ]
    )
    return make_pipeline(prepare, LogisticRegression(max_iter=2000, random_state=seed))


def boosting_model(features: Sequence[str], numeric: Sequence[str], seed: int = 0):
    """Ordinal-coded categories (declared categorical) and raw numbers into histogram gradient boosting."""
    categorical = [c for c in features if c not in numeric]
    prepare = ColumnTransformer(
        [
            ("numbers", "passthrough", list(numeric)),
            (
                "categories",
                OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan, encoded_missing_value=np.nan),
                categorical,
            ),
        ]
    )
    mask = [False] * len(numeric) + [True] * len(categorical)
    return make_pipeline(prepare, HistGradientBoostingClassifier(categorical_features=mask, random_state=seed))


def _class_probabilities(model, frame: pd.DataFrame, num_classes: int) -> np.ndarray:
    """predict_proba widened to every class id 0..C-1 (a class absent from training gets 0)."""
    fitted = model.predict_proba(frame)
    out = np.zeros((len(frame), num_classes))
    out[:, model.classes_] = fitted
    return out


def classical_baselines(
    train: pd.DataFrame,
    train_labels: np.ndarray,
    evaluation: pd.DataFrame,
    eval_labels: np.ndarray,
    features: Sequence[str],
    *,
    num_classes: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """``baseline_{logistic,boosting}_{accuracy,auroc,majority_pvalue}`` of both models fit on ``train``, scored on
    ``evaluation``; the p-value is the members' own test against the majority class (``mcnemar_vs_majority``), so a
    run shows whether its rows could reveal a gain at all."""
    train_labels = check_array("train_labels", train_labels, ndim=1, min_shape=(1,), dtype=np.int64)
    eval_labels = check_array("eval_labels", eval_labels, ndim=1, min_shape=(1,), dtype=np.int64)
    features = list(features)
    if not features:
        raise TabconsInputError("classical baselines need at least one feature column")
    for name, frame, labels in (("training", train, train_labels), ("evaluation", evaluation, eval_labels)):
        missing = [c for c in features if c not in frame.columns]
        if missing:
            raise TabconsInputError(f"{name} rows lack feature column(s) {missing}")
        if len(frame) != len(labels):
            raise TabconsInputError(f"{len(frame)} {name} rows but {len(labels)} labels")
    if np.unique(train_labels).size < 2:
        raise TabconsInputError("classical baselines need training rows of at least two classes")
    num_classes = num_classes or int(max(train_labels.max(), eval_labels.max()) + 1)
    numeric = numeric_columns(train, features)
    x_train, x_eval = _design(train, features, numeric), _design(evaluation, features, numeric)
    metrics: dict[str, float] = {}
    for name, build in (("logistic", logistic_model), ("boosting", boosting_model)):
        model = build(features, numeric, seed).fit(x_train, train_labels)
        probabilities = _class_probabilities(model, x_eval, num_classes)
        scores = classification_scores(eval_labels, probabilities)
        metrics[f"baseline_{name}_accuracy"] = scores["accuracy"]
        metrics[f"baseline_{name}_auroc"] = scores["auroc"]
        metrics[f"baseline_{name}_majority_pvalue"] = mcnemar_vs_majority(eval_labels, probabilities.argmax(axis=1))
    return metrics
