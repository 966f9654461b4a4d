"""The end of the `main` job: package the reference member with the flavor, register it, sign its evidence.

The reference member is logged in the parent run as the LoggedModel
``reference`` (its run id is the parent's), registered as a new version of
``--register NAME``, carries ``evidence.json`` inside the model, and gets the
signed ``tabcons.evidence`` tag the promotion gate reads, bound to the sha256
of the files stored for it. The parent run is
tagged with the registered name and version.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion

from mlflow_tabcons.flavor import log_model, tabcons_signature
from mlflow_tabcons.flavor.packaged import TabconsModel
from mlflow_tabcons.gate.artifacts import content_digest
from mlflow_tabcons.gate.binding import attach_evidence, storage_location
from mlflow_tabcons.gate.evidence import Evidence, encode_predictions, eval_digest
from mlflow_tabcons.gate.keys import TRAINER
from mlflow_tabcons.members.classifier import ClassifierSpec
from mlflow_tabcons.tracking.config import DEFAULT_REGISTER, TrainingConfig, registered_model_name
from mlflow_tabcons.tracking.prepared import TrainingOutcome

LOGGED_MODEL_NAME = "reference"
EXAMPLE_ROWS = 2


def packaged_reference(outcome: TrainingOutcome, config: TrainingConfig) -> TabconsModel:
    """The reference member with its tokenizer, serializer, labels and scorer settings."""
    data, train = outcome.data, config.train
    dataset = data.dataset
    spec = ClassifierSpec(
        num_labels=len(dataset.labels),
        pooling=train.pooling,
        head_dropout=train.head_dropout,
        base_model=config.model,
        lora=asdict(train.lora),
        family=data.family,
        head=outcome.trainer.head,
        answer_words=dataset.label_words if data.answer_ids else [],
        answer_token_ids=list(data.answer_ids or []),
    )
    features = dataset.frame[dataset.features]
    return TabconsModel(
        classifier=outcome.members[0].classifier,
        spec=spec,
        tokenizer=data.tokenizer,
        serializer=data.serializer,
        labels=list(dataset.labels),
        settings=config.scorer,
        max_length=train.max_length,
        required=[c for c in dataset.features if not features[c].isna().any()],
    )


def measured_evidence(outcome: TrainingOutcome, config: TrainingConfig) -> dict[str, Any]:
    """The facts the promotion gate reads, measured at training time (certification on the evaluation rows, accuracy
    and the learning test on every unseen row), and how they were measured.

    Everything but the model's content digest, which exists only once the model is stored.
    """
    metrics, scorer, scores = outcome.metrics, config.scorer, outcome.scores
    return {
        "run_id": outcome.parent_run_id,
        "role": TRAINER,
        "certified_fraction": metrics["certified_fraction"],
        "certified_fraction_lower": metrics["certified_fraction_lower"],
        "certified_fraction_upper": metrics["certified_fraction_upper"],
        "n_eval": len(outcome.data.evaluation),
        "k": scorer.k,
        "sigma": scorer.sigma,
        "sigma_mode": scorer.sigma_mode,
        "alpha": scorer.alpha,
        "tau": scorer.tau,
        "bound": scorer.bound,
        "variance_bound": scorer.variance_bound,
        "max_row_variance": float(scores.variance.max()) if scores.variance is not None else 1.0,
        "noise": scorer.noise,
        "perturb": scorer.perturb,
        "early_stop": bool(scorer.early_stop),
        "score_seed": scorer.seed,
        "precision": scorer.precision,
        "members": len(outcome.members),
        "members_learned": bool(outcome.members_learned),
        "members_replaced": outcome.members_replaced,
        "eval_digest": eval_digest(outcome.data.eval_frame),
        "accuracy": metrics[f"accuracy_seed_{outcome.members[0].seed}"],
        "arbitrariness": metrics["arbitrariness"],
        "predictions": encode_predictions(outcome.scores.predicted.tolist()),
        "training": {k: str(v) for k, v in config.params().items() if not k.startswith("scorer.")},
        "created_at": time.time(),
    }


def register_reference(outcome: TrainingOutcome, config: TrainingConfig) -> ModelVersion:
    """Log the reference member in the active (parent) run, register it, attach its signed evidence."""
    name = registered_model_name(config.register or DEFAULT_REGISTER, outcome.data.dataset.name)
    model = packaged_reference(outcome, config)
    measured = measured_evidence(outcome, config)
    model.evidence = measured
    dataset = outcome.data.dataset
    info = log_model(
        model,
        LOGGED_MODEL_NAME,
        backend=config.serve_backend,
        signature=tabcons_signature(model, dataset.frame[dataset.features]),
        input_example=outcome.data.eval_frame[dataset.features].head(EXAMPLE_ROWS),
        registered_model_name=name,
    )
    client = mlflow.MlflowClient()
    version = client.get_model_version(name, str(info.registered_model_version))
    digest = content_digest(storage_location(client, name, version.version))
    attach_evidence(client, name, version.version, Evidence(**measured, model_sha256=digest))
    mlflow.set_tags({"tabcons.registered_model": name, "tabcons.registered_version": str(version.version)})
    return version
