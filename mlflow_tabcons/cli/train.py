"""`tabcons train`: the `main` job from the command line."""

from __future__ import annotations

import click

from mlflow_tabcons.cli.options import (
    calibration_option,
    data_options,
    experiment_option,
    register_option,
    scorer_options,
    training_config_from_options,
    training_options,
    user_errors,
)


@click.command()
@data_options
@training_options
@scorer_options
@calibration_option
@experiment_option
@register_option
@user_errors
def train(**options: object) -> None:
    """Fine-tune a seed ensemble, measure its multiplicity, score and certify the reference member."""
    from mlflow_tabcons.pipeline import run_training

    outcome = run_training(training_config_from_options(options))
    metrics = outcome.metrics
    click.echo(
        f"parent run {outcome.parent_run_id}: {len(outcome.members)} members, "
        f"accuracy {metrics['accuracy_mean']:.3f} (majority {metrics['majority_rate']:.3f}), "
        f"arbitrariness {metrics['arbitrariness']:.3f}, certified fraction {metrics['certified_fraction']:.3f} "
        f"[{metrics['certified_fraction_lower']:.3f}, {metrics['certified_fraction_upper']:.3f}]"
    )
    if outcome.model_version is not None:
        version = outcome.model_version
        click.echo(f"registered the reference member as models:/{version.name}/{version.version}")
