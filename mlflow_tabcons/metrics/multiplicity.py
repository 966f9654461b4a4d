"""Fine-tuning multiplicity across a seed ensemble (docs/method.md, "Ground truth").

Pure functions in the scikit-learn style: arrays in, numbers out, inputs
validated. ``labels`` is an (m, n) integer array of m models' predicted classes
on n rows; ``probabilities`` is an (m, n) array of each model's probability for
one class per row (the positive class, or the reference's predicted class).
"""

from __future__ import annotations

import numpy as np

from mlflow_tabcons.errors import TabconsInputError, check_array, check_int


def _labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    array = check_array(name, labels, ndim=2, min_shape=(2, 1), dtype=np.float64)
    if not np.all(array == np.round(array)):
        raise TabconsInputError(f"{name} must hold integer class indices")
    return array.astype(np.int64)


def _probabilities(probabilities: np.ndarray) -> np.ndarray:
    return check_array("probabilities", probabilities, ndim=2, low=0.0, high=1.0, min_shape=(2, 1))


def disagreement_mask(labels: np.ndarray) -> np.ndarray:
    """Per row: True where at least two models predict different classes."""
    labels = _labels(labels)
    return np.any(labels != labels[:1], axis=0)


def arbitrariness(labels: np.ndarray) -> float:
    """Share of rows on which some pair of models disagrees (a.k.a. ambiguity)."""
    return float(disagreement_mask(labels).mean())


def pairwise_disagreement(labels: np.ndarray) -> np.ndarray:
    """Per row: the share of model pairs that disagree, 2/(m(m-1)) sum_{j<l} 1[y_j != y_l]."""
    labels = _labels(labels)
    m = labels.shape[0]
    agreeing_pairs = np.zeros(labels.shape[1])
    for value in np.unique(labels):
        count = (labels == value).sum(axis=0)
        agreeing_pairs += count * (count - 1) / 2
    return 1.0 - agreeing_pairs / (m * (m - 1) / 2)


def prediction_variance(probabilities: np.ndarray) -> np.ndarray:
    """Per row: (1/m) sum_j (f_j(x) - mean_j f_j(x))^2."""
    return _probabilities(probabilities).var(axis=0)


def prediction_range(probabilities: np.ndarray) -> np.ndarray:
    """Per row: max_j f_j(x) - min_j f_j(x)."""
    probabilities = _probabilities(probabilities)
    return probabilities.max(axis=0) - probabilities.min(axis=0)


def churn(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Share of rows on which two models' predictions differ."""
    a = check_array("labels_a", labels_a, ndim=1, min_shape=(1,))
    b = check_array("labels_b", labels_b, ndim=1, min_shape=(1,))
    if a.shape != b.shape:
        raise TabconsInputError(f"labels_a and labels_b must have the same length, got {a.size} and {b.size}")
    return float(np.mean(a != b))


def discrepancy(labels: np.ndarray, reference: int = 0) -> float:
    """The largest share of rows on which one model disagrees with the reference model."""
    labels = _labels(labels)
    reference = check_int("reference", reference, minimum=0, maximum=labels.shape[0] - 1)
    others = np.delete(labels, reference, axis=0)
    return float(np.max(np.mean(others != labels[reference], axis=1)))


def agreement_with_reference(labels: np.ndarray, reference: int = 0) -> np.ndarray:
    """Per row: the share of the other m-1 models that predict the reference's class."""
    labels = _labels(labels)
    reference = check_int("reference", reference, minimum=0, maximum=labels.shape[0] - 1)
    others = np.delete(labels, reference, axis=0)
    return np.mean(others == labels[reference], axis=0)


def class_probabilities(probabilities: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Pick, for every model and row, the probability of ``classes[row]``.

    ``probabilities`` is (m, n, C); the result is (m, n), the input the
    variance and range functions take for multiclass tasks.
    """
    probabilities = check_array("probabilities", probabilities, ndim=3, low=0.0, high=1.0, min_shape=(1, 1, 2))
    classes = check_array("classes", classes, ndim=1, low=0, high=probabilities.shape[2] - 1).astype(np.int64)
    if classes.shape[0] != probabilities.shape[1]:
        raise TabconsInputError(
            f"classes has {classes.shape[0]} rows but probabilities has {probabilities.shape[1]}"
        )
    return np.take_along_axis(probabilities, classes[None, :, None], axis=2)[:, :, 0]


def multiplicity_summary(labels: np.ndarray, probabilities: np.ndarray, reference: int = 0) -> dict[str, float]:
    """The ensemble-level numbers logged on the parent run."""
    return {
        "arbitrariness": arbitrariness(labels),
        "mean_pairwise_disagreement": float(pairwise_disagreement(labels).mean()),
        "mean_prediction_variance": float(prediction_variance(probabilities).mean()),
        "mean_prediction_range": float(prediction_range(probabilities).mean()),
        "discrepancy": discrepancy(labels, reference),
    }
