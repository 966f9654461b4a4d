"""Per-model classification scores: accuracy, balanced accuracy, AUROC, the bar to beat and the test of beating it."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from mlflow_tabcons.errors import TabconsInputError, check_array, check_float, check_int


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


def ranking_pvalue(labels: np.ndarray, probabilities: np.ndarray, *, permutations: int = 999, seed: int = 0) -> float:
    """One-sided permutation p-value that the model ranks the rows no better than chance (AUROC <= 0.5).

    The labels are shuffled ``permutations`` times (a fixed ``seed``, so the same
    model and rows always give the same answer) and the p-value is the share of
    shuffles whose AUROC reaches the model's, counting the model's own. Binary
    and multiclass alike (macro one-vs-rest, as ``auroc``); 1.0 when a class is missing.
    """
    from scipy.stats import rankdata

    labels, probabilities = _checked(labels, probabilities)
    check_int("permutations", permutations, minimum=1, maximum=100_000)
    classes = [1] if probabilities.shape[1] == 2 else range(probabilities.shape[1])
    if np.unique(labels).size < max(2, len(classes)):
        return 1.0
    shuffled = np.random.default_rng(seed).permuted(np.tile(labels, (permutations + 1, 1)), axis=1)
    shuffled[0] = labels  # row 0: the labels as they are
    # AUROC of class c vs rest from ranks (Mann-Whitney): (rank sum of class c - n_c (n_c + 1) / 2) / (n_c (n - n_c))
    per_class = []
    for c in classes:
        count = int(np.sum(labels == c))
        rank_sums = (shuffled == c) @ rankdata(probabilities[:, c])
        per_class.append((rank_sums - count * (count + 1) / 2) / (count * (labels.size - count)))
    aurocs = np.mean(per_class, axis=0)
    return float((1 + np.sum(aurocs[1:] >= aurocs[0] - 1e-12)) / (permutations + 1))


def _checked(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class ids (n,) and probabilities (n, C) in [0, 1], one row per label."""
    labels = check_array("labels", labels, ndim=1, min_shape=(1,), dtype=np.int64)
    probabilities = check_array("probabilities", probabilities, ndim=2, low=0.0, high=1.0)
    if probabilities.shape[0] != labels.shape[0]:
        raise TabconsInputError(f"{labels.shape[0]} labels but {probabilities.shape[0]} rows of probabilities")
    return labels, probabilities


def log_loss(
    labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7, sample_weight: np.ndarray | None = None
) -> float:
    """(Weighted) mean negative log-probability of the true class (cross-entropy), probabilities clipped at ``eps``."""
    labels, probabilities = _checked(labels, probabilities)
    losses = -np.log(np.clip(probabilities[np.arange(labels.size), labels], eps, 1.0))
    return float(np.average(losses, weights=sample_weight))


def classification_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """accuracy, balanced_accuracy and auroc of one model's class probabilities (n, C)."""
    labels, probabilities = _checked(labels, probabilities)
    predicted = probabilities.argmax(axis=1)
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "auroc": auroc(labels, probabilities),
    }


def mcnemar_vs_majority(labels: np.ndarray, predicted: np.ndarray) -> float:
    """One-sided exact McNemar p-value that a model's predictions beat always predicting the majority class.

    Paired on the same rows: ``b`` rows the model gets right and the constant
    guess gets wrong, ``c`` the reverse. Under "no better than the majority
    class", b <= c in expectation; the p-value is P(X >= b) for X ~ Binomial(b + c, 1/2).
    """
    from scipy.stats import binomtest

    labels = check_array("labels", labels, ndim=1, min_shape=(1,), dtype=np.int64)
    predicted = check_array("predicted", predicted, ndim=1, min_shape=(1,), dtype=np.int64)
    if predicted.shape != labels.shape:
        raise TabconsInputError(f"{labels.shape[0]} labels but {predicted.shape[0]} predictions")
    majority = np.bincount(labels).argmax()
    right, guess_right = predicted == labels, labels == majority
    b, c = int(np.sum(right & ~guess_right)), int(np.sum(~right & guess_right))
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)


# The stated test's level: the members learned when half of them pass at LEARNING_ALPHA / 2 each.
LEARNING_ALPHA = 0.05
MEMBER_LEVEL = LEARNING_ALPHA / 2


def passes_majority_test(labels: np.ndarray, predicted: np.ndarray) -> bool:
    """The stated test for one model (a verifier's): beats the majority class at ``MEMBER_LEVEL``, not by a point."""
    return mcnemar_vs_majority(labels, predicted) <= MEMBER_LEVEL


def members_learned(
    labels: np.ndarray, member_probabilities: np.ndarray, alpha: float = LEARNING_ALPHA
) -> tuple[bool, np.ndarray]:
    """Whether the members learned more than the majority class, and each member's McNemar p-value.

    The stated test (docs/recipe.md): at least half of the members beat the
    majority class, each by a one-sided exact McNemar test at level alpha / 2.
    If no member is better than the majority class, the expected number of
    members passing is at most m * alpha / 2, so by Markov's inequality half of
    them pass with probability at most alpha, however dependent the members
    are (they share the rows and the base model).
    """
    alpha = check_float("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    member_probabilities = check_array("member_probabilities", member_probabilities, ndim=3, min_shape=(1, 1, 2))
    p_values = np.array([mcnemar_vs_majority(labels, p.argmax(axis=1)) for p in member_probabilities])
    passed = int(np.sum(p_values <= alpha / 2))
    return bool(2 * passed >= len(p_values)), p_values
