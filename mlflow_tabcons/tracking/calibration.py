"""Choosing where and how wide to perturb, against a seed ensemble, on rows the evaluation never sees.

docs/evaluation.md, "Calibration": `tabcons calibrate` fine-tunes a few seeds,
scores held-out rows (the validation split, topped up with training rows outside
the few-shot sample when it is smaller than asked) at every candidate
neighbourhood (perturbation site x noise x sigma, all at the evaluation's k),
and keeps the candidate the stated objective (``evaluation.objective``) prefers:
a certificate that selects rows at least as trustworthy as the same number of
most-confident rows, on enough rows, and the score that ranks the other
members' disagreement best beyond confidence. The result is a JSON file (and an
MLflow artifact) that `tabcons train --calibration` and `tabcons evaluate --calibration` read.
"""

from __future__ import annotations

import itertools
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

from mlflow_tabcons.data.tables import outside_few_shot, split_dataset, stratified_positions, stratified_sample
from mlflow_tabcons.errors import TabconsInputError, check_choice, check_float, check_int
from mlflow_tabcons.evaluation.intervals import DEFAULT_RESAMPLES
from mlflow_tabcons.evaluation.measures import assess_measures, ground_truth, json_ready, members_summary
from mlflow_tabcons.evaluation.objective import Objective, choose
from mlflow_tabcons.members.training import EncodedRows, EnsembleTrainer, Member, TrainSettings
from mlflow_tabcons.runtime import configure_threads, default_device
from mlflow_tabcons.scoring.consistency import NOISES, PERTURB_SITES, ConsistencyScorer, ScorerSettings
from mlflow_tabcons.tracking.config import TrainingConfig
from mlflow_tabcons.tracking.plots import new_figure
from mlflow_tabcons.tracking.prepared import PreparedData, encode_frame, prepare_data
from mlflow_tabcons.tracking.training_job import build_trainer, experiment_id_for, reference_backend, train_ensemble_members

logger = logging.getLogger(__name__)

CALIBRATION_ARTIFACT = "tabcons/calibration.json"


@dataclass(frozen=True)
class CalibrationGrid:
    """The candidate neighbourhoods (every site x noise x sigma) and how many held-out rows judge them."""

    sites: tuple[str, ...] = ("embeddings", "values", "hidden", "pooled")
    noises: tuple[str, ...] = ("sphere",)
    sigmas: tuple[float, ...] = (0.25, 0.5, 1.0)
    rows: int = 100
    objective: Objective = Objective()

    def __post_init__(self) -> None:
        if not self.sites or not self.noises or not self.sigmas:
            raise TabconsInputError("calibration needs at least one site, one noise and one sigma")
        for site in self.sites:
            check_choice("perturb site", site, PERTURB_SITES)
        for noise in self.noises:
            check_choice("noise", noise, NOISES)
        for sigma in self.sigmas:
            check_float("sigma", sigma, low=0.0, low_open=True)
        check_int("calibration rows", self.rows, minimum=4)

    def candidates(self) -> list[dict[str, Any]]:
        return [{"perturb": site, "noise": noise, "sigma": sigma}
                for site, noise, sigma in itertools.product(self.sites, self.noises, self.sigmas)]


def validation_subset(rows: EncodedRows, size: int, seed: int) -> EncodedRows:
    """A stratified sample of ``size`` rows (all of them if there are fewer)."""
    if size >= len(rows):
        return rows
    frame = pd.DataFrame({"label": rows.labels})
    return rows.subset(stratified_positions(frame, "label", size, seed=seed, what="calibration rows"))


def held_out_rows(config: TrainingConfig, data: PreparedData, size: int) -> EncodedRows:
    """``size`` rows no member trained on and the evaluation of S never reads.

    The validation split first; when it is smaller than ``size``, training-split
    rows outside the few-shot sample fill up (members never saw them either; the
    members' learning test reads them too, which is no leak: calibration chooses
    the neighbourhood, not the members' answers).
    """
    if len(data.validation) >= size:
        return validation_subset(data.validation, size, config.split_seed)
    split = split_dataset(data.dataset, seed=config.split_seed)
    unused = outside_few_shot(split.train, data.dataset.target, config.shots, seed=config.split_seed)
    unused = stratified_sample(unused, data.dataset.target, min(size - len(data.validation), len(unused)),
                               seed=config.split_seed, what="calibration rows")
    extra = encode_frame(data.dataset, data.serializer, data.tokenizer, unused, config.train.max_length)
    masks = None
    if data.validation.value_masks is not None and extra.value_masks is not None:
        masks = data.validation.value_masks + extra.value_masks
    return EncodedRows(data.validation.input_ids + extra.input_ids, np.concatenate([data.validation.labels, extra.labels]), masks)


