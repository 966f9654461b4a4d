"""`tabcons train`: the `main` job from the command line."""

from __future__ import annotations

import click

from mlflow_tabcons.cli.options import (
    calibration_option,
    data_options,
    experiment_option,
    register_option,
    serve_backend_option,
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
@serve_backend_option
@click.option(
    "--resume", "resume_run_id", default=None, metavar="RUN_ID",
    help="Continue an interrupted parent run with its own configuration: keep its finished members, train the missing seeds.",
)
@user_errors
def train(resume_run_id: str | None, **options: object) -> None:
    """Fine-tune a seed ensemble, measure its multiplicity, score and certify the reference member."""
    from mlflow_tabcons.tracking.training_job import run_training

    config = training_config_from_options(options)
    if resume_run_id:
        from mlflow_tabcons.tracking.resume import resumed_config

        defaults = training_config_from_options({p.name: p.default for p in train.params if p.name != "resume_run_id"})
        config = resumed_config(resume_run_id, config, defaults)
    outcome = run_training(config, resume_run_id)
    metrics = outcome.metrics
    replaced = f" ({outcome.members_replaced} in place of seeds that did not learn)" if outcome.members_replaced else ""
    click.echo(
        f"parent run {outcome.parent_run_id}: {len(outcome.members)} members{replaced}, "
        f"accuracy {metrics['accuracy_mean']:.3f} (majority {metrics['majority_rate']:.3f}) on {len(outcome.data.test)} unseen rows; "
        f"on the {len(outcome.data.evaluation)} scored: arbitrariness {metrics['arbitrariness']:.3f}, "
        f"certified fraction {metrics['certified_fraction']:.3f} "
        f"[{metrics['certified_fraction_lower']:.3f}, {metrics['certified_fraction_upper']:.3f}]"
    )
    if not outcome.members_learned:
        click.echo(
            "the members do not beat the majority class on the unseen rows (exact McNemar test, docs/recipe.md): "
            "their multiplicity is noise, and the registered version's evidence says so"
        )
        click.echo(baselines_on_the_test(metrics))
    click.echo(
        f"classical baselines on the same unseen rows: logistic regression accuracy {metrics['baseline_logistic_accuracy']:.3f} "
        f"(AUROC {metrics.get('baseline_logistic_auroc', float('nan')):.3f}), gradient boosting accuracy "
        f"{metrics['baseline_boosting_accuracy']:.3f} (AUROC {metrics.get('baseline_boosting_auroc', float('nan')):.3f}); "
        f"members' AUROC {metrics.get('auroc_mean', float('nan')):.3f}"
    )
    if outcome.model_version is not None:
        version = outcome.model_version
        click.echo(f"registered the reference member as models:/{version.name}/{version.version}")


def baselines_on_the_test(metrics: dict[str, float]) -> str:
    """Whether a classical model passes the members' test on the same rows: tells a table without the signal
    (or rows too few to show it) from members that missed it."""
    from mlflow_tabcons.metrics.classification import MEMBER_LEVEL

    pvalues = {name: metrics[f"baseline_{key}_majority_pvalue"] for name, key in
               (("logistic regression", "logistic"), ("gradient boosting", "boosting"))}
    listed = ", ".join(f"{name} p = {p:.3f}" for name, p in pvalues.items())
    if any(p <= MEMBER_LEVEL for p in pvalues.values()):
        return f"a classical baseline passes the same test ({listed}; level {MEMBER_LEVEL:g}): these rows hold signal the members missed"
    return (f"neither classical baseline passes the same test either ({listed}; level {MEMBER_LEVEL:g}): "
            "on these rows a gain over the majority class this small cannot be told from noise")
