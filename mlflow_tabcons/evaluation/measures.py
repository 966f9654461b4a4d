"""Does a per-row measure predict real multiplicity? (docs/method.md, "Evaluation protocol").

Pure functions, validated inputs. A *measure* gives one number per row where
high means "this prediction is stable" (the consistency score S, the
reference's confidence, minus the MC-dropout variance). The ground truth comes
from a seed ensemble, relative to the reference member's predicted class:
prediction variance and range of that class's probability across members, and
whether every member predicts that class. A measure that works correlates
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

from mlflow_tabcons.metrics import multiplicity
from mlflow_tabcons.errors import TabconsInputError, check_array, check_int
from mlflow_tabcons.metrics.classification import classification_scores, majority_rate

MEASURE_KEYS = ("spearman_pv", "spearman_pr", "auroc_agree")


@dataclass(frozen=True)
class GroundTruth:
    """Per-row multiplicity across the ensemble, relative to the reference member's class."""

    reference_class: np.ndarray  # (n,) the reference member's predicted class
    class_probabilities: np.ndarray  # (m, n) every member's probability of that class
    variance: np.ndarray  # (n,) prediction variance
    range: np.ndarray  # (n,) prediction range
    agreement: np.ndarray  # (n,) share of the other m-1 members predicting the reference's class
    all_agree: np.ndarray  # (n,) every member predicts the reference's class

    def __len__(self) -> int:
        return len(self.reference_class)


def ground_truth(member_probabilities: np.ndarray, reference: int = 0) -> GroundTruth:
    """Multiplicity per row from members' class probabilities (m, n, C); member ``reference`` is the reference."""
    probabilities = check_array("member_probabilities", member_probabilities, ndim=3, low=0.0, high=1.0, min_shape=(2, 1, 2))
    reference = check_int("reference", reference, minimum=0, maximum=probabilities.shape[0] - 1)
    labels = probabilities.argmax(axis=2)
    reference_class = labels[reference]
    chosen = multiplicity.class_probabilities(probabilities, reference_class)
    agreement = multiplicity.agreement_with_reference(labels, reference)
    return GroundTruth(
        reference_class=reference_class,
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


def markdown_table(results: Sequence[Mapping[str, Any]], measures: Sequence[str] = ("consistency", "confidence", "dropout")) -> str:
    """One table row per evaluation result; a row whose members do not beat the majority class is marked."""
    header = ["dataset", "shots", "M", "sigma", "k", "acc", "bal. acc", "AUROC", "majority", "arbitr."]
    for name in measures:
        header += [f"{name} rho(PR)", f"{name} AUROC"]
    header += ["certified", "cert. agreement (>= 1-alpha?)", "evidence"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [
            result["dataset"], result["shots"], result["seeds"], f"{result['sigma']:g} {result.get('sigma_mode', '')}".strip(),
            result["k"], _cell(result["accuracy_mean"]), _cell(result["balanced_accuracy_mean"]), _cell(result.get("auroc_mean")),
            _cell(result["majority_rate"]), _cell(result["arbitrariness"]),
        ]
        for name in measures:
            quality = result["measures"][name]
            cells += [_cell(quality["spearman_pr"]), _cell(quality["auroc_agree"])]
        agreement = result["certified_agreement"]
        missing = agreement is None or math.isnan(agreement)
        verdict = "no certified rows" if missing else ("yes" if agreement >= 1 - result["alpha"] else "NO")
        cells += [_cell(result["certified_fraction"]), f"{_cell(agreement)} ({verdict})",
                  _evidence(result)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