def sweep_neighbourhoods(
    reference: Member,
    train: TrainSettings,
    base: ScorerSettings,
    rows: EncodedRows,
    member_probabilities: np.ndarray,
    candidates: Sequence[dict[str, Any]],
    *,
    device: str = "cpu",
    resamples: int = DEFAULT_RESAMPLES,
) -> list[dict[str, Any]]:
    """Score ``rows`` with the reference member at every candidate and judge each against the other members."""
    out = []
    for candidate in candidates:
        settings = base.with_overrides(**candidate)
        scorer = ConsistencyScorer(reference_backend(reference, train, settings, device), settings)
        started = time.perf_counter()
        scores = scorer.score(rows.input_ids, value_masks=rows.value_masks)
        seconds = time.perf_counter() - started
        truth = ground_truth(member_probabilities, reference_class=scores.predicted)
        assessment = assess_measures({"consistency": scores.consistency, "confidence": scores.confidence}, truth,
                                     scores.certified, resamples=resamples, seed=settings.seed)
        out.append({**candidate, "sigma_mode": settings.sigma_mode, "k": settings.k,
                    "certified_fraction": float(scores.certified.mean()), "seconds": seconds, **assessment})
    return out


def choose_neighbourhood(candidates: Sequence[dict[str, Any]], objective: Objective = Objective()) -> dict[str, Any]:
    """The chosen candidate's settings (``perturb``, ``noise``, ``sigma``, ``sigma_mode``, ``k``) and why."""
    index, reason = choose(candidates, objective)
    chosen = candidates[index]
    return {**{key: chosen[key] for key in ("perturb", "noise", "sigma", "sigma_mode", "k")}, "chosen_by": reason,
            "constraints_met": not reason.startswith("NO")}


