"""Per-model classification scores: accuracy, balanced accuracy, AUROC, and the bar to beat."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from mlflow_tabcons.errors import TabconsInputError, check_array


def majority_rate(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class: what a model must beat."""
    labels = check_array("labels", labels, ndim=1, min_shape=(1,), dtype=np.int64)
    return float(np.bincount(labels).max() / labels.size)


def auroc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Binary: AUROC of the class-1 probability. Multiclass: macro one-vs-rest. NaN if one class only."""
    present = np.unique(labels)
    if present.size < 2:
        return float("nan")
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    if present.size < probabilities.shape[1]:
        return float("nan")
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


def classification_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """accuracy, balanced_accuracy and auroc of one model's class probabilities (n, C)."""
    labels = check_array("labels", labels, ndim=1, min_shape=(1,), dtype=np.int64)
    probabilities = check_array("probabilities", probabilities, ndim=2, low=0.0, high=1.0)
    if probabilities.shape[0] != labels.shape[0]:
        raise TabconsInputError(f"{labels.shape[0]} labels but {probabilities.shape[0]} rows of probabilities")
    predicted = probabilities.argmax(axis=1)
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "auroc": auroc(labels, probabilities),
    }
