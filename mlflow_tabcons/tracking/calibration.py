"""Choosing the neighbourhood radius sigma (and checking k) against a small seed ensemble.

docs/method.md, "The measure": the radius sigma decides whether the measure
works, and its right scale depends on the model. `tabcons calibrate` fine-tunes
a few seeds, scores held-out validation rows (never the evaluation rows) at
several sigmas, and keeps the sigma whose score ranks the ensemble's
prediction range best (most negative Spearman). At that sigma it scores again
with several k and reports the smallest k whose ranking and certified fraction
are within ``tolerance`` of the largest k's. The result is a JSON file (and an
MLflow artifact) that `tabcons train --calibration` and `tabcons evaluate
--calibration` read.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from mlflow_tabcons.scoring.consistency import ConsistencyScorer, ScorerSettings, TorchBackend
from mlflow_tabcons.data.tables import stratified_sample
from mlflow_tabcons.errors import TabconsInputError, check_float, check_int
from mlflow_tabcons.evaluation.measures import (
    GroundTruth,
    certified_agreement,
    ground_truth,
    json_ready,
    measure_quality,
    members_summary,
)
from mlflow_tabcons.members.training import EncodedRows, EnsembleTrainer
from mlflow_tabcons.members.classifier import load_encoder, resolve_model_path
from mlflow_tabcons.tracking.config import TrainingConfig
from mlflow_tabcons.tracking.prepared import prepare_data
from mlflow_tabcons.tracking.training_job import experiment_id_for, train_ensemble_members
from mlflow_tabcons.tracking.plots import new_figure
from mlflow_tabcons.runtime import configure_threads, default_device

logger = logging.getLogger(__name__)

CALIBRATION_ARTIFACT = "tabcons/calibration.json"


@dataclass(frozen=True)
class CalibrationGrid:
    """What to try: sigmas (at ``sweep_k`` neighbours), then ks at the chosen sigma."""

    sigmas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    ks: tuple[int, ...] = (16, 32, 64)
    sweep_k: int = 32
    rows: int = 60
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        if not self.sigmas or not self.ks:
            raise TabconsInputError("calibration needs at least one sigma and one k")
        for sigma in self.sigmas:
            check_float("sigma", sigma, low=0.0, low_open=True)
        for k in self.ks:
            check_int("k", k, minimum=2)
        check_int("sweep_k", self.sweep_k, minimum=2)
        check_int("calibration rows", self.rows, minimum=4)
        check_float("tolerance", self.tolerance, low=0.0)


def validation_subset(rows: EncodedRows, size: int, seed: int) -> EncodedRows:
    """A stratified sample of ``size`` validation rows (all of them if there are fewer)."""
    if size >= len(rows):
        return rows
    frame = pd.DataFrame({"label": rows.labels, "index": np.arange(len(rows))})
    chosen = np.sort(stratified_sample(frame, "label", size, seed=seed, what="calibration rows")["index"].to_numpy())
    return EncodedRows([rows.input_ids[i] for i in chosen], rows.labels[chosen])


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def ablation_row(scorer: ConsistencyScorer, rows: EncodedRows, truth: GroundTruth, settings: ScorerSettings) -> dict[str, Any]:
    """Score ``rows`` under ``settings`` and say how well S predicts the ensemble's multiplicity."""
    scorer.settings = settings
    started = time.perf_counter()
    scores = scorer.score(rows.input_ids)
    fraction, _, _ = scores.certified_fraction()
    return {
        "sigma": settings.sigma,
        "k": settings.k,
        **measure_quality(scores.consistency, truth),
        "mean_consistency": float(scores.consistency.mean()),
        "certified_fraction": fraction,
        "certified_agreement": certified_agreement(scores.certified, truth.agreement),
        "seconds": time.perf_counter() - started,
    }


