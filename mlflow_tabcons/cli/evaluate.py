"""`tabcons evaluate`: does the consistency score predict what retraining would have shown?"""

from __future__ import annotations

import math

import click

from mlflow_tabcons.cli.options import (
    blank_is_none,
    calibration_option,
    ensemble_options,
    training_config_from_options,
    user_errors,
)


@click.command()
@ensemble_options
@calibration_option
@click.option("--dropout-passes", type=int, default=20, show_default=True, help="Stochastic passes of the MC-dropout baseline.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, callback=blank_is_none, help="Also write the result as JSON here.")
@user_errors
def evaluate(dropout_passes: int, out: str | None, **options: object) -> None:
    """Fine-tune M members, score the reference, and compare S and the baselines with the ensemble's multiplicity."""
    from mlflow_tabcons.tracking.evaluation_job import run_evaluation

    result = run_evaluation(training_config_from_options(options), dropout_passes=dropout_passes, out=out)
    click.echo(
        f"parent run {result['parent_run_id']}: {result['seeds']} members, accuracy {result['accuracy_mean']:.3f} "
        f"(majority {result['majority_rate']:.3f}), arbitrariness {result['arbitrariness']:.3f}"
    )
    for name, quality in result["measures"].items():
        click.echo(f"  {name:<12} Spearman(PV) {_ci(quality, 'spearman_pv')}  Spearman(PR) {_ci(quality, 'spearman_pr')}  "
                   f"AUROC(all others agree) {_ci(quality, 'auroc_agree')}")
    for name, difference in result["comparisons"].items():
        click.echo(f"  {name:<35} Spearman(PR) {_ci(difference, 'spearman_pr')}  AUROC {_ci(difference, 'auroc_agree')}")
    click.echo(f"  partial Spearman(S, PR | confidence) {_ci(result, 'partial_spearman_pr_given_confidence')}; "
               f"Spearman(S, confidence) {_number(result['spearman_consistency_confidence'])}")
    click.echo(f"  certified {result['certified_fraction']:.3f} of rows ({result['certified_rows']}); agreement of the other members "
               f"with the reference on them {_ci(result, 'certified_agreement')}, on as many top-confidence rows "
               f"{_ci(result, 'certified_agreement_matched_confidence')} (same rows: {_number(result['certified_overlap_matched_confidence'])}), "
               f"on as many lowest-dropout-variance rows {_ci(result, 'certified_agreement_matched_dropout')}")
    if not result["beats_majority"]:
        click.echo("  WARNING: the members do not beat the majority class: this is no evidence for or against the measure")


def _number(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.3f}"


def _ci(result: dict, key: str) -> str:
    low, high = result[f"{key}_ci"]
    return f"{_number(result[key])} [{_number(low)}, {_number(high)}]"