def _cell(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def ablation_table(candidates: Sequence[dict[str, Any]], chosen: dict[str, Any]) -> str:
    """The candidates as markdown, the chosen one marked."""
    header = ("| site | noise | sigma | rho(S,PR) | S-conf rho(PR) [95%] | rho(S,conf) | certified | agree: certified | "
              "agree: matched conf | same rows as top conf | seconds | |")
    lines = [header, "|" + "---|" * 12]
    for row in candidates:
        mark = "chosen" if all(row[key] == chosen[key] for key in ("perturb", "noise", "sigma")) else ""
        difference = row["comparisons"]["consistency_minus_confidence"]
        low, high = difference["spearman_pr_ci"]
        cells = [row["perturb"], row["noise"], f"{row['sigma']:g}", _cell(row["measures"]["consistency"]["spearman_pr"]),
                 f"{_cell(difference['spearman_pr'])} [{_cell(low)}, {_cell(high)}]", _cell(row["spearman_consistency_confidence"]),
                 _cell(row["certified_fraction"], 2), _cell(row["certified_agreement"]),
                 _cell(row["certified_agreement_matched_confidence"]), _cell(row["certified_overlap_matched_confidence"], 2),
                 f"{row['seconds']:.1f}", mark]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_figure(candidates: Sequence[dict[str, Any]], chosen: dict[str, Any], *, scored_on: str = "held-out rows"):
    """Per site: the paired difference rho(S,PR) - rho(conf,PR) (left) and the certified fraction (right) against sigma.

    ``scored_on`` names what the candidates were scored on (the calibration's held-out rows, or evaluation rows).
    """
    figure, (left, right) = new_figure(2, width=10)
    for site, noise in sorted({(row["perturb"], row["noise"]) for row in candidates}):
        rows = sorted((r for r in candidates if (r["perturb"], r["noise"]) == (site, noise)), key=lambda r: r["sigma"])
        sigmas = [r["sigma"] for r in rows]
        label = site if noise == "sphere" else f"{site} ({noise})"
        left.plot(sigmas, [r["comparisons"]["consistency_minus_confidence"]["spearman_pr"] for r in rows], "o-", label=label)
        right.plot(sigmas, [r["certified_fraction"] for r in rows], "s--", label=label)
    left.axhline(0.0, color="grey", linewidth=0.8)
    left.set_ylabel("rho(S, PR) - rho(confidence, PR)  (below 0: S ranks better)")
    right.set_ylabel("certified fraction")
    for axis in (left, right):
        axis.axvline(chosen["sigma"], color="black", linestyle=":")
        axis.set_xscale("log")
        axis.set_xlabel(f"sigma ({chosen['sigma_mode']}), k = {chosen['k']}")
        axis.legend(fontsize=8)
    figure.suptitle(f"Scored on {scored_on}; calibration chose {chosen['perturb']}, {chosen['noise']}, sigma {chosen['sigma']:g}")
    figure.tight_layout()
    return figure


def run_calibration(config: TrainingConfig, grid: CalibrationGrid | None = None) -> dict[str, Any]:
    """Fine-tune ``config.seeds`` members, judge every candidate neighbourhood on held-out rows, log and return the choice."""
    grid = grid or CalibrationGrid()
    configure_threads()
    data = prepare_data(config)
    rows = held_out_rows(config, data, grid.rows)
    data = replace(data, evaluation=rows, test=rows)  # members report their scores on the calibration rows
    with mlflow.start_run(
        run_name=f"calibrate-{data.dataset.name}-{config.shots}shots", experiment_id=experiment_id_for(config.experiment)
    ) as run:
        mlflow.set_tags({"tabcons.role": "calibration", "tabcons.dataset": data.dataset.name})
        mlflow.log_params({**config.params(), "n_calibration_rows": len(rows), "grid.sites": ",".join(grid.sites),
                           "grid.noises": ",".join(grid.noises), "grid.sigmas": ",".join(map(str, grid.sigmas)),
                           "grid.min_certified": grid.objective.min_certified})
        device = default_device()
        started = time.perf_counter()
        # no per-epoch validation: the members are scored on the (validation) calibration rows once trained
        trainer = build_trainer(config, data, device, validate=False)
        # without validation rows no member is tested for learning, so none is replaced (members/admission.py)
        trained = train_ensemble_members(trainer, data, config, trainer.prefix_for(rows))
        members = trained.members
        if len(members) < 3:
            raise TabconsInputError(
                f"calibration needs at least three trained members (a reference and two others); seeds {trained.failed} failed"
            )
        seconds_train = time.perf_counter() - started
        member_probabilities = np.stack(trained.probabilities)
        candidates = sweep_neighbourhoods(members[0], config.train, config.scorer, rows, member_probabilities,
                                          grid.candidates(), device=device)
        chosen = choose_neighbourhood(candidates, grid.objective)
        result = {
            **chosen,
            "alpha": config.scorer.alpha,
            "bound": config.scorer.bound,
            "dataset": data.dataset.name,
            "shots": config.shots,
            "seeds": len(members),
            "n_rows": len(rows),
            **members_summary(rows.labels, member_probabilities),
            "candidates": candidates,
            "seconds_train": seconds_train,
            "seconds_score": float(sum(row["seconds"] for row in candidates)),
            "run_id": run.info.run_id,
        }
        mlflow.log_metrics({"calibrated_sigma": chosen["sigma"], "calibrated_k": chosen["k"],
                            "calibration_seconds_score": result["seconds_score"]})
        mlflow.set_tags({"tabcons.calibrated_perturb": chosen["perturb"], "tabcons.calibrated_noise": chosen["noise"]})
        mlflow.log_dict(json_ready(result), CALIBRATION_ARTIFACT)
        mlflow.log_text(ablation_table(candidates, chosen), "tabcons/calibration.md")
        mlflow.log_figure(ablation_figure(candidates, chosen), "tabcons/calibration.png")
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
    """The scorer settings with the calibrated sigma, sigma mode, k, and (when the calibration chose them) site and noise."""
    return settings.with_overrides(sigma=calibration["sigma"], sigma_mode=calibration["sigma_mode"], k=calibration["k"],
                                   perturb=calibration.get("perturb"), noise=calibration.get("noise"))