def choose_sigma(ablation: Sequence[dict[str, Any]], sweep_k: int) -> float:
    """The sigma whose S has the most negative Spearman with prediction range at ``sweep_k``."""
    sweep = [row for row in ablation if row["k"] == sweep_k]
    if not sweep:
        raise TabconsInputError(f"the ablation has no rows at k={sweep_k}")
    best = min(sweep, key=lambda row: _nan_last(row["spearman_pr"]))
    if math.isnan(best["spearman_pr"]):
        raise TabconsInputError(
            "no sigma could be ranked: the ensemble's prediction range is constant on the calibration rows "
            "(the members agree everywhere or learned nothing); try more shots, epochs or seeds"
        )
    return float(best["sigma"])


def choose_k(ablation: Sequence[dict[str, Any]], sigma: float, tolerance: float) -> int:
    """The smallest k at ``sigma`` whose Spearman and certified fraction are within ``tolerance`` of the largest k's."""
    at_sigma = sorted((row for row in ablation if row["sigma"] == sigma), key=lambda row: row["k"])
    if not at_sigma:
        raise TabconsInputError(f"the ablation has no rows at sigma={sigma}")
    largest = at_sigma[-1]
    for row in at_sigma:
        if _close(row["spearman_pr"], largest["spearman_pr"], tolerance) and _close(
            row["certified_fraction"], largest["certified_fraction"], tolerance
        ):
            return int(row["k"])
    return int(largest["k"])


