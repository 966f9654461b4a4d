"""`tabcons promote NAME VERSION TARGET` and `tabcons break-glass`: ask the registry to promote; the gate says yes or why not."""

from __future__ import annotations

import click
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, ErrorCode

from mlflow_tabcons.cli.options import blank_is_none, user_errors
from mlflow_tabcons.gate.rules import Target

_REGISTRY_HELP = ("Registry: http://host:port of a gated `tabcons server`, or tabcons+sqlite:///mlflow.db "
                  "(default: MLFLOW_REGISTRY_URI, else the tracking URI).")


def _target(alias: str, stage: bool) -> Target:
    return Target("stage", alias.capitalize()) if stage else Target("alias", alias)


def _refusals_as_messages(call) -> None:
    try:
        call()
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(PERMISSION_DENIED):
            raise click.ClickException(error.message) from None
        raise


@click.command()
@click.argument("name")
@click.argument("version")
@click.argument("alias")
@click.option("--stage", is_flag=True, help="ALIAS is a legacy stage (Staging, Production) to transition to.")
@click.option("--registry-uri", default=None, callback=blank_is_none, help=_REGISTRY_HELP)
@user_errors
def promote(name: str, version: str, alias: str, stage: bool, registry_uri: str | None) -> None:
    """Point ALIAS of model NAME at VERSION (or move VERSION to a stage), subject to the promotion policy."""
    from mlflow import MlflowClient

    client = MlflowClient(registry_uri=registry_uri)
    if stage:
        _refusals_as_messages(lambda: client.transition_model_version_stage(name, version, alias))
    else:
        _refusals_as_messages(lambda: client.set_registered_model_alias(name, alias, version))
    target = _target(alias, stage)
    verdict = client.get_model_version(name, version).tags.get(target.verdict_tag)
    outcome = f": {verdict}" if verdict else " (not protected by the policy)"
    click.echo(f"{name} version {version} -> {target.describe()}{outcome}")


@click.command("break-glass")
@click.argument("name")
@click.argument("version")
@click.argument("alias")
@click.option("--justification", required=True, help="Why the refusal is overridden; recorded with who armed it and when.")
@click.option("--stage", is_flag=True, help="ALIAS is a legacy stage (Staging, Production).")
@click.option("--registry-uri", default=None, callback=blank_is_none, help=_REGISTRY_HELP)
@user_errors
def break_glass(name: str, version: str, alias: str, justification: str, stage: bool, registry_uri: str | None) -> None:
    """Arm a one-time override of a refusal for VERSION onto ALIAS (an approver's act; someone else then promotes).

    Only where the policy allows it (break_glass.allowed), by an authenticated
    approver, for this one target, until the policy's TTL runs out.
    """
    from mlflow import MlflowClient

    client = MlflowClient(registry_uri=registry_uri)
    target = _target(alias, stage)
    _refusals_as_messages(lambda: client.set_model_version_tag(name, version, target.break_glass_tag, justification))
    click.echo(f"break-glass armed for {name} version {version} -> {target.describe()}; another identity may now promote it")
