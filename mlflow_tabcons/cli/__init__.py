"""The `tabcons` command. Each subcommand lives in its own module of this package."""

from __future__ import annotations

import click

from mlflow_tabcons.cli.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mlflow-tabcons")
def cli() -> None:
    """Prediction consistency under fine-tuning multiplicity, for tabular LLMs in MLflow."""


cli.add_command(train)
