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
        click.echo(f"  {name:<12} Spearman(PV) {quality['spearman_pv']:+.3f}  Spearman(PR) {quality['spearman_pr']:+.3f}  "
                   f"AUROC(all agree) {quality['auroc_agree']:.3f}")
    agreement = result["certified_agreement"]
    click.echo(f"  certified {result['certified_fraction']:.3f} of rows; their agreement with the other members "
               + ("n/a (none certified)" if math.isnan(agreement) else f"{agreement:.3f} (1 - alpha = {1 - result['alpha']:.3f})"))
    if not result["beats_majority"]:
        click.echo("  WARNING: the members do not beat the majority class: this is no evidence for or against the measure")
