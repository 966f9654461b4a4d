"""Does a per-row measure predict real multiplicity? (docs/evaluation.md, "Protocol").

Pure functions, validated inputs. A *measure* gives one number per row where
high means "this prediction is stable" (the consistency score S, the
reference's confidence, minus the MC-dropout variance). The ground truth comes
from the seed ensemble's *other* members, relative to the reference member's
predicted class: the variance and range of their probabilities of that class,
and whether all of them predict it. The reference's own probability is no part
of the truth; otherwise confidence, and any score built from it, would
correlate with the truth by construction. A measure that works correlates
negatively with variance and range and has an AUROC above 0.5 for "all agree".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from mlflow_tabcons.errors import TabconsInputError, check_array, check_int
from mlflow_tabcons.evaluation import intervals
from mlflow_tabcons.metrics import multiplicity
from mlflow_tabcons.metrics.classification import classification_scores, majority_rate

MEASURE_KEYS = ("spearman_pv", "spearman_pr", "auroc_agree")


@dataclass(frozen=True)
class GroundTruth:
    """Per-row multiplicity among the M-1 non-reference members, relative to the reference's class."""

    reference_class: np.ndarray  # (n,) the reference's predicted class (from the scorer's forward path)
    class_probabilities: np.ndarray  # (m-1, n) the other members' probabilities of that class
    variance: np.ndarray  # (n,) their prediction variance
    range: np.ndarray  # (n,) their prediction range
    agreement: np.ndarray  # (n,) share of them predicting the reference's class
    all_agree: np.ndarray  # (n,) all of them predict the reference's class

    def __len__(self) -> int:
        return len(self.reference_class)


def ground_truth(member_probabilities: np.ndarray, reference: int = 0, reference_class: np.ndarray | None = None) -> GroundTruth:
    """Multiplicity per row from members' class probabilities (m, n, C), member ``reference`` left out.

    ``reference_class`` is the class the measures are about (the scorer's
    prediction, so that truth and measures share one forward path); by default
    the argmax of the reference member's probabilities.
    """
    probabilities = check_array("member_probabilities", member_probabilities, ndim=3, low=0.0, high=1.0, min_shape=(2, 1, 2))
    reference = check_int("reference", reference, minimum=0, maximum=probabilities.shape[0] - 1)
    if reference_class is None:
        reference_class = probabilities[reference].argmax(axis=1)
    others = np.delete(probabilities, reference, axis=0)
    chosen = multiplicity.class_probabilities(others, reference_class)
    agreement = np.mean(others.argmax(axis=2) == np.asarray(reference_class, dtype=np.int64)[None], axis=0)
    return GroundTruth(
        reference_class=np.asarray(reference_class, dtype=np.int64),
        class_probabilities=chosen,
        variance=multiplicity.prediction_variance(chosen),
        range=multiplicity.prediction_range(chosen),
        agreement=agreement,
        all_agree=agreement == 1.0,
    )


def _paired(measure: np.ndarray, other: np.ndarray, other_name: str) -> tuple[np.ndarray, np.ndarray]:
    measure = check_array("measure", measure, ndim=1, min_shape=(1,))
    other = check_array(other_name, other, ndim=1, min_shape=(1,))
    if measure.shape != other.shape:
        raise TabconsInputError(f"measure has {measure.size} rows but {other_name} has {other.size}")
    return measure, other


def spearman(measure: np.ndarray, target: np.ndarray) -> float:
    """Spearman rank correlation; NaN when either side is constant (no ranking to compare)."""
    measure, target = _paired(measure, target, "target")
    if measure.size < 2 or np.ptp(measure) == 0 or np.ptp(target) == 0:
        return float("nan")
    return float(stats.spearmanr(measure, target).statistic)


def agreement_auroc(measure: np.ndarray, all_agree: np.ndarray) -> float:
    """AUROC of the measure for "all members agree"; NaN when every row is on one side."""
    measure, event = _paired(measure, all_agree, "all_agree")
    if not np.isin(event, (0.0, 1.0)).all():
        raise TabconsInputError("all_agree must be true/false per row")
    if event.min() == event.max():
        return float("nan")
    return float(roc_auc_score(event.astype(bool), measure))


