"""`tabcons verify`: the verifier measures a registered version itself, on its own holdout, under the policy's protocol.

Separation of duties: the trainer's evidence is measured on rows and under
settings the trainer chose. The verifier (the registry owner's role, holding a
key trainers never hold) downloads the version from its storage location,
hashes the files it is about to score, scores the holdout with the packaged
scorer tightened to the policy's protocol (tau, alpha, k, sigma and bound no
weaker than the policy asks), and attaches evidence signed with the verifier
key. A policy target with ``protocol: {evidence: verified}`` accepts only that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from mlflow_tabcons.data.tables import csv_from_bytes
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.flavor import load_model
from mlflow_tabcons.flavor.packaged import TabconsModel
from mlflow_tabcons.gate.artifacts import directory_digest
from mlflow_tabcons.gate.binding import attach_evidence, storage_location
from mlflow_tabcons.gate.evidence import Evidence, encode_predictions
from mlflow_tabcons.gate.keys import VERIFIER, ensure_signing_key
from mlflow_tabcons.gate.protocol import DEFAULT_PROTOCOL, Protocol
from mlflow_tabcons.members.training import encode
from mlflow_tabcons.metrics.classification import passes_majority_test
from mlflow_tabcons.scoring.consistency import ScorerSettings
from mlflow_tabcons.scoring.bounds import clopper_pearson


def protocol_settings(settings: ScorerSettings, protocol: Protocol) -> ScorerSettings:
    """The packaged scorer settings, each made no weaker than the protocol allows."""
    if settings.sigma_mode not in protocol.sigma_modes:
        raise TabconsInputError(
            f"the model's sigma_mode {settings.sigma_mode!r} is not one the policy accepts {list(protocol.sigma_modes)}"
        )
    sigma = max(settings.sigma, protocol.min_sigma)
    if protocol.max_sigma is not None and sigma > protocol.max_sigma:
        raise TabconsInputError(f"no sigma meets the policy: at least {protocol.min_sigma} and at most {protocol.max_sigma}")
    bound = settings.bound if settings.bound in protocol.bounds and settings.bound != "bernstein" else next(
        b for b in ("empirical-bernstein", "betting", "bernstein") if b in protocol.bounds)
    return dataclasses.replace(
        settings, tau=max(settings.tau, protocol.min_tau), alpha=min(settings.alpha, protocol.max_alpha),
        k=max(settings.k, protocol.min_k), sigma=sigma, bound=bound,
        precision=allowed_choice(settings.precision, protocol.precisions),
        noise=allowed_choice(settings.noise, protocol.noises), perturb=allowed_choice(settings.perturb, protocol.perturbs),
        early_stop=settings.early_stop and protocol.allow_early_stop and bound == "betting",
    )


def allowed_choice(value: str, allowed: tuple[str, ...]) -> str:
    """The model's own choice when the policy allows it (the scorer was built for it), else the policy's first."""
    return value if value in allowed else allowed[0]


def holdout_labels(model: TabconsModel, frame: pd.DataFrame, target: str | None) -> np.ndarray:
    """The holdout's class ids in the model's label order; the target column is the one that is not a feature."""
    if target is None:
        extra = [c for c in frame.columns if c not in model.columns]
        if len(extra) != 1:
            raise TabconsInputError(f"name the holdout's label column with --target; columns beside the features: {extra}")
        target = extra[0]
    if target not in frame.columns:
        raise TabconsInputError(f"the holdout has no column {target!r}; it has {list(frame.columns)}")
    names = {str(label): index for index, label in enumerate(model.labels)}
    unknown = sorted({str(v) for v in frame[target]} - names.keys())
    if unknown:
        raise TabconsInputError(f"holdout column {target!r} holds labels the model does not know: {unknown[:5]}; it knows {list(names)}")
    return np.array([names[str(v)] for v in frame[target]])


def measure_holdout(model: TabconsModel, frame: pd.DataFrame, labels: np.ndarray, settings: ScorerSettings) -> dict[str, Any]:
    """Score every holdout row (its feature columns; a missing one is named) and summarize what the gate reads."""
    frame = model.check_frame(frame)[model.columns]
    input_ids = encode(model.tokenizer, model.serializer.serialize_frame(frame), None, model.max_length).input_ids
    scores = model.scorer(**settings.to_dict()).score(input_ids)
    count = int(scores.certified.sum())
    low, high = clopper_pearson(count, len(labels), settings.alpha)
    return {
        "certified_fraction": count / len(labels), "certified_fraction_lower": low, "certified_fraction_upper": high,
        "accuracy": float(np.mean(scores.predicted == labels)), "members_learned": passes_majority_test(labels, scores.predicted),
        "max_row_variance": float(scores.variance.max()), "predictions": encode_predictions(scores.predicted.tolist()),
    }


def verify_version(name: str, version: str, holdout: str | Path, *, target: str | None = None,
                   protocol: Protocol = DEFAULT_PROTOCOL, registry_uri: str | None = None) -> Evidence:
    """Measure ``name`` version ``version`` on the holdout CSV and attach verifier-signed evidence; returns it."""
    holdout = Path(holdout)
    try:
        raw = holdout.read_bytes()
    except OSError as error:
        raise TabconsInputError(f"cannot read the holdout {holdout}: {error.strerror}") from None
    frame = csv_from_bytes(raw, f"the holdout {holdout}")  # the rows measured are the bytes eval_digest names
    if frame.empty:
        raise TabconsInputError(f"the holdout {holdout} has no rows")
    client = mlflow.MlflowClient(registry_uri=registry_uri)
    model_version = client.get_model_version(name, str(version))
    if not model_version.run_id:
        raise TabconsInputError(f"{name} version {version} has no run; evidence is bound to the run that logged it")
    location = storage_location(client, name, version)
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=folder)
        digest = directory_digest(local)  # the files scored below, checked against the store again when attached
        model = load_model(local)
        labels = holdout_labels(model, frame, target)
        settings = protocol_settings(model.settings, protocol)
        measured = measure_holdout(model, frame, labels, settings)
    evidence = Evidence(
        run_id=model_version.run_id, role=VERIFIER, n_eval=len(frame), k=settings.k, sigma=settings.sigma,
        sigma_mode=settings.sigma_mode, alpha=settings.alpha, tau=settings.tau, bound=settings.bound,
        variance_bound=settings.variance_bound, noise=settings.noise, perturb=settings.perturb, early_stop=bool(settings.early_stop),
        score_seed=settings.seed, precision=settings.precision, members=1, members_replaced=0, arbitrariness=None,
        eval_digest="sha256:" + hashlib.sha256(raw).hexdigest(), model_sha256=digest,
        training={"holdout": holdout.name}, created_at=time.time(), **measured,
    )
    attach_evidence(client, name, version, evidence, key=ensure_signing_key(VERIFIER))
    return evidence
