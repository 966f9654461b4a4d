"""Which neighbourhood to use, and did it work? The calibration objective and the goal (docs/evaluation.md).

Pure functions over evaluation results (the dictionaries ``assess_measures``
returns, plus ``certified_fraction``). A neighbourhood is worth using only if
its certificate picks rows that agree with other fine-tuned models at least as
often as the same number of most-confident rows do, and if S ranks real
multiplicity better than confidence does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlflow_tabcons.errors import TabconsInputError, check_float


@dataclass(frozen=True)
class Objective:
    """The stated objective of ``tabcons calibrate``.

    A candidate (site, noise, sigma) is *eligible* when at least
    ``min_certified`` of the rows are certified and the certified rows agree
    with the other members at least as often as the matched most-confident
    rows. Among eligible candidates the most negative paired difference
    rho(S, PR) - rho(confidence, PR) wins, then the larger certified fraction.
    With no eligible candidate, the one certifying most rows among those whose
    certified rows agree as often as the matched ones wins; failing that, the
    most negative difference. Either way the result says the constraints were not met.
    """

    min_certified: float = 0.30

    def __post_init__(self) -> None:
        check_float("min_certified", self.min_certified, low=0.0, high=1.0)


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _difference(result: Mapping[str, Any]) -> float:
    return _number(result["comparisons"]["consistency_minus_confidence"]["spearman_pr"])


def agrees_as_often_as_matched(result: Mapping[str, Any]) -> bool:
    """Certified rows agree at least as often as the matched most-confident rows (point estimates; False if none certified)."""
    mine, theirs = _number(result["certified_agreement"]), _number(result["certified_agreement_matched_confidence"])
    return not math.isnan(mine) and not math.isnan(theirs) and mine >= theirs


def eligible(result: Mapping[str, Any], objective: Objective = Objective()) -> bool:
    return _number(result["certified_fraction"]) >= objective.min_certified and agrees_as_often_as_matched(result)


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def choose(candidates: Sequence[Mapping[str, Any]], objective: Objective = Objective()) -> tuple[int, str]:
    """The index of the chosen candidate and why it was chosen."""
    if not candidates:
        raise TabconsInputError("nothing to choose from: no calibration candidates")
    indexed = list(enumerate(candidates))
    passing = [(i, c) for i, c in indexed if eligible(c, objective)]
    if passing:
        i, _ = min(passing, key=lambda pair: (_nan_last(_difference(pair[1])), -_number(pair[1]["certified_fraction"])))
        return i, (f"met the constraints (>= {objective.min_certified:.0%} certified, certified agreement >= matched "
                   "confidence agreement); most negative rho(S,PR) - rho(confidence,PR) among those")
    agreeing = [(i, c) for i, c in indexed if agrees_as_often_as_matched(c)]
    if agreeing:
        i, _ = max(agreeing, key=lambda pair: (_number(pair[1]["certified_fraction"]), -_nan_last(_difference(pair[1]))))
        return i, (f"NO candidate met the constraints: none certified >= {objective.min_certified:.0%} of rows with "
                   "certified agreement >= matched confidence agreement; chose the most certified among those that agree as often")
    i, _ = min(indexed, key=lambda pair: _nan_last(_difference(pair[1])))
    return i, ("NO candidate met the constraints and no candidate's certified rows agreed as often as the matched "
               "confidence rows; chose the most negative rho(S,PR) - rho(confidence,PR)")


# The goal a neighbourhood must reach to be a signal confidence does not give (docs/evaluation.md).
GOAL_DIFFERENCE = -0.10
GOAL_CERTIFIED = 0.30
GOAL_OVERLAP = 0.80


def goal_checks(result: Mapping[str, Any]) -> dict[str, bool]:
    """Each part of the goal for one evaluation result, and ``all``."""
    comparison = result["comparisons"]["consistency_minus_confidence"]
    high = _number((comparison.get("spearman_pr_ci") or [None, None])[1])
    overlap = _number(result.get("certified_overlap_matched_confidence"))
    checks = {
        "difference_at_most_-0.10": _number(comparison["spearman_pr"]) <= GOAL_DIFFERENCE,
        "difference_interval_below_0": not math.isnan(high) and high < 0,
        "certified_at_least_30%": _number(result["certified_fraction"]) >= GOAL_CERTIFIED,
        "overlap_with_top_confidence_at_most_80%": not math.isnan(overlap) and overlap <= GOAL_OVERLAP,
        "certified_agree_as_often_as_matched": agrees_as_often_as_matched(result),
    }
    checks["all"] = all(checks.values())
    return checks
