"""Bootstrap intervals, paired differences, the partial Spearman, matched certificate baselines, the objective."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.evaluation import intervals
from mlflow_tabcons.evaluation.measures import (
    assess_measures,
    ground_truth,
    matched_certificate_check,
    measure_quality,
    paired_difference,
    quality_with_intervals,
    top_rows,
)
from mlflow_tabcons.evaluation.objective import Objective, choose, goal_checks


def _ensemble(n=120, m=6, seed=0):
    """Members whose class-1 probabilities spread around a shared logit; the spread differs per row."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(0, 2, size=n)
    spread = rng.uniform(0.05, 1.5, size=n)
    p1 = 1 / (1 + np.exp(-(logit[None] + spread[None] * rng.normal(size=(m, n)))))
    return np.stack([1 - p1, p1], axis=2), spread


def test_vectorized_statistics_match_scipy_and_sklearn_per_row():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(3, 40)), rng.normal(size=(3, 40))
    x[0, :10] = 0.5  # ties
    event = rng.random((3, 40)) > 0.4
    for i in range(3):
        assert intervals.spearman_along(x, y)[i] == pytest.approx(stats.spearmanr(x[i], y[i]).statistic)
        assert intervals.auroc_along(x, event)[i] == pytest.approx(roc_auc_score(event[i], x[i]))
    assert math.isnan(intervals.spearman_along(np.ones(5), np.arange(5.0)))
    assert math.isnan(intervals.auroc_along(np.arange(4.0), np.ones(4, dtype=bool)))


def test_partial_spearman_vanishes_when_the_measure_is_only_the_confidence():
    rng = np.random.default_rng(2)
    confidence = rng.normal(size=4000)
    own = rng.normal(size=4000)
    truth = -confidence - own + rng.normal(size=4000)
    near_copy = confidence + 0.01 * rng.normal(size=4000)  # confidence on another scale, a little noise
    assert abs(intervals.partial_spearman_along(near_copy, truth, confidence)) < 0.05
    assert intervals.partial_spearman_along(confidence + own, truth, confidence) < -0.3  # carries something of its own
    assert math.isnan(intervals.partial_spearman_along(confidence**3, truth, confidence))  # the same ranking: undefined


def test_bootstrap_indices_start_with_the_rows_as_they_are_and_are_seeded():
    indices = intervals.bootstrap_indices(7, resamples=50, seed=3)
    assert indices.shape == (51, 7)
    np.testing.assert_array_equal(indices[0], np.arange(7))
    np.testing.assert_array_equal(indices, intervals.bootstrap_indices(7, resamples=50, seed=3))
    assert not np.array_equal(indices, intervals.bootstrap_indices(7, resamples=50, seed=4))
    assert intervals.interval(np.array([np.nan, np.nan])) != intervals.interval(np.arange(100.0))
    low, high = intervals.interval(np.arange(1001.0))
    assert (low, high) == pytest.approx((25.0, 975.0))


def test_intervals_cover_the_point_estimate_and_narrow_with_more_rows():
    members, _ = _ensemble(n=400)
    truth = ground_truth(members)
    confidence = members[0].max(axis=1)
    small = quality_with_intervals(confidence[:60], ground_truth(members[:, :60]), intervals.bootstrap_indices(60, 500))
    large = quality_with_intervals(confidence, truth, intervals.bootstrap_indices(400, 500))
    assert large["spearman_pr"] == pytest.approx(measure_quality(confidence, truth)["spearman_pr"])
    for result in (small, large):
        low, high = result["spearman_pr_ci"]
        assert low <= result["spearman_pr"] <= high
    width = lambda r: r["spearman_pr_ci"][1] - r["spearman_pr_ci"][0]  # noqa: E731
    assert width(large) < width(small)


def test_paired_difference_of_a_measure_with_itself_is_exactly_zero_and_detects_a_better_one():
    members, spread = _ensemble(n=300)
    truth = ground_truth(members)
    indices = intervals.bootstrap_indices(300, 400)
    confidence = members[0].max(axis=1)
    same = paired_difference(confidence, confidence, truth, indices)
    assert same["spearman_pr"] == 0 and same["spearman_pr_ci"] == [0.0, 0.0]
    oracle = -truth.range  # knows the truth
    better = paired_difference(oracle, confidence, truth, indices)
    assert better["spearman_pr_ci"][1] < 0 and better["auroc_agree"] > 0


def test_top_rows_takes_the_highest_and_breaks_ties_by_position():
    np.testing.assert_array_equal(top_rows(np.array([0.2, 0.9, 0.5, 0.9]), 2), [False, True, False, True])
    np.testing.assert_array_equal(top_rows(np.array([0.5, 0.5, 0.5]), 2), [True, True, False])
    assert not top_rows(np.array([0.1, 0.2]), 0).any()
    with pytest.raises(TabconsInputError, match="count must be between 0 and 2"):
        top_rows(np.array([0.1, 0.2]), 3)


