"""The stated test that members beat the majority class (exact McNemar, at least half the members)."""

import numpy as np
import pytest
from scipy.stats import binom

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.metrics.classification import mcnemar_vs_majority, members_learned, passes_majority_test


def _one_hot(predicted: np.ndarray) -> np.ndarray:
    return np.eye(2)[predicted]


def test_the_majority_guess_itself_has_p_value_one():
    labels = np.array([0] * 70 + [1] * 30)
    assert mcnemar_vs_majority(labels, np.zeros(100, dtype=np.int64)) == 1.0


def test_p_value_is_the_binomial_tail_of_the_discordant_rows():
    labels = np.array([0] * 70 + [1] * 30)
    predicted = np.zeros(100, dtype=np.int64)
    predicted[70:90] = 1  # 20 minority rows right
    predicted[:5] = 1  # 5 majority rows wrong
    assert mcnemar_vs_majority(labels, predicted) == pytest.approx(binom.sf(19, 25, 0.5))
    assert mcnemar_vs_majority(labels, predicted) < 0.01


def test_a_model_worse_than_the_majority_class_does_not_pass():
    labels = np.array([0] * 60 + [1] * 40)
    predicted = np.ones(100, dtype=np.int64)  # always the minority class
    assert mcnemar_vs_majority(labels, predicted) > 0.95


def test_half_of_the_members_must_pass_at_half_alpha():
    labels = np.array([0] * 70 + [1] * 30)
    good = np.zeros(100, dtype=np.int64)
    good[70:95] = 1  # 25 minority rows right, none wrong: p = 2**-25
    noise = np.zeros(100, dtype=np.int64)
    noise[::10] = 1  # right and wrong about as often as the majority guess
    learned, p_values = members_learned(labels, np.stack([_one_hot(good), _one_hot(noise)]))
    assert learned and p_values[0] < 1e-6 and p_values[1] > 0.5
    learned, _ = members_learned(labels, np.stack([_one_hot(good), _one_hot(noise), _one_hot(noise)]))
    assert not learned


def test_one_model_passes_by_the_test_not_by_a_point_above_the_majority_rate():
    labels = np.array([0] * 70 + [1] * 30)
    one_row_better = np.zeros(100, dtype=np.int64)
    one_row_better[70] = 1  # accuracy 0.71 against a majority rate of 0.70
    assert not passes_majority_test(labels, one_row_better)
    clearly_better = np.zeros(100, dtype=np.int64)
    clearly_better[70:85] = 1  # 15 minority rows right, none wrong: p = 2**-15
    assert passes_majority_test(labels, clearly_better)


def test_level_holds_for_members_that_learned_nothing():
    """Members guessing at random (independently of the labels) pass in at most alpha of the draws."""
    rng = np.random.default_rng(0)
    passed = 0
    for _ in range(400):
        labels = (rng.random(100) < 0.35).astype(np.int64)
        members = np.stack([_one_hot((rng.random(100) < 0.3).astype(np.int64)) for _ in range(4)])
        passed += members_learned(labels, members, alpha=0.05)[0]
    assert passed / 400 <= 0.05


def test_bad_input_is_named():
    with pytest.raises(TabconsInputError, match="predictions"):
        mcnemar_vs_majority(np.zeros(3, dtype=np.int64), np.zeros(4, dtype=np.int64))
    with pytest.raises(TabconsInputError, match="alpha"):
        members_learned(np.zeros(3, dtype=np.int64), np.full((2, 3, 2), 0.5), alpha=0.0)


def test_the_cli_says_whether_a_classical_baseline_passes_the_same_test():
    from mlflow_tabcons.cli.train import baselines_on_the_test

    neither = baselines_on_the_test({"baseline_logistic_majority_pvalue": 0.048, "baseline_boosting_majority_pvalue": 0.144})
    assert neither.startswith("neither classical baseline passes") and "logistic regression p = 0.048" in neither
    one = baselines_on_the_test({"baseline_logistic_majority_pvalue": 0.3, "baseline_boosting_majority_pvalue": 0.014})
    assert one.startswith("a classical baseline passes") and "gradient boosting p = 0.014" in one and "level 0.025" in one
