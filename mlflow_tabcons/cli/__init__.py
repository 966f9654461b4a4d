"""The `tabcons` command. Each subcommand lives in its own module of this package."""

from __future__ import annotations

import logging

import click

from mlflow_tabcons.cli.audit import audit
from mlflow_tabcons.cli.calibrate import calibrate
from mlflow_tabcons.cli.evaluate import evaluate
from mlflow_tabcons.cli.promote import break_glass, promote
from mlflow_tabcons.cli.server import server
from mlflow_tabcons.cli.train import train
from mlflow_tabcons.cli.verify import verify


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mlflow-tabcons")
def cli() -> None:
    """Prediction consistency under fine-tuning multiplicity, for tabular LLMs in MLflow."""
    _show_progress()


def _show_progress() -> None:
    """Print the library's progress messages (e.g. each recipe trial) on stderr, once."""
    package = logging.getLogger("mlflow_tabcons")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


cli.add_command(train)
cli.add_command(evaluate)
cli.add_command(calibrate)
cli.add_command(promote)
cli.add_command(break_glass)
cli.add_command(server)
cli.add_command(audit)
cli.add_command(verify)