def test_matched_check_compares_certified_rows_with_as_many_top_confidence_rows():
    # 3 members (reference + 2), 6 rows; agreement of the two others per row: 1, 1, 0.5, 0, 1, 0
    members = np.array([[0.9, 0.9, 0.8, 0.7, 0.6, 0.95], [0.9, 0.8, 0.8, 0.2, 0.7, 0.1], [0.8, 0.9, 0.3, 0.3, 0.9, 0.2]])
    truth = ground_truth(np.stack([1 - members, members], axis=2))
    np.testing.assert_allclose(truth.agreement, [1, 1, 0.5, 0, 1, 0])
    certified = np.array([True, True, False, False, True, False])
    confidence = members[0]  # top 3: rows 5 (0.95), 0, 1 (ties broken by position)
    out = matched_certificate_check(certified, truth, {"confidence": confidence}, intervals.bootstrap_indices(6, 300))
    assert out["certified_rows"] == 3
    assert out["certified_agreement"] == pytest.approx(1.0)
    assert out["certified_agreement_matched_confidence"] == pytest.approx(2 / 3)
    assert out["certified_minus_matched_confidence"] == pytest.approx(1 / 3)
    assert out["certified_overlap_matched_confidence"] == pytest.approx(2 / 3)
    low, high = out["certified_agreement_matched_confidence_ci"]
    assert low <= 2 / 3 <= high
    none = matched_certificate_check(np.zeros(6, dtype=bool), truth, {"confidence": confidence}, intervals.bootstrap_indices(6, 50))
    assert math.isnan(none["certified_agreement"]) and math.isnan(none["certified_overlap_matched_confidence"])


def test_assess_measures_needs_consistency_and_confidence():
    members, _ = _ensemble(n=50)
    with pytest.raises(TabconsInputError, match=r"measures lacks \['confidence'\]"):
        assess_measures({"consistency": np.zeros(50)}, ground_truth(members), np.zeros(50, dtype=bool))


def test_the_spearman_of_s_with_the_confidence_comes_with_an_interval_that_narrows_with_more_rows():
    widths = []
    for n in (60, 600):
        members, _ = _ensemble(n=n)
        rng = np.random.default_rng(2)
        confidence = members[0].max(axis=1)
        consistency = confidence + rng.normal(0, 0.05, size=n)  # S restating the confidence, with noise
        out = assess_measures({"consistency": consistency, "confidence": confidence}, ground_truth(members),
                              np.zeros(n, dtype=bool), resamples=400)
        rho, (low, high) = out["spearman_consistency_confidence"], out["spearman_consistency_confidence_ci"]
        assert rho == pytest.approx(stats.spearmanr(consistency, confidence).statistic)
        assert low < rho < high <= 1.0
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def _candidate(difference, certified, agree, matched, high=None):
    return {"comparisons": {"consistency_minus_confidence": {"spearman_pr": difference,
                                                             "spearman_pr_ci": [difference - 0.05, difference + 0.05 if high is None else high]}},
            "certified_fraction": certified, "certified_agreement": agree, "certified_agreement_matched_confidence": matched,
            "certified_overlap_matched_confidence": 0.7}


def test_objective_prefers_the_best_ranking_among_eligible_candidates():
    candidates = [
        _candidate(-0.01, 0.60, 0.99, 0.99),   # eligible, S is confidence
        _candidate(-0.15, 0.40, 0.97, 0.96),   # eligible, ranks better
        _candidate(-0.30, 0.10, 0.99, 0.98),   # ranks best but certifies too few
        _candidate(-0.25, 0.50, 0.90, 0.95),   # certified rows agree less than the matched ones
    ]
    index, reason = choose(candidates)
    assert index == 1 and reason.startswith("met the constraints")
    assert choose(candidates, Objective(min_certified=0.05))[0] == 2


def test_objective_says_so_when_nothing_meets_the_constraints():
    index, reason = choose([_candidate(-0.2, 0.1, 0.9, 0.95), _candidate(-0.1, 0.2, 0.99, 0.95), _candidate(-0.05, 0.0, None, None)])
    assert index == 1 and reason.startswith("NO candidate")
    index, reason = choose([_candidate(-0.2, 0.1, 0.9, 0.95), _candidate(-0.3, 0.0, None, None)])
    assert index == 1 and reason.startswith("NO candidate")
    with pytest.raises(TabconsInputError, match="no calibration candidates"):
        choose([])


def test_goal_checks_each_part():
    met = goal_checks(_candidate(-0.15, 0.4, 0.97, 0.96, high=-0.02))
    assert met["all"]
    assert not goal_checks(_candidate(-0.15, 0.4, 0.97, 0.96, high=0.01))["difference_interval_below_0"]
    assert not goal_checks(_candidate(-0.05, 0.4, 0.97, 0.96, high=-0.01))["difference_at_most_-0.10"]
    assert not goal_checks(_candidate(-0.15, 0.2, 0.97, 0.96, high=-0.02))["all"]
    overlapping = {**_candidate(-0.15, 0.4, 0.97, 0.96, high=-0.02), "certified_overlap_matched_confidence": 0.95}
    assert not goal_checks(overlapping)["overlap_with_top_confidence_at_most_80%"]
