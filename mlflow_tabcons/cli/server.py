"""`tabcons server`: `mlflow server` with the gated registry store and a validated policy.

The policy is checked before MLflow starts, so a malformed file stops here
with its line; MLflow itself would only fail on the first registry call.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click

from mlflow_tabcons.cli.options import user_errors

DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql")


def registry_store_uri(backend_store_uri: str) -> str:
    scheme = backend_store_uri.split(":", 1)[0].split("+", 1)[0]
    if scheme not in DATABASE_SCHEMES:
        raise click.UsageError(f"the gate needs a database backend ({', '.join(DATABASE_SCHEMES)}), got {backend_store_uri!r}")
    return f"tabcons+{backend_store_uri}"


def mlflow_server_command(backend_store_uri: str, host: str, port: int, workers: int | None, extra: tuple[str, ...]) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
               "--registry-store-uri", registry_store_uri(backend_store_uri), "--host", host, "--port", str(port)]
    if workers:
        command += ["--workers", str(workers)]
    return command + list(extra)


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False),
              help="Promotion policy YAML (becomes TABCONS_POLICY for the server).")
@click.option("--backend-store-uri", default="sqlite:///mlflow.db", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--workers", type=int, default=None, help="Server workers (MLflow's default when unset).")
@click.argument("mlflow_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def server(policy_path: str, backend_store_uri: str, host: str, port: int, workers: int | None, mlflow_args: tuple[str, ...]) -> None:
    """Start `mlflow server` whose registry refuses promotions that break the policy. Extra arguments go to mlflow server."""
    from mlflow_tabcons.gate import load_policy
    from mlflow_tabcons.errors import TabconsInputError
    from mlflow_tabcons.gate.keys import KEY_ENV, KEY_FILE_ENV, ROLES, TRAINER, role_key

    policy = load_policy(policy_path)
    if not any(e.name == "tabcons+sqlite" for e in entry_points(group="mlflow.model_registry_store")):
        raise click.ClickException(
            "the tabcons registry store is not installed in this environment (entry point group "
            "mlflow.model_registry_store); without it MLflow would start and answer registry calls with HTTP 400. "
            "Run `pip install -e .` in the project."
        )
    for role in ROLES:
        try:
            key = role_key(role)
        except TabconsInputError as error:
            raise click.ClickException(error.message) from None
        if key is None:
            refused = "trainer evidence" if role == TRAINER else "verifier evidence (`evidence: verified` targets)"
            click.echo(f"warning: no {role} key ({KEY_ENV[role]} / {KEY_FILE_ENV[role]} / the per-user key file): "
                       f"{refused} will be refused as untrusted", err=True)
    protected = sorted(policy.defaults) + [f"{m.pattern}: {sorted(m.rules)}" for m in policy.models]
    click.echo(f"tabcons gate: policy {policy_path} protects {', '.join(protected)}", err=True)
    os.environ["TABCONS_POLICY"] = str(Path(policy_path).resolve())
    command = mlflow_server_command(backend_store_uri, host, port, workers, mlflow_args)
    os.execv(command[0], command)
