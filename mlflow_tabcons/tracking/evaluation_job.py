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
from mlflow_tabcons.errors import TabconsInputError, check_int
from mlflow_tabcons.evaluation.intervals import DEFAULT_RESAMPLES
from mlflow_tabcons.evaluation.measures import assess_measures, ground_truth, json_ready, markdown_table, members_summary
from mlflow_tabcons.scoring.consistency import ConsistencyScorer, ConsistencyScores, ScorerSettings
from mlflow_tabcons.tracking.config import TrainingConfig
from mlflow_tabcons.tracking.prepared import TrainingOutcome
from mlflow_tabcons.tracking.training_job import reference_backend, run_training
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
    axes[0].set_ylabel("prediction range, other members")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def reference_dropout(outcome: TrainingOutcome, *, passes: int = 20, seed: int = 0) -> tuple[np.ndarray, float]:
    """The MC-dropout passes (passes, n, C) of the reference member on the evaluation rows, and their wall time."""
    trainer = outcome.trainer
    started = time.perf_counter()
    probabilities = mc_dropout_probabilities(
        outcome.members[0].classifier, outcome.data.evaluation.input_ids, passes=passes, seed=seed,
        prefix=outcome.eval_prefix, depth=trainer.depth, device=trainer.device,
    )
    return probabilities, time.perf_counter() - started


def rescore(outcome: TrainingOutcome, settings: ScorerSettings) -> tuple[ConsistencyScores, float]:
    """Score the reference member again under other settings (another site, width or noise), and the wall time.

    A sweep over the neighbourhood reuses one trained ensemble this way.
    """
    trainer, rows = outcome.trainer, outcome.data.evaluation
    scorer = ConsistencyScorer(reference_backend(outcome.members[0], trainer.settings, settings, trainer.device), settings)
    started = time.perf_counter()
    scores = scorer.score(rows.input_ids, value_masks=rows.value_masks)
    return scores, time.perf_counter() - started


def evaluate_scores(
    outcome: TrainingOutcome,
    scores: ConsistencyScores,
    dropout_probabilities: np.ndarray,
    *,
    seconds_score: float,
    seconds_dropout: float,
    resamples: int = DEFAULT_RESAMPLES,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The evaluation's numbers for one scoring of the reference member, and the per-row measures.

    Truth, confidence, S and the dropout measure all refer to the class the
    scorer predicted, from its own forward pass.
    """
    data, trainer = outcome.data, outcome.trainer
    truth = ground_truth(outcome.member_probabilities, reference_class=scores.predicted)
    measures = {
        "consistency": scores.consistency,
        "confidence": scores.confidence,
        "dropout": dropout_measure(dropout_probabilities, scores.predicted),
    }
    settings = scores.settings
    fraction, low, high = scores.certified_fraction()
    result: dict[str, Any] = {
        "dataset": data.dataset.name,
        "shots": len(data.train),
        "seeds": len(outcome.members),
        "epochs": trainer.settings.epochs,
        "schedule_epochs": trainer.settings.schedule_epochs or trainer.settings.epochs,
        "lora_layers": trainer.settings.lora.layers or "all",  # the members' own recipe, searched or fixed
        "learning_rate": trainer.settings.learning_rate,
        "head_learning_rate": trainer.settings.head_learning_rate,
        "k": settings.k,
        "sigma": settings.sigma,
        "sigma_mode": settings.sigma_mode,
        "perturb": settings.perturb,
        "noise": settings.noise,
        "alpha": settings.alpha,
        "tau": settings.tau,
        "bound": settings.bound,
        "precision": settings.precision,
        "classes": len(data.dataset.labels),
        "n_eval": len(data.evaluation),
        **members_summary(data.evaluation.labels, outcome.member_probabilities),
        "arbitrariness": outcome.metrics["arbitrariness"],
        "mean_prediction_range": outcome.metrics["mean_prediction_range"],
        "truth": "the other M-1 members, relative to the reference's predicted class",
        "mean_range_others": float(truth.range.mean()),
        "all_others_agree": float(truth.all_agree.mean()),
        "certified_fraction": fraction,
        "certified_fraction_interval": [low, high],
        **assess_measures(measures, truth, scores.certified, resamples=resamples, seed=settings.seed),
        "dropout_passes": int(dropout_probabilities.shape[0]),
        "seconds_train": outcome.metrics["seconds_train"],
        "seconds_score": seconds_score,
        "seconds_dropout": seconds_dropout,
        "parent_run_id": outcome.parent_run_id,
    }
    return result, {**measures, "prediction_range": truth.range}


def evaluate_outcome(outcome: TrainingOutcome, *, dropout_passes: int = 20, dropout_seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The evaluation's numbers for a trained and scored ensemble, and the per-row measures."""
    passes, seconds_dropout = reference_dropout(outcome, passes=dropout_passes, seed=dropout_seed)
    return evaluate_scores(outcome, outcome.scores, passes, seconds_score=outcome.metrics["seconds_score"], seconds_dropout=seconds_dropout)


def _flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    metrics = {f"eval_{name}_{key}": value for name, quality in result["measures"].items()
               for key, value in quality.items() if not key.endswith("_ci")}
    metrics.update({f"eval_{name}_{key}": value for name, difference in result["comparisons"].items()
                    for key, value in difference.items() if not key.endswith("_ci")})
    keys = ("certified_agreement", "certified_agreement_matched_confidence", "certified_agreement_matched_dropout",
            "certified_overlap_matched_confidence", "partial_spearman_pr_given_confidence", "spearman_consistency_confidence",
            "seconds_dropout")
    metrics.update({key: result[key] for key in keys if key in result})
    return {key: float(value) for key, value in metrics.items() if value is not None and np.isfinite(value)}


def run_evaluation(config: TrainingConfig, *, dropout_passes: int = 20, out: str | Path | None = None) -> dict[str, Any]:
    """Train, score and evaluate; log everything into the ensemble's parent run; optionally write the JSON."""
    check_int("dropout_passes", dropout_passes, minimum=2)
    if config.seeds < 3:
        raise TabconsInputError(f"evaluate needs seeds >= 3, got {config.seeds}: the truth is the spread among the "
                                "members other than the reference, so at least two of them")
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
