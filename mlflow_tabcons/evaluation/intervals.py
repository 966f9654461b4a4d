"""Bootstrap intervals over rows for the evaluation's rank statistics (docs/evaluation.md).

Pure, vectorized functions in the style of ``sklearn.metrics``: each statistic
takes (..., n) arrays and is computed along the last axis, so one call
evaluates every bootstrap resample at once. Resamples are drawn once
(``bootstrap_indices``) and shared by every measure, which makes the intervals
of differences *paired*: both measures are judged on the same resampled rows.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from mlflow_tabcons.errors import TabconsInputError, check_array, check_float, check_int

DEFAULT_RESAMPLES = 2000


def bootstrap_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples + 1, n) row indices: row 0 is the identity (the point estimate), then ``resamples`` draws with replacement."""
    check_int("rows", n, minimum=1)
    check_int("resamples", resamples, minimum=1)
    generator = np.random.default_rng(seed)
    draws = generator.integers(0, n, size=(resamples, n))
    return np.vstack([np.arange(n)[None], draws])


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=-1) / np.where(denominator > 0, denominator, 1.0), np.nan)


def spearman_along(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis (average ranks for ties); NaN where either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape:
        raise TabconsInputError(f"the two sides have shapes {x.shape} and {y.shape}")
    return _pearson(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1))


def auroc_along(score: np.ndarray, event: np.ndarray) -> np.ndarray:
    """AUROC of ``score`` for the boolean ``event`` along the last axis (Mann-Whitney, ties count half); NaN with one class."""
    score, event = np.asarray(score, dtype=float), np.asarray(event, dtype=bool)
    if score.shape != event.shape:
        raise TabconsInputError(f"score has shape {score.shape} but event {event.shape}")
    ranks = stats.rankdata(score, axis=-1)
    positives = event.sum(axis=-1)
    negatives = event.shape[-1] - positives
    rank_sum = np.where(event, ranks, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)


def partial_spearman_along(x: np.ndarray, y: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Spearman correlation of x and y with ``given`` partialled out (the partial correlation of the ranks)."""
    r_xy, r_xz, r_yz = spearman_along(x, y), spearman_along(x, given), spearman_along(y, given)
    with np.errstate(invalid="ignore", divide="ignore"):
        denominator = np.sqrt((1 - r_xz**2) * (1 - r_yz**2))
        return np.where(denominator > 1e-12, (r_xy - r_xz * r_yz) / np.where(denominator > 1e-12, denominator, 1.0), np.nan)


def interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval of bootstrap samples (NaN samples, from resamples where the statistic is undefined, dropped)."""
    check_float("level", level, low=0.0, high=1.0, low_open=True, high_open=True)
    finite = np.asarray(samples, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def resampled(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``values`` (n,) taken at bootstrap ``indices`` (B, n)."""
    values = check_array("values", values, ndim=1, min_shape=(1,))
    if indices.ndim != 2 or (indices.size and indices.max() >= values.size):
        raise TabconsInputError(f"bootstrap indices of shape {indices.shape} do not fit {values.size} rows")
    return values[indices]


def subset_mean(values: np.ndarray, chosen: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over the ``chosen`` rows of every resample (B,); NaN where a resample holds none."""
    picked = resampled(np.asarray(chosen, dtype=float), indices)
    total = (picked * resampled(values, indices)).sum(axis=1)
    count = picked.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.where(count > 0, count, 1.0), np.nan)
