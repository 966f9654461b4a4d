import numpy as np
import pytest

from mlflow_tabcons.metrics import multiplicity as mp
from mlflow_tabcons.errors import TabconsInputError

# 3 models x 4 rows, computed by hand below.
LABELS = np.array([[0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]])
PROBS = np.array([[0.1, 0.9, 0.8, 0.4], [0.2, 0.7, 0.3, 0.6], [0.3, 0.4, 0.9, 0.8]])


def test_arbitrariness_counts_rows_with_any_disagreement():
    assert mp.arbitrariness(LABELS) == pytest.approx(3 / 4)
    np.testing.assert_array_equal(mp.disagreement_mask(LABELS), [False, True, True, True])


def test_pairwise_disagreement_by_hand():
    # row 0: all agree -> 0; rows 1-3: two agree, one differs -> 2 of 3 pairs disagree
    np.testing.assert_allclose(mp.pairwise_disagreement(LABELS), [0, 2 / 3, 2 / 3, 2 / 3])
    # four models split 2/2: 4 of 6 pairs disagree
    np.testing.assert_allclose(mp.pairwise_disagreement(np.array([[0], [0], [1], [1]])), [4 / 6])
    # three classes, all different: every pair disagrees
    np.testing.assert_allclose(mp.pairwise_disagreement(np.array([[0], [1], [2]])), [1.0])


def test_variance_and_range_by_hand():
    np.testing.assert_allclose(mp.prediction_range(PROBS), [0.2, 0.5, 0.6, 0.4])
    mean = PROBS.mean(axis=0)
    np.testing.assert_allclose(mp.prediction_variance(PROBS), ((PROBS - mean) ** 2).mean(axis=0))
    assert mp.prediction_variance(PROBS)[0] == pytest.approx(((0.1 - 0.2) ** 2 + 0 + (0.3 - 0.2) ** 2) / 3)


def test_discrepancy_churn_and_agreement():
    # model 1 differs from model 0 on rows 2, 3; model 2 on rows 1, 3 -> max share 2/4
    assert mp.discrepancy(LABELS, reference=0) == pytest.approx(0.5)
    assert mp.churn(LABELS[0], LABELS[1]) == pytest.approx(0.5)
    np.testing.assert_allclose(mp.agreement_with_reference(LABELS, 0), [1.0, 0.5, 0.5, 0.0])


def test_class_probabilities_picks_each_rows_class():
    probs = np.array([[[0.2, 0.8], [0.6, 0.4]], [[0.3, 0.7], [0.9, 0.1]]])
    np.testing.assert_allclose(mp.class_probabilities(probs, np.array([1, 0])), [[0.8, 0.6], [0.7, 0.9]])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mp.arbitrariness(np.array([[0, 1]])), "at least 2"),
        (lambda: mp.arbitrariness(np.array([0, 1])), "2 dimension"),
        (lambda: mp.arbitrariness(np.array([[0.5, 1], [0, 1]])), "integer"),
        (lambda: mp.prediction_range(np.array([[0.1, 1.2], [0.2, 0.3]])), "<= 1.0"),
        (lambda: mp.prediction_variance(np.array([[0.1, np.nan], [0.2, 0.3]])), "NaN"),
        (lambda: mp.churn(np.array([0, 1]), np.array([0, 1, 1])), "same length"),
        (lambda: mp.discrepancy(LABELS, reference=3), "reference"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(TabconsInputError, match=message) as error:
        call()
    assert error.value.get_http_status_code() == 400
    assert isinstance(error.value, ValueError)