def measure_quality(measure: np.ndarray, truth: GroundTruth) -> dict[str, float]:
    """How well one measure predicts the ground truth: the three numbers of the paper's table."""
    return {
        "spearman_pv": spearman(measure, truth.variance),
        "spearman_pr": spearman(measure, truth.range),
        "auroc_agree": agreement_auroc(measure, truth.all_agree),
    }


def certified_agreement(certified: np.ndarray, agreement: np.ndarray) -> float:
    """Mean share of the other members that agree with the reference, over certified rows (NaN if none)."""
    certified, agreement = _paired(certified, agreement, "agreement")
    if not np.isin(certified, (0.0, 1.0)).all():
        raise TabconsInputError("certified must be true/false per row")
    if agreement.min() < 0 or agreement.max() > 1:
        raise TabconsInputError("agreement must be a share in [0, 1] per row")
    chosen = certified.astype(bool)
    return float(agreement[chosen].mean()) if chosen.any() else float("nan")


def _statistics(measure: np.ndarray, truth: GroundTruth, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The three numbers of the paper's table on every bootstrap resample (row 0: the rows as they are)."""
    if len(measure) != len(truth):
        raise TabconsInputError(f"measure has {len(measure)} rows but the truth has {len(truth)}")
    values = intervals.resampled(measure, indices)
    return {
        "spearman_pv": intervals.spearman_along(values, intervals.resampled(truth.variance, indices)),
        "spearman_pr": intervals.spearman_along(values, intervals.resampled(truth.range, indices)),
        "auroc_agree": intervals.auroc_along(values, intervals.resampled(truth.all_agree.astype(float), indices) > 0.5),
    }


def _estimate(samples: np.ndarray, key: str) -> dict[str, Any]:
    """The point estimate (resample 0) and the 95% percentile interval of the others."""
    return {key: float(samples[0]), f"{key}_ci": intervals.interval(samples[1:])}


def quality_with_intervals(measure: np.ndarray, truth: GroundTruth, indices: np.ndarray) -> dict[str, Any]:
    """``measure_quality`` with a bootstrap interval per number (``indices`` from ``intervals.bootstrap_indices``)."""
    out: dict[str, Any] = {}
    for key, samples in _statistics(measure, truth, indices).items():
        out.update(_estimate(samples, key))
    return out


def paired_difference(measure: np.ndarray, baseline: np.ndarray, truth: GroundTruth, indices: np.ndarray) -> dict[str, Any]:
    """measure minus baseline for each number, with the paired bootstrap interval (same resampled rows for both).

    A better measure has a negative Spearman difference and a positive AUROC difference.
    """
    mine, theirs = _statistics(measure, truth, indices), _statistics(baseline, truth, indices)
    out: dict[str, Any] = {}
    for key in mine:
        out.update(_estimate(mine[key] - theirs[key], key))
    return out


def partial_spearman(measure: np.ndarray, truth: GroundTruth, given: np.ndarray, indices: np.ndarray) -> dict[str, Any]:
    """Spearman of the measure with the prediction range, ``given`` (the confidence) partialled out, with its interval.

    Near zero: the measure says nothing about the truth that ``given`` does not already say.
    """
    samples = intervals.partial_spearman_along(
        intervals.resampled(measure, indices), intervals.resampled(truth.range, indices), intervals.resampled(given, indices)
    )
    return _estimate(samples, "partial_spearman_pr")


def top_rows(measure: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the ``count`` rows with the highest measure (ties: the earlier row first)."""
    measure = check_array("measure", measure, ndim=1, min_shape=(1,))
    count = check_int("count", count, minimum=0, maximum=measure.size)
    chosen = np.zeros(measure.size, dtype=bool)
    chosen[np.argsort(-measure, kind="stable")[:count]] = True
    return chosen


def matched_certificate_check(
    certified: np.ndarray, truth: GroundTruth, baselines: Mapping[str, np.ndarray], indices: np.ndarray
) -> dict[str, Any]:
    """Do certified rows agree more often than the same number of rows a baseline trusts most?

    With n rows certified, each baseline's set is its n highest rows. Reported
    per set: the mean share of the other members agreeing with the reference
    (bootstrap interval over rows), and how much of it is the certified set.
    """
    certified = check_array("certified", certified, ndim=1, min_shape=(1,)).astype(bool)
    if certified.size != len(truth):
        raise TabconsInputError(f"certified has {certified.size} rows but the truth has {len(truth)}")
    count = int(certified.sum())
    mine = intervals.subset_mean(truth.agreement, certified, indices)
    out: dict[str, Any] = {"certified_rows": count, **_renamed(_estimate(mine, "agreement"), "certified_agreement")}
    for name, measure in baselines.items():
        chosen = top_rows(measure, count)
        theirs = intervals.subset_mean(truth.agreement, chosen, indices)
        out.update(_renamed(_estimate(theirs, "agreement"), f"certified_agreement_matched_{name}"))
        out.update(_renamed(_estimate(mine - theirs, "agreement"), f"certified_minus_matched_{name}"))
        out[f"certified_overlap_matched_{name}"] = float((chosen & certified).sum() / count) if count else float("nan")
    return out


def _renamed(estimate: dict[str, Any], key: str) -> dict[str, Any]:
    return {key: estimate["agreement"], f"{key}_ci": estimate["agreement_ci"]}


def assess_measures(
    measures: Mapping[str, np.ndarray],
    truth: GroundTruth,
    certified: np.ndarray,
    *,
    resamples: int = intervals.DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Every number of the evaluation for measures named ``consistency``, ``confidence`` (and more baselines).

    - ``measures``: each measure's Spearman with PV and PR and AUROC for "all others agree", with intervals;
    - ``comparisons``: ``consistency_minus_<baseline>`` with paired intervals;
    - ``partial_spearman_pr`` of S given confidence, and ``spearman_consistency_confidence`` (with its interval);
    - the certificate against the matched baseline sets (``matched_certificate_check``).
    """
    missing = [name for name in ("consistency", "confidence") if name not in measures]
    if missing:
        raise TabconsInputError(f"measures lacks {missing}")
    indices = intervals.bootstrap_indices(len(truth), resamples, seed)
    consistency = np.asarray(measures["consistency"], dtype=float)
    baselines = {name: np.asarray(values, dtype=float) for name, values in measures.items() if name != "consistency"}
    partial = partial_spearman(consistency, truth, baselines["confidence"], indices)
    # how much S only restates the confidence; with its interval, since a few hundred rows leave it uncertain
    redundancy = _estimate(intervals.spearman_along(
        intervals.resampled(consistency, indices), intervals.resampled(baselines["confidence"], indices)), "rho")
    return {
        "measures": {name: quality_with_intervals(np.asarray(values, dtype=float), truth, indices) for name, values in measures.items()},
        "comparisons": {f"consistency_minus_{name}": paired_difference(consistency, values, truth, indices) for name, values in baselines.items()},
        "partial_spearman_pr_given_confidence": partial["partial_spearman_pr"],
        "partial_spearman_pr_given_confidence_ci": partial["partial_spearman_pr_ci"],
        "spearman_consistency_confidence": redundancy["rho"],
        "spearman_consistency_confidence_ci": redundancy["rho_ci"],
        **matched_certificate_check(certified, truth, baselines, indices),
        "bootstrap_resamples": resamples,
    }


# How far above chance (1/C) the members' mean balanced accuracy must be to count as "learned something".
CHANCE_MARGIN = 0.05


def members_summary(labels: np.ndarray, member_probabilities: np.ndarray) -> dict[str, float]:
    """Members' accuracy and balanced accuracy against the majority-class rate.

    ``beats_majority``: the members' mean accuracy exceeds the majority rate;
    otherwise their disagreements are no evidence about multiplicity.
    ``above_chance``: their mean balanced accuracy exceeds 1/C by
    ``CHANCE_MARGIN`` (class-balanced members can learn without beating the
    majority rate on accuracy): weak evidence at best.
    """
    probabilities = check_array("member_probabilities", member_probabilities, ndim=3, low=0.0, high=1.0, min_shape=(1, 1, 2))
    scores = [classification_scores(labels, p) for p in probabilities]
    accuracy = np.array([s["accuracy"] for s in scores])
    balanced = np.array([s["balanced_accuracy"] for s in scores])
    ranking = np.array([s["auroc"] for s in scores])
    baseline = majority_rate(labels)
    return {
        "accuracy_mean": float(accuracy.mean()),
        "accuracy_min": float(accuracy.min()),
        "accuracy_max": float(accuracy.max()),
        "balanced_accuracy_mean": float(balanced.mean()),
        "auroc_mean": float(np.nanmean(ranking)) if np.isfinite(ranking).any() else float("nan"),
        "majority_rate": baseline,
        "members_beating_majority": int((accuracy > baseline).sum()),
        "beats_majority": bool(accuracy.mean() > baseline),
        "above_chance": bool(balanced.mean() > 1.0 / probabilities.shape[2] + CHANCE_MARGIN),
    }


def json_ready(value: Any) -> Any:
    """The result with NaN as null (strict JSON) and numpy scalars as Python numbers."""
    if isinstance(value, Mapping):
        return {key: json_ready(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(inner) for inner in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cell(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _with_ci(result: Mapping[str, Any], key: str, digits: int = 2) -> str:
    """``value [low, high]`` for a key that has a ``key_ci`` next to it."""
    low, high = result.get(f"{key}_ci") or (None, None)
    return f"{_cell(result.get(key), digits)} [{_cell(low, digits)}, {_cell(high, digits)}]"


def _evidence(result: Mapping[str, Any]) -> str:
    """Members that learned (accuracy above the majority rate and balanced accuracy above chance) make a row evidence."""
    beats, above = result["beats_majority"], result.get("above_chance", False)
    if beats and above:
        return "yes"
    if above:
        return "**weak: balanced accuracy above chance, accuracy below the majority rate**"
    if beats:
        return "**weak: accuracy above the majority rate, balanced accuracy at chance**"
    return "**none: members do not beat the majority class**"


TABLE_HEADER = (
    "dataset", "shots", "M", "rows", "site", "noise", "sigma", "k", "bound", "tau", "acc / majority",
    "rho(S,PR)", "rho(conf,PR)", "rho(drop,PR)", "S-conf rho(PR)", "S-drop rho(PR)",
    "AUROC S", "AUROC conf", "S-conf AUROC", "partial rho(S,PR given conf)", "rho(S,conf)",
    "certified", "agree: certified", "agree: matched conf", "agree: matched dropout", "same rows as top conf", "evidence",
)


def markdown_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One table row per evaluation result, every estimate with its 95% interval; rows without evidence marked."""
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    for result in results:
        quality, comparisons = result["measures"], result["comparisons"]
        dropout = quality.get("dropout", {})
        fraction_low, fraction_high = result["certified_fraction_interval"]
        cells = [
            result["dataset"], result["shots"], result["seeds"], result["n_eval"], result.get("perturb", "embeddings"),
            result.get("noise", "sphere"), f"{result['sigma']:g}{'' if result.get('sigma_mode') == 'relative' else ' abs'}",
            result["k"], result.get("bound", "empirical-bernstein"), f"{result.get('tau', 0.5):g}",
            f"{_cell(result['accuracy_mean'])} / {_cell(result['majority_rate'])}",
            _with_ci(quality["consistency"], "spearman_pr"), _with_ci(quality["confidence"], "spearman_pr"),
            _with_ci(dropout, "spearman_pr") if dropout else "n/a",
            _with_ci(comparisons["consistency_minus_confidence"], "spearman_pr"),
            _with_ci(comparisons["consistency_minus_dropout"], "spearman_pr") if "consistency_minus_dropout" in comparisons else "n/a",
            _with_ci(quality["consistency"], "auroc_agree"), _with_ci(quality["confidence"], "auroc_agree"),
            _with_ci(comparisons["consistency_minus_confidence"], "auroc_agree"),
            _with_ci(result, "partial_spearman_pr_given_confidence"), _with_ci(result, "spearman_consistency_confidence"),
            f"{_cell(result['certified_fraction'])} [{_cell(fraction_low)}, {_cell(fraction_high)}]",
            _with_ci(result, "certified_agreement", 3), _with_ci(result, "certified_agreement_matched_confidence", 3),
            _with_ci(result, "certified_agreement_matched_dropout", 3) if "certified_agreement_matched_dropout" in result else "n/a",
            _cell(result.get("certified_overlap_matched_confidence")), _evidence(result),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
