"""`tabcons calibrate`: pick sigma (and report k) on validation rows against a small seed ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlflow_tabcons.cli.options import blank_is_none, ensemble_options, training_config_from_options, user_errors
from mlflow_tabcons.errors import TabconsInputError


def _numbers(kind: type, text: str, name: str) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise TabconsInputError(f"{name} must be comma-separated {kind.__name__}s, got {text!r}") from None


@click.command()
@ensemble_options
@click.option("--sigmas", default="0.25,0.5,1,2", show_default=True, help="Comma-separated sigmas to try (in --sigma-mode units).")
@click.option("--ks", default="16,32,64", show_default=True, help="Comma-separated k to try at the chosen sigma.")
@click.option("--sweep-k", type=int, default=32, show_default=True, help="Neighbours per row while sweeping sigma.")
@click.option("--calibration-rows", type=int, default=60, show_default=True, help="Validation rows to calibrate on.")
@click.option("--tolerance", type=float, default=0.05, show_default=True,
              help="The reported k is the smallest whose Spearman and certified fraction are this close to the largest k's.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, callback=blank_is_none, help="Write the calibration JSON here (for --calibration).")
@user_errors
def calibrate(sigmas: str, ks: str, sweep_k: int, calibration_rows: int, tolerance: float, out: str | None, **options: object) -> None:
    """Fine-tune a few seeds and run the sigma/k ablation of the consistency score on validation rows."""
    from mlflow_tabcons.tracking.calibration import CalibrationGrid, ablation_table, run_calibration
    from mlflow_tabcons.evaluation.measures import json_ready

    grid = CalibrationGrid(_numbers(float, sigmas, "sigmas"), _numbers(int, ks, "ks"), sweep_k, calibration_rows, tolerance)
    result = run_calibration(training_config_from_options(options), grid)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(json_ready(result), indent=2, allow_nan=False) + "\n")
    click.echo(ablation_table(result["ablation"], result))
    click.echo(f"run {result['run_id']}: sigma = {result['sigma']:g} ({result['sigma_mode']}), k = {result['k']}"
               + (f"; written to {out}" if out else ""))
