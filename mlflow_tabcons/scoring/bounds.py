"""Lower confidence bounds on the mean of bounded samples (docs/method.md, "The certificate").

Every function takes ``z`` of shape (rows, k): k i.i.d. samples per row in
[low, high] (for the consistency measure, Z_i = g(x_i) - |g(x) - g(x_i)| in
[-1, 1]) and returns one bound per row that holds with probability >= 1 - alpha.

- ``empirical_bernstein_lcb``: Maurer & Pontil (2009), Theorem 4; fixed k.
- ``bernstein_lcb``: the classical Bernstein bound with a stated variance bound.
- ``betting_lcb`` / ``betting_ucb``: the predictable plug-in betting confidence
  sequence of Waudby-Smith & Ramdas (2023). It holds at every k at once
  (anytime-valid), so a row's sampling may stop as soon as the bound decides.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy import stats

from mlflow_tabcons.errors import TabconsInputError, check_array, check_choice, check_float, check_int

Bound = Literal["empirical-bernstein", "bernstein", "betting"]
BOUNDS: tuple[str, ...] = ("empirical-bernstein", "bernstein", "betting")

# Share of a bet's maximum size (1/m) the betting strategy may use: keeps the
# capital positive when a sample lands at the edge of the range.
_BET_CAP = 0.75
_BISECTION_STEPS = 40


def _samples(z: np.ndarray, low: float, high: float, min_k: int) -> np.ndarray:
    z = check_array("z", z, ndim=2, low=low, high=high)
    if z.shape[1] < min_k:
        raise TabconsInputError(f"the bound needs at least {min_k} samples per row, got {z.shape[1]}")
    return z


def empirical_bernstein_lcb(z: np.ndarray, alpha: float, *, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """mean - sqrt(2 V ln(2/alpha) / k) - 7 b ln(2/alpha) / (3 (k - 1)), V the sample variance."""
    alpha = check_float("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    z = _samples(z, low, high, min_k=2)
    k = z.shape[1]
    log_term = math.log(2.0 / alpha)
    variance = z.var(axis=1, ddof=1)
    return z.mean(axis=1) - np.sqrt(2.0 * variance * log_term / k) - 7.0 * (high - low) * log_term / (3.0 * (k - 1))


def bernstein_lcb(
    z: np.ndarray, alpha: float, *, variance_bound: float = 1.0, low: float = -1.0, high: float = 1.0
) -> np.ndarray:
    """mean - sqrt(2 V ln(1/alpha) / k) - 2 b ln(1/alpha) / (3 k), with V >= Var(Z) stated.

    ``variance_bound`` must really bound the variance for the guarantee to
    hold; for samples in [low, high] it can never exceed (high - low)^2 / 4.
    """
    alpha = check_float("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    variance_bound = check_float(
        "variance_bound", variance_bound, low=0.0, high=(high - low) ** 2 / 4.0, low_open=True
    )
    z = _samples(z, low, high, min_k=1)
    k = z.shape[1]
    log_term = math.log(1.0 / alpha)
    return z.mean(axis=1) - math.sqrt(2.0 * variance_bound * log_term / k) - 2.0 * (high - low) * log_term / (3.0 * k)


def _predictable_bets(x: np.ndarray, alpha: float) -> np.ndarray:
    """lambda_i from samples 1..i-1 only (predictable plug-in, WSR 2023 eq. 26)."""
    rows, k = x.shape
    count = np.arange(1, k + 1)
    running_mean = (0.5 + np.cumsum(x, axis=1)) / (count + 1)
    previous_mean = np.concatenate([np.full((rows, 1), 0.5), running_mean[:, :-1]], axis=1)
    running_var = (0.25 + np.cumsum((x - previous_mean) ** 2, axis=1)) / (count + 1)
    previous_var = np.concatenate([np.full((rows, 1), 0.25), running_var[:, :-1]], axis=1)
    return np.sqrt(2.0 * math.log(1.0 / alpha) / (previous_var * count * np.log1p(count)))


def _rejected(x: np.ndarray, bets: np.ndarray, m: np.ndarray, alpha: float, upper: bool) -> np.ndarray:
    """Per row: did the capital betting against mean m (<= m if upper else >= m) ever reach 1/alpha?"""
    m = m[:, None]
    if upper:
        factors = 1.0 - np.minimum(bets, _BET_CAP / np.maximum(1.0 - m, 1e-12)) * (x - m)
    else:
        factors = 1.0 + np.minimum(bets, _BET_CAP / np.maximum(m, 1e-12)) * (x - m)
    log_capital = np.cumsum(np.log(factors), axis=1)
    return log_capital.max(axis=1) >= math.log(1.0 / alpha)


def _betting_bound(z: np.ndarray, alpha: float, low: float, high: float, upper: bool) -> np.ndarray:
    alpha = check_float("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    z = _samples(z, low, high, min_k=1)
    x = (z - low) / (high - low)
    bets = _predictable_bets(x, alpha)
    # Capital against m is monotone in m, so the rejected means form an
    # interval that ends at the bound: find its edge by bisection.
    inside, outside = (np.ones(len(x)), np.zeros(len(x))) if upper else (np.zeros(len(x)), np.ones(len(x)))
    # ``inside`` is always a rejected (or trivial) mean; ``outside`` never is.
    for _ in range(_BISECTION_STEPS):
        mid = (inside + outside) / 2.0
        rejected = _rejected(x, bets, mid, alpha, upper)
        inside = np.where(rejected, mid, inside)
        outside = np.where(rejected, outside, mid)
    return low + (high - low) * inside


def betting_lcb(z: np.ndarray, alpha: float, *, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """The running lower end of the betting confidence sequence after all k samples.

    Valid simultaneously for every prefix of the samples, so it stays valid
    when k was chosen by looking at the data (early stopping).
    """
    return _betting_bound(z, alpha, low, high, upper=False)


def betting_ucb(z: np.ndarray, alpha: float, *, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """The running upper end of the betting confidence sequence (the mirror of ``betting_lcb``)."""
    return _betting_bound(z, alpha, low, high, upper=True)


def lower_confidence_bound(
    z: np.ndarray, alpha: float, bound: str = "empirical-bernstein", *, variance_bound: float = 1.0
) -> np.ndarray:
    """The lower bound named by ``bound`` for samples of the consistency measure in [-1, 1]."""
    check_choice("bound", bound, BOUNDS)
    if bound == "empirical-bernstein":
        return empirical_bernstein_lcb(z, alpha)
    if bound == "bernstein":
        return bernstein_lcb(z, alpha, variance_bound=variance_bound)
    return betting_lcb(z, alpha)


def clopper_pearson(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided 1 - alpha confidence interval for a binomial proportion."""
    trials = check_int("trials", trials, minimum=1)
    successes = check_int("successes", successes, minimum=0, maximum=trials)
    alpha = check_float("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    lower = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lower, upper
