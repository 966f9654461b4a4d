"""The certificates' guarantees, checked by simulation on distributions with known means."""

import math

import numpy as np
import pytest
from scipy import stats

from mlflow_tabcons.scoring import bounds
from mlflow_tabcons.errors import TabconsInputError

ALPHA = 0.05
TRIALS = 1500
# Coverage must be >= 1 - alpha up to Monte Carlo error (3 standard errors).
COVERAGE_FLOOR = 1 - ALPHA - 3 * math.sqrt(ALPHA * (1 - ALPHA) / TRIALS)


def _draw(name: str, rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Samples in [-1, 1] and their true mean."""
    if name == "two-point":  # the worst case for variance: P(Z=1)=0.8, P(Z=-1)=0.2
        return np.where(rng.random(size) < 0.8, 1.0, -1.0), 0.6
    if name == "beta":
        return 2 * rng.beta(8, 2, size) - 1, 2 * 8 / 10 - 1
    if name == "uniform":
        return rng.uniform(-1, 1, size), 0.0
    if name == "narrow":  # what a confident, stable row looks like
        return rng.uniform(0.7, 0.9, size), 0.8
    raise AssertionError(name)


DISTRIBUTIONS = ["two-point", "beta", "uniform", "narrow"]


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("k", [16, 128])
@pytest.mark.parametrize(
    "bound",
    [
        lambda z: bounds.empirical_bernstein_lcb(z, ALPHA),
        lambda z: bounds.bernstein_lcb(z, ALPHA, variance_bound=1.0),
        lambda z: bounds.betting_lcb(z, ALPHA),
    ],
    ids=["empirical-bernstein", "bernstein", "betting"],
)
def test_lower_bounds_cover_the_true_mean(bound, distribution, k):
    rng = np.random.default_rng(hash((distribution, k)) % 2**32)
    z, mean = _draw(distribution, rng, (TRIALS, k))
    coverage = np.mean(bound(z) <= mean)
    assert coverage >= COVERAGE_FLOOR, f"coverage {coverage:.4f} < {COVERAGE_FLOOR:.4f}"


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_betting_bound_holds_at_every_k_at_once(distribution):
    """Anytime validity: the chance that the bound EVER crosses the mean is <= alpha."""
    rng = np.random.default_rng(7)
    z, mean = _draw(distribution, rng, (TRIALS, 128))
    crossed = np.zeros(TRIALS, dtype=bool)
    for k in (8, 16, 32, 64, 128):
        crossed |= bounds.betting_lcb(z[:, :k], ALPHA) > mean
        crossed |= bounds.betting_ucb(z[:, :k], ALPHA) < mean
    # two one-sided sequences, each at level alpha
    assert np.mean(crossed) <= 2 * ALPHA + 3 * math.sqrt(2 * ALPHA / TRIALS)


def test_bounds_are_informative_not_vacuous():
    rng = np.random.default_rng(0)
    z = rng.uniform(0.85, 0.95, (1, 256))
    eb = bounds.empirical_bernstein_lcb(z, ALPHA)[0]
    betting = bounds.betting_lcb(z, ALPHA)[0]
    assert 0.75 < eb < 0.9
    assert eb < betting < 0.9  # betting is tighter on low-variance samples
    # the empirical-Bernstein range term from docs/method.md ("The certificate"): 14 ln(2/alpha) / (3 (k - 1))
    constant = np.full((1, 100), 0.9)
    assert bounds.empirical_bernstein_lcb(constant, ALPHA)[0] == pytest.approx(0.9 - 14 * math.log(40) / (3 * 99))


def test_bernstein_formula():
    z = np.full((1, 50), 0.5)
    expected = 0.5 - math.sqrt(2 * 0.25 * math.log(20) / 50) - 2 * 2 * math.log(20) / (3 * 50)
    assert bounds.bernstein_lcb(z, ALPHA, variance_bound=0.25)[0] == pytest.approx(expected)


def test_betting_upper_and_lower_bracket_the_sample_mean():
    rng = np.random.default_rng(3)
    z = rng.uniform(-0.2, 0.6, (20, 64))
    lower, upper = bounds.betting_lcb(z, ALPHA), bounds.betting_ucb(z, ALPHA)
    assert np.all(lower < z.mean(axis=1)) and np.all(z.mean(axis=1) < upper)


def test_clopper_pearson_matches_beta_quantiles():
    low, high = bounds.clopper_pearson(8, 10, 0.05)
    assert low == pytest.approx(stats.beta.ppf(0.025, 8, 3))
    assert high == pytest.approx(stats.beta.ppf(0.975, 9, 2))
    assert bounds.clopper_pearson(0, 10) [0] == 0.0
    assert bounds.clopper_pearson(10, 10)[1] == 1.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bounds.empirical_bernstein_lcb(np.zeros((1, 1)), ALPHA), "at least 2 samples"),
        (lambda: bounds.empirical_bernstein_lcb(np.zeros((1, 5)), 1.5), "alpha"),
        (lambda: bounds.empirical_bernstein_lcb(np.full((1, 5), 1.5), ALPHA), "<= 1.0"),
        (lambda: bounds.bernstein_lcb(np.zeros((1, 5)), ALPHA, variance_bound=2.0), "variance_bound"),
        (lambda: bounds.lower_confidence_bound(np.zeros((1, 5)), ALPHA, "hoeffding"), "bound must be one of"),
        (lambda: bounds.clopper_pearson(11, 10), "successes"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(TabconsInputError, match=message):
        call()
