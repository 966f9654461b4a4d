"""Helpers shared by the gate tests: a test policy, signing keys, cheap model versions with real files and signed evidence."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from mlflow_tabcons.gate.artifacts import directory_digest
from mlflow_tabcons.gate.binding import attach_evidence
from mlflow_tabcons.gate.evidence import Evidence

KEY = b"tabcons-test-evidence-key-0123456789abcdef"
VERIFIER_KEY = b"tabcons-test-verifier-key-0123456789abcdef"
DIGEST = "sha256:" + "ab" * 32
ROWS = 100  # evaluation rows in test evidence: the default protocol asks for at least 50
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
    max_churn: 0.30
copy:
  min_certified_fraction: {threshold: 0.8, on: lower}
models:
  "sandbox-*":
    aliases:
      champion: {min_certified_fraction: null, max_arbitrariness: null, min_accuracy: null, max_churn: null}
"""


def evidence(run_id: str, *, lower: float = 0.85, accuracy: float = 0.8, arbitrariness: float | None = 0.05,
             predictions: str = "0000", digest: str = DIGEST, model_sha256: str = "sha256:" + "00" * 32,
             **protocol: object) -> Evidence:
    """Evidence on ROWS rows: ``predictions`` is repeated to fill them, the point estimate is ``lower`` + 0.05.

    ``protocol`` overrides how it was measured (tau, alpha, k, bound, role...); the defaults meet the default protocol.
    """
    n_eval = int(protocol.pop("n_eval", ROWS))
    rows = (predictions * math.ceil(n_eval / len(predictions)))[:n_eval]
    fields = dict(
        run_id=run_id, role="trainer", certified_fraction=round(min(1.0, lower + 0.05), 2), certified_fraction_lower=lower,
        certified_fraction_upper=min(1.0, lower + 0.1), n_eval=n_eval, k=128, sigma=0.5, sigma_mode="relative", alpha=0.05,
        tau=0.5, bound="empirical-bernstein", variance_bound=1.0, max_row_variance=0.1, noise="sphere", perturb="embeddings", early_stop=False,
        score_seed=0, precision="float32", members=3, members_learned=True, members_replaced=0, eval_digest=digest, accuracy=accuracy,
        arbitrariness=arbitrariness, predictions=rows, model_sha256=model_sha256,
    )
    fields.update(protocol)
    return Evidence(**fields)


def model_files(content: bytes = b"weights") -> Path:
    """A directory standing in for a stored model: an MLmodel file and a weight file."""
    folder = Path(tempfile.mkdtemp(prefix="tabcons-model-"))
    (folder / "MLmodel").write_text("flavors: {}\n")
    (folder / "model.safetensors").write_bytes(content + os.urandom(8))
    return folder


def new_version(client: MlflowClient, name: str, *, signed: bool = True, role: str = "trainer",
                **evidence_fields: object) -> ModelVersion:
    """A registered model version from a fresh run, its files on disk, carrying signed evidence built from ``evidence_fields``."""
    run_id = client.create_run("0").info.run_id
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - any "does not exist" answer, local or REST
        client.create_registered_model(name)
    folder = model_files()
    source = str(folder)
    if client.tracking_uri.startswith("http"):  # a server takes local sources only from inside the run's artifacts
        client.log_artifacts(run_id, str(folder), "model")
        source = client.get_run(run_id).info.artifact_uri + "/model"
    version = client.create_model_version(name, source, run_id)
    if signed:
        measured = evidence(run_id, model_sha256=directory_digest(folder), role=role, **evidence_fields)
        attach_evidence(client, name, version.version, measured, key=VERIFIER_KEY if role == "verifier" else KEY)
    return version
