"""The `evaluate` job: train an ensemble, score its reference member, and test the score against the truth.

It reuses the `main` job (``run_training``: M members in child runs, S on the
reference member), adds the MC-dropout baseline, compares every measure with
the ensemble's real multiplicity, and logs the result into the same parent
run: metrics, ``tabcons/evaluation.json``, a markdown table and a figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from matplotlib.figure import Figure

from mlflow_tabcons.evaluation.baselines import dropout_measure, mc_dropout_probabilities
from mlflow_tabcons.errors import check_int
from mlflow_tabcons.evaluation.measures import (
    certified_agreement,
    ground_truth,
    json_ready,
    markdown_table,
    measure_quality,
    members_summary,
)
from mlflow_tabcons.tracking.config import TrainingConfig
from mlflow_tabcons.tracking.prepared import TrainingOutcome
from mlflow_tabcons.tracking.training_job import run_training
from mlflow_tabcons.tracking.plots import new_figure, scatter_with_rolling_mean

EVALUATION_ARTIFACT = "tabcons/evaluation.json"
MEASURE_LABELS = {
    "consistency": "consistency score S",
    "confidence": "confidence (predicted-class probability)",
    "dropout": "minus MC-dropout variance",
}


def measures_figure(measures: dict[str, np.ndarray], prediction_range: np.ndarray, title: str) -> Figure:
    """One panel per measure: the measure against the ensemble's prediction range, with a rolling mean."""
    figure, axes = new_figure(len(measures), width=4.2 * len(measures), height=3.8, sharey=True)
    for axis, (name, values) in zip(axes, measures.items()):
        scatter_with_rolling_mean(axis, values, prediction_range)
        axis.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))  # MC-dropout variances are ~1e-3
        axis.set_xlabel(MEASURE_LABELS.get(name, name))
    axes[0].set_ylabel("prediction range across members")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def evaluate_outcome(outcome: TrainingOutcome, *, dropout_passes: int = 20, dropout_seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The evaluation's numbers for a trained and scored ensemble, and the per-row measures."""
    scores, data, trainer = outcome.scores, outcome.data, outcome.trainer
    truth = ground_truth(outcome.member_probabilities)
    started = time.perf_counter()
    passes = mc_dropout_probabilities(
        outcome.members[0].classifier, data.evaluation.input_ids, passes=dropout_passes, seed=dropout_seed,
        prefix=outcome.eval_prefix, depth=trainer.depth, device=trainer.device,
    )
    seconds_dropout = time.perf_counter() - started
    measures = {
        "consistency": scores.consistency,
        "confidence": scores.confidence,
        "dropout": dropout_measure(passes, scores.predicted),
    }
    settings = scores.settings
    fraction, low, high = scores.certified_fraction()
    result: dict[str, Any] = {
        "dataset": data.dataset.name,
        "shots": len(data.train),
        "seeds": len(outcome.members),
        "epochs": trainer.settings.epochs,
        "k": settings.k,
        "sigma": settings.sigma,
        "sigma_mode": settings.sigma_mode,
        "alpha": settings.alpha,
        "bound": settings.bound,
        "classes": len(data.dataset.labels),
        "n_eval": len(data.evaluation),
        **members_summary(data.evaluation.labels, outcome.member_probabilities),
        "arbitrariness": outcome.metrics["arbitrariness"],
        "mean_prediction_range": outcome.metrics["mean_prediction_range"],
        "measures": {name: measure_quality(values, truth) for name, values in measures.items()},
        "certified_fraction": fraction,
        "certified_fraction_interval": [low, high],
        "certified_rows": int(scores.certified.sum()),
        "certified_agreement": certified_agreement(scores.certified, truth.agreement),
        "dropout_passes": dropout_passes,
        "seconds_train": outcome.metrics["seconds_train"],
        "seconds_score": outcome.metrics["seconds_score"],
        "seconds_dropout": seconds_dropout,
        "parent_run_id": outcome.parent_run_id,
    }
    return result, {**measures, "prediction_range": truth.range}


def _flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    metrics = {f"eval_{name}_{key}": value for name, quality in result["measures"].items() for key, value in quality.items()}
    metrics.update(certified_agreement=result["certified_agreement"], seconds_dropout=result["seconds_dropout"])
    return {key: float(value) for key, value in metrics.items() if np.isfinite(value)}


def run_evaluation(config: TrainingConfig, *, dropout_passes: int = 20, out: str | Path | None = None) -> dict[str, Any]:
    """Train, score and evaluate; log everything into the ensemble's parent run; optionally write the JSON."""
    check_int("dropout_passes", dropout_passes, minimum=2)
    outcome = run_training(config)
    result, per_row = evaluate_outcome(outcome, dropout_passes=dropout_passes, dropout_seed=config.scorer.seed)
    title = f"{result['dataset']}, {result['shots']} shots, {result['seeds']} members"
    measures = {name: per_row[name] for name in MEASURE_LABELS}
    with mlflow.start_run(run_id=outcome.parent_run_id):
        mlflow.set_tag("tabcons.evaluation", "true")
        mlflow.log_metrics(_flat_metrics(result))
        mlflow.log_dict(json_ready(result), EVALUATION_ARTIFACT)
        mlflow.log_text(markdown_table([result]), "tabcons/evaluation.md")
        mlflow.log_figure(measures_figure(measures, per_row["prediction_range"], title), "tabcons/measures_vs_range.png")
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_ready(result), indent=2, allow_nan=False) + "\n")
    return result
