"""Helpers shared by the gate tests: a test policy, a signing key, cheap model versions with signed evidence."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from mlflow_tabcons.gate.evidence import Evidence, attach_evidence

KEY = b"tabcons-test-evidence-key-0123456789abcdef"
DIGEST = "sha256:" + "ab" * 32
POLICY = """\
version: 1
aliases:
  champion:
    min_certified_fraction: {threshold: 0.8, on: lower}
    max_arbitrariness: 0.10
    min_accuracy: 0.70
    max_churn: 0.30
stages:
  Production:
    min_certified_fraction: {threshold: 0.8, on: point}
copy:
  min_certified_fraction: {threshold: 0.8, on: lower}
models:
  "sandbox-*":
    aliases:
      champion: {min_certified_fraction: null, max_arbitrariness: null, min_accuracy: null, max_churn: null}
"""


def evidence(run_id: str, *, lower: float = 0.85, accuracy: float = 0.8, arbitrariness: float = 0.05,
             predictions: str = "0000", digest: str = DIGEST) -> Evidence:
    return Evidence(
        run_id=run_id, certified_fraction=min(1.0, lower + 0.05), certified_fraction_lower=lower,
        certified_fraction_upper=min(1.0, lower + 0.1), n_eval=len(predictions), k=16, sigma=0.5,
        sigma_mode="relative", alpha=0.05, tau=0.5, bound="empirical-bernstein", eval_digest=digest,
        accuracy=accuracy, arbitrariness=arbitrariness, predictions=predictions,
    )


def new_version(client: MlflowClient, name: str, *, signed: bool = True, **evidence_fields: object) -> ModelVersion:
    """A registered model version from a fresh run, carrying signed evidence built from ``evidence_fields``."""
    run_id = client.create_run("0").info.run_id
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - any "does not exist" answer, local or REST
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id)
    if signed:
        attach_evidence(client, name, version.version, evidence(run_id, **evidence_fields), key=KEY)
    return version
