"""`tabcons verify NAME VERSION --data HOLDOUT.csv`: the verifier's own measurement, signed with the verifier key."""

from __future__ import annotations

import click

from mlflow_tabcons.cli.options import blank_is_none, user_errors


@click.command()
@click.argument("name")
@click.argument("version")
@click.option("--data", "holdout", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Holdout CSV: the model's feature columns and the label column. Its sha256 names it in the evidence.")
@click.option("--target", default=None, callback=blank_is_none, help="Label column (default: the one column that is not a feature).")
@click.option("--policy", "policy_path", default=None, callback=blank_is_none, type=click.Path(dir_okay=False),
              help="Policy whose protocol the measurement meets (default: TABCONS_POLICY, else the default protocol).")
@click.option("--alias", default="champion", show_default=True, help="The target whose protocol applies.")
@click.option("--registry-uri", default=None, callback=blank_is_none,
              help="Registry (default: MLFLOW_REGISTRY_URI, else the tracking URI).")
@user_errors
def verify(name: str, version: str, holdout: str, target: str | None, policy_path: str | None, alias: str,
           registry_uri: str | None) -> None:
    """Score VERSION of model NAME on a holdout under the policy's protocol and attach verifier-signed evidence.

    Run by the registry owner, who holds the verifier key (TABCONS_VERIFIER_KEY or
    TABCONS_VERIFIER_KEY_FILE); trainers never hold it.
    """
    import os

    from mlflow_tabcons.gate import DEFAULT_PROTOCOL, POLICY_ENV, Target, load_policy
    from mlflow_tabcons.tracking.verification import verify_version

    path = policy_path or os.environ.get(POLICY_ENV)
    protocol = load_policy(path).protocol_for(name, Target("alias", alias)) if path else DEFAULT_PROTOCOL
    evidence = verify_version(name, version, holdout, target=target, protocol=protocol, registry_uri=registry_uri)
    click.echo(
        f"{name} version {version} verified on {evidence.n_eval} holdout rows ({evidence.eval_digest[:19]}...): "
        f"accuracy {evidence.accuracy:.3f}, certified fraction {evidence.certified_fraction:.3f} "
        f"[{evidence.certified_fraction_lower:.3f}, {evidence.certified_fraction_upper:.3f}] at tau {evidence.tau}, "
        f"alpha {evidence.alpha}, k {evidence.k}, sigma {evidence.sigma} ({evidence.sigma_mode}); "
        f"model {evidence.model_sha256[:19]}...; signed as the verifier"
    )