def _close(a: float, b: float, tolerance: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tolerance


def ablation_table(ablation: Sequence[dict[str, Any]], chosen: dict[str, Any]) -> str:
    """The ablation as markdown, the chosen setting marked."""
    header = "| sigma | k | rho(S, PV) | rho(S, PR) | AUROC all agree | mean S | certified | cert. agreement | seconds | |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(ablation, key=lambda r: (r["sigma"], r["k"])):
        mark = "chosen" if (row["sigma"], row["k"]) == (chosen["sigma"], chosen["k"]) else ""
        values = [row[key] for key in ("spearman_pv", "spearman_pr", "auroc_agree", "mean_consistency", "certified_fraction", "certified_agreement")]
        cells = ["n/a" if math.isnan(v) else f"{v:.3f}" for v in values]
        lines.append(f"| {row['sigma']:g} | {row['k']} | " + " | ".join(cells) + f" | {row['seconds']:.1f} | {mark} |")
    return "\n".join(lines) + "\n"


def ablation_figure(ablation: Sequence[dict[str, Any]], chosen: dict[str, Any], sweep_k: int):
    """Left: S's ranking of prediction range against sigma. Right: ranking and certified fraction against k."""
    figure, (left, right) = new_figure(2, width=10)
    sweep = sorted((r for r in ablation if r["k"] == sweep_k), key=lambda r: r["sigma"])
    left.plot([r["sigma"] for r in sweep], [r["spearman_pr"] for r in sweep], "o-", label="Spearman(S, prediction range)")
    left.plot([r["sigma"] for r in sweep], [r["auroc_agree"] for r in sweep], "s--", label="AUROC(S, all agree)")
    left.axvline(chosen["sigma"], color="black", linestyle=":", label=f"chosen sigma = {chosen['sigma']:g}")
    left.set_xscale("log")
    left.set_xlabel(f"sigma ({chosen['sigma_mode']}), k = {sweep_k}")
    left.legend(fontsize=8)
    ks = sorted((r for r in ablation if r["sigma"] == chosen["sigma"]), key=lambda r: r["k"])
    right.plot([r["k"] for r in ks], [r["spearman_pr"] for r in ks], "o-", label="Spearman(S, prediction range)")
    right.plot([r["k"] for r in ks], [r["certified_fraction"] for r in ks], "s--", label="certified fraction")
    right.axvline(chosen["k"], color="black", linestyle=":", label=f"reported k = {chosen['k']}")
    right.set_xscale("log", base=2)
    right.set_xlabel(f"k at sigma = {chosen['sigma']:g}")
    right.legend(fontsize=8)
    figure.suptitle("Calibration on validation rows against a seed ensemble")
    figure.tight_layout()
    return figure


def run_calibration(config: TrainingConfig, grid: CalibrationGrid | None = None) -> dict[str, Any]:
    """Fine-tune ``config.seeds`` members, run the sigma/k ablation on validation rows, log and return the choice."""
    grid = grid or CalibrationGrid()
    configure_threads()
    data = prepare_data(config)
    rows = validation_subset(data.validation, grid.rows, config.split_seed)
    data = replace(data, evaluation=rows)  # members report their scores on the calibration rows
    with mlflow.start_run(
        run_name=f"calibrate-{data.dataset.name}-{config.shots}shots", experiment_id=experiment_id_for(config.experiment)
    ) as run:
        mlflow.set_tags({"tabcons.role": "calibration", "tabcons.dataset": data.dataset.name})
        mlflow.log_params({**config.params(), "n_calibration_rows": len(rows), "grid.sigmas": ",".join(map(str, grid.sigmas)),
                           "grid.ks": ",".join(map(str, grid.ks)), "grid.sweep_k": grid.sweep_k})
        device = default_device()
        # no per-epoch validation: the members are scored on the (validation) calibration rows once trained
        trainer = EnsembleTrainer(load_encoder(resolve_model_path(config.model)), len(data.dataset.labels), config.train,
                                  data.train, None, device=device)
        members, probabilities, failed = train_ensemble_members(trainer, data, config, trainer.prefix_for(rows))
        if len(members) < 2:
            raise TabconsInputError(f"calibration needs at least two trained members; seeds {failed} failed")
        member_probabilities = np.stack(probabilities)
        truth = ground_truth(member_probabilities)
        scorer = ConsistencyScorer(TorchBackend(members[0].classifier, device, config.scorer.precision), config.scorer)
        ablation = [ablation_row(scorer, rows, truth, config.scorer.with_overrides(sigma=s, k=grid.sweep_k)) for s in grid.sigmas]
        sigma = choose_sigma(ablation, grid.sweep_k)
        ablation += [ablation_row(scorer, rows, truth, config.scorer.with_overrides(sigma=sigma, k=k))
                     for k in grid.ks if k != grid.sweep_k]
        chosen = {"sigma": sigma, "sigma_mode": config.scorer.sigma_mode, "k": choose_k(ablation, sigma, grid.tolerance)}
        result = {
            **chosen,
            "alpha": config.scorer.alpha,
            "bound": config.scorer.bound,
            "dataset": data.dataset.name,
            "shots": config.shots,
            "seeds": len(members),
            "n_rows": len(rows),
            **members_summary(rows.labels, member_probabilities),
            "ablation": ablation,
            "chosen_by": (f"sigma: most negative Spearman(S, prediction range) at k={grid.sweep_k}; k: smallest k at that "
                          f"sigma within {grid.tolerance} of the largest k's Spearman and certified fraction"),
            "run_id": run.info.run_id,
        }
        mlflow.log_metrics({"calibrated_sigma": sigma, "calibrated_k": chosen["k"]})
        mlflow.log_dict(json_ready(result), CALIBRATION_ARTIFACT)
        mlflow.log_text(ablation_table(ablation, chosen), "tabcons/calibration.md")
        mlflow.log_figure(ablation_figure(ablation, chosen, grid.sweep_k), "tabcons/calibration.png")
    return result


def load_calibration(source: str) -> dict[str, Any]:
    """A calibration from a JSON file written by `tabcons calibrate --out`, or from an MLflow run id."""
    path = Path(source)
    if path.is_file():
        try:
            calibration = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise TabconsInputError(f"calibration file {source!r} is not JSON: {error}") from None
    else:
        try:
            calibration = mlflow.artifacts.load_dict(f"runs:/{source}/{CALIBRATION_ARTIFACT}")
        except Exception as error:  # unknown run id, no artifact, unreachable store
            raise TabconsInputError(
                f"calibration {source!r} is neither a JSON file nor an MLflow run with {CALIBRATION_ARTIFACT}: {error}"
            ) from None
    missing = [key for key in ("sigma", "sigma_mode", "k") if key not in calibration]
    if missing:
        raise TabconsInputError(f"calibration {source!r} lacks {missing}")
    return calibration


def apply_calibration(settings: ScorerSettings, calibration: dict[str, Any]) -> ScorerSettings:
    """The scorer settings with the calibrated sigma, sigma mode and k."""
    return settings.with_overrides(sigma=calibration["sigma"], sigma_mode=calibration["sigma_mode"], k=calibration["k"])
