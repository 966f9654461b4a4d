"""`tabcons promote NAME VERSION ALIAS`: ask the registry to promote a version; the gate says yes or why not."""

from __future__ import annotations

import click
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, ErrorCode

from mlflow_tabcons.cli.options import _blank_is_none, user_errors
from mlflow_tabcons.gate.evidence import BREAK_GLASS_TAG
from mlflow_tabcons.gate.rules import Target


@click.command()
@click.argument("name")
@click.argument("version")
@click.argument("alias")
@click.option("--stage", is_flag=True, help="ALIAS is a legacy stage (Staging, Production) to transition to.")
@click.option("--break-glass", "justification", default=None, metavar="TEXT", callback=_blank_is_none,
              help="Override a refusal; the justification is recorded in the audit trail with who and when.")
@click.option("--registry-uri", default=None, callback=_blank_is_none,
              help="Registry: http://host:port of a gated `tabcons server`, or tabcons+sqlite:///mlflow.db "
                   "(default: MLFLOW_REGISTRY_URI, else the tracking URI).")
@user_errors
def promote(name: str, version: str, alias: str, stage: bool, justification: str | None, registry_uri: str | None) -> None:
    """Point ALIAS of model NAME at VERSION (or move VERSION to a stage), subject to the promotion policy."""
    from mlflow import MlflowClient

    client = MlflowClient(registry_uri=registry_uri)
    try:
        if justification is not None:
            client.set_model_version_tag(name, version, BREAK_GLASS_TAG, justification)
        if stage:
            client.transition_model_version_stage(name, version, alias)
        else:
            client.set_registered_model_alias(name, alias, version)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(PERMISSION_DENIED):
            raise click.ClickException(error.message) from None
        raise
    target = Target("stage", alias.capitalize()) if stage else Target("alias", alias)
    verdict = client.get_model_version(name, version).tags.get(target.verdict_tag)
    outcome = f": {verdict}" if verdict else " (not protected by the policy)"
    click.echo(f"{name} version {version} -> {target.describe()}{outcome}")
