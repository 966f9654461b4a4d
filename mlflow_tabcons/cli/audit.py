"""`tabcons audit NAME`: every gate verdict on a registered model, oldest first."""

from __future__ import annotations

import json
import time

import click

from mlflow_tabcons.cli.options import user_errors


@click.command()
@click.argument("name")
@click.option("--registry-uri", default=None,
              help="The registry database (tabcons+sqlite:///mlflow.db, tabcons+postgresql://...); "
                   "default: MLFLOW_REGISTRY_URI, else the tracking URI.")
@click.option("--limit", type=int, default=None, help="Only the newest N records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@user_errors
def audit(name: str, registry_uri: str | None, limit: int | None, as_json: bool) -> None:
    """Show the audit trail of model NAME: action, verdict, who, when, the rule values."""
    import mlflow

    from mlflow_tabcons.gate import audit_trail

    records = audit_trail(registry_uri or mlflow.get_registry_uri(), name, limit)
    if not records:
        click.echo(f"no gate decisions recorded for {name!r}")
    for record in records:
        if as_json:
            click.echo(json.dumps({**record.__dict__}, sort_keys=True))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.created_at))
        state = "ALLOWED" if record.allowed else "REFUSED"
        click.echo(f"{when}Z #{record.id} {record.action} v{record.version} {state} by {record.actor}: {record.summary}")
