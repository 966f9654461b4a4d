"""`tabcons calibrate`: pick sigma (and report k) on validation rows against a small seed ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlflow_tabcons.cli.options import blank_is_none, ensemble_options, training_config_from_options, user_errors
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.evaluation.objective import Objective


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _numbers(kind: type, text: str, name: str) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise TabconsInputError(f"{name} must be comma-separated {kind.__name__}s, got {text!r}") from None


@click.command()
@ensemble_options
@click.option("--sites", default="embeddings,values,hidden,pooled", show_default=True,
              help="Comma-separated perturbation sites to try (see --perturb).")
@click.option("--noises", default="sphere", show_default=True, help="Comma-separated noises to try (sphere, gaussian).")
@click.option("--sigmas", default="0.25,0.5,1", show_default=True, help="Comma-separated sigmas to try (in --sigma-mode units), all at --k.")
@click.option("--calibration-rows", type=int, default=100, show_default=True,
              help="Held-out rows to judge the candidates on (validation split, topped up with unused training rows).")
@click.option("--min-certified", type=float, default=Objective().min_certified, show_default=True,
              help="A candidate must certify at least this share of the rows (and its certified rows agree as often as "
                   "the same number of most-confident rows).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, callback=blank_is_none, help="Write the calibration JSON here (for --calibration).")
@user_errors
def calibrate(sites: str, noises: str, sigmas: str, calibration_rows: int, min_certified: float, out: str | None, **options: object) -> None:
    """Fine-tune a few seeds and choose where and how wide to perturb, on held-out rows."""
    from mlflow_tabcons.evaluation.measures import json_ready
    from mlflow_tabcons.tracking.calibration import CalibrationGrid, ablation_table, run_calibration

    grid = CalibrationGrid(_names(sites), _names(noises), _numbers(float, sigmas, "sigmas"), calibration_rows, Objective(min_certified))
    result = run_calibration(training_config_from_options(options), grid)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(json_ready(result), indent=2, allow_nan=False) + "\n")
    click.echo(ablation_table(result["candidates"], result))
    click.echo(f"run {result['run_id']}: perturb = {result['perturb']}, noise = {result['noise']}, sigma = {result['sigma']:g} "
               f"({result['sigma_mode']}), k = {result['k']}; {result['chosen_by']}" + (f"; written to {out}" if out else ""))
