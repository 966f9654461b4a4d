"""Evidence bound to one model version: its run, its storage location, and the content stored there.

A version's storage location is resolved once, by the registry, when the
version is created (a ``models:/`` source is followed then and never again),
so deleting and recreating a name cannot re-point evidence at other files.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.gate.artifacts import content_digest
from mlflow_tabcons.gate.evidence import EVIDENCE_TAGS, Evidence, refuse, sign_evidence
from mlflow_tabcons.gate.keys import ensure_signing_key


def storage_location(registry: Any, name: str, version: str | int) -> str:
    """Where the registry serves this version's files from (``registry``: an MlflowClient or a registry store)."""
    return registry.get_model_version_download_uri(name, str(version))


def check_binding(evidence: Evidence, run_id: str | None, location: str) -> None:
    """Refuse (PERMISSION_DENIED) evidence measured on another run, location or content than this version's."""
    if evidence.run_id != run_id:
        raise refuse(f"tampered evidence: it is for run {evidence.run_id}, the model version comes from run {run_id}")
    if evidence.artifact != location:
        raise refuse(f"it was measured on the model at {evidence.artifact or '(unbound)'}, the model version serves {location}")
    try:
        stored = content_digest(location)
    except TabconsInputError as error:
        raise refuse(error.message) from None
    if stored != evidence.model_sha256:
        raise refuse(
            f"the model's files changed after the evidence was signed: they hash to {stored[:19]}..., "
            f"the evidence was measured on {evidence.model_sha256[:19]}..."
        )


def attach_evidence(client: Any, name: str, version: str | int, evidence: Evidence, key: bytes | None = None) -> None:
    """Sign the evidence, bound to this version's run, storage location and files, and write it on the version."""
    model_version = client.get_model_version(name, str(version))
    if model_version.run_id and model_version.run_id != evidence.run_id:
        raise TabconsInputError(
            f"evidence is for run {evidence.run_id}, but {name} version {version} comes from run {model_version.run_id}"
        )
    location = storage_location(client, name, version)
    if evidence.artifact and evidence.artifact != location:
        raise TabconsInputError(f"evidence is for the model at {evidence.artifact}, but {name} version {version} serves {location}")
    stored = content_digest(location)
    if stored != evidence.model_sha256:
        raise TabconsInputError(
            f"{name} version {version}'s files hash to {stored}, the evidence was measured on {evidence.model_sha256}"
        )
    bound = dataclasses.replace(evidence, artifact=location)
    signed = sign_evidence(bound, key or ensure_signing_key(evidence.role))
    client.set_model_version_tag(name, str(version), EVIDENCE_TAGS[evidence.role], signed)
