"""The `main` job: fine-tune a seed ensemble, measure multiplicity, score the reference, log it all.

One parent MLflow run, one child run per member. A member that fails marks
its own child run FAILED and the parent carries on with the others; the parent
fails only when fewer than two members succeed (no multiplicity to measure).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.evaluation.classical import classical_baselines
from mlflow_tabcons.members.admission import Admission, admit
from mlflow_tabcons.members.checkpoints import resolve_model_path
from mlflow_tabcons.members.classifier import BaseModel, load_base_model, resolve_head
from mlflow_tabcons.members.training import EnsembleTrainer, Member, TrainSettings
from mlflow_tabcons.metrics import multiplicity
from mlflow_tabcons.metrics.classification import classification_scores, majority_rate, members_learned
from mlflow_tabcons.runtime import configure_threads, default_device
from mlflow_tabcons.scoring.consistency import ConsistencyScorer, ConsistencyScores, ScorerSettings, TorchBackend
from mlflow_tabcons.tracking import resume
from mlflow_tabcons.tracking.config import TrainingConfig
from mlflow_tabcons.tracking.plots import consistency_histogram, consistency_vs_range
from mlflow_tabcons.tracking.prepared import PreparedData, TrainingOutcome, prepare_data
from mlflow_tabcons.tracking.recipe import choose_recipe
from mlflow_tabcons.tracking.registration import register_reference
from mlflow_tabcons.tracking.store import initialize_tracking_store

logger = logging.getLogger(__name__)

ROWS_ARTIFACT = "tabcons/rows.json"
LEARNED_TAG = "tabcons.members_learned"
REPLACED_TAG = "tabcons.replaced_seeds"  # seeds that did not learn and were replaced (members/admission.py)
REPLACED_MEMBER_TAG = "tabcons.replaced"  # on a member's own run: true when it was replaced


@dataclass
class TrainedMembers:
    """The ensemble as trained: members in seed order with their test-row probabilities, and what fell out.

    ``failed``: seeds whose training raised; ``replaced``: seeds that ranked the
    validation rows no better than chance and were replaced (members/admission.py).
    """

    members: list[Member] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)


def train_ensemble_members(
    trainer: EnsembleTrainer,
    data: PreparedData,
    config: TrainingConfig,
    test_prefix: list[torch.Tensor] | None,
    finished: Mapping[int, Member] | None = None,
) -> TrainedMembers:
    """Train seeds 0 .. seeds - 1, each in its own child run, replacing members that did not learn.

    A member that ranks the validation rows no better than chance is replaced by
    one trained with the next unused seed (seeds, seeds + 1, ...) while
    ``config.replacements`` allows; after that it is kept, and the stated test
    on the unseen rows (``data.test``, whose frozen-prefix cache is ``test_prefix``)
    judges the ensemble. Seeds in ``finished`` (members reloaded by a resume) are
    reused, not retrained, and tested again the same way.
    """
    trained = TrainedMembers()
    finished = finished or {}
    spare_seeds = itertools.count(config.seeds)
    for seed in range(config.seeds):
        while True:
            replaceable = len(trained.replaced) < config.replacements
            result = (
                _reloaded_member(trainer, data, test_prefix, finished[seed], replaceable=replaceable) if seed in finished
                else _new_member(trainer, data, config, test_prefix, seed, replaceable=replaceable)
            )
            if result is None:
                trained.failed.append(seed)
                break
            member, probabilities, admission = result
            if not _is_replaced(admission, replaceable):
                trained.members.append(member)
                trained.probabilities.append(probabilities)
                break
            trained.replaced.append(seed)
            replacement = next(spare_seeds)
            logger.warning(
                "member seed=%d ranks the validation rows no better than chance (AUROC %.3f, permutation p = %.3f): "
                "replaced by seed %d (%d of at most %d replacements)",
                seed, admission.validation_auroc, admission.pvalue, replacement, len(trained.replaced), config.replacements,
            )
            seed = replacement
    return trained


def _is_replaced(admission: Admission, replaceable: bool) -> bool:
    """A member that did not learn goes while replacements are left; after that it stays."""
    return replaceable and not admission.admitted


def _reloaded_member(
    trainer: EnsembleTrainer, data: PreparedData, test_prefix: list[torch.Tensor] | None, member: Member, *,
    replaceable: bool,
) -> tuple[Member, np.ndarray | None, Admission]:
    """A member reloaded by a resume, tested again; its test-row probabilities only when it stays."""
    admission = _admission(trainer, member)
    if _is_replaced(admission, replaceable):
        return member, None, admission
    return member, trainer.predict_proba(member.classifier, data.test, test_prefix), admission


def _admission(trainer: EnsembleTrainer, member: Member) -> Admission:
    """The admission test on the trainer's validation rows (members/admission.py)."""
    probabilities = trainer.predict_validation(member.classifier)
    return admit(None if probabilities is None else trainer.validation.labels, probabilities)


def _new_member(
    trainer: EnsembleTrainer, data: PreparedData, config: TrainingConfig, test_prefix: list[torch.Tensor] | None,
    seed: int, *, replaceable: bool,
) -> tuple[Member, np.ndarray, Admission] | None:
    """Train seed ``seed`` in its own child run; None when training fails (the child run is marked FAILED).

    The child run is tagged ``tabcons.replaced=true`` when the member did not learn and ``replaceable`` lets it go.
    """
    labels = data.test.labels
    baseline = majority_rate(labels)
    try:
        with mlflow.start_run(run_name=f"seed-{seed}", nested=True, experiment_id=mlflow.active_run().info.experiment_id):
            mlflow.set_tag("tabcons.role", "member")
            mlflow.log_params({"seed": seed, **{k: v for k, v in config.params().items() if k.startswith("train.")}})
            member = trainer.train_member(
                seed, on_epoch=lambda record: mlflow.log_metrics(
                    {k: v for k, v in record.items() if k != "epoch" and np.isfinite(v)}, step=int(record["epoch"])
                )
            )
            admission = _admission(trainer, member)
            member_probabilities = trainer.predict_proba(member.classifier, data.test, test_prefix)
            scores = classification_scores(labels, member_probabilities)
            learned = scores["accuracy"] > baseline
            mlflow.log_metrics({
                **{k: v for k, v in scores.items() if np.isfinite(v)}, "majority_rate": baseline, "class_prior": member.class_prior,
                **({"validation_ranking_pvalue": admission.pvalue} if np.isfinite(admission.pvalue) else {}),
            })
            replaced = _is_replaced(admission, replaceable)
            mlflow.set_tags({
                "tabcons.beats_majority": str(learned).lower(),
                "tabcons.learned_on_validation": str(admission.admitted).lower(),
                REPLACED_MEMBER_TAG: str(replaced).lower(),
            })
            resume.log_member(member)
            if not learned and not replaced:
                logger.warning(
                    "member seed=%d does no better than the majority class (accuracy %.3f <= majority rate %.3f): "
                    "its disagreements are not evidence of multiplicity; try more shots, epochs or a higher learning rate",
                    seed, scores["accuracy"], baseline,
                )
    except Exception as error:  # one bad member must not take the ensemble down
        logger.exception("member seed=%d failed", seed)
        _tag_failed_child(seed, error)
        return None
    return member, member_probabilities, admission


def reference_backend(reference: Member, train: TrainSettings, scorer: ScorerSettings, device: str) -> TorchBackend:
    """The scorer's view of the reference member; its ``hidden`` site is the input of the first LoRA layer."""
    depth = reference.classifier.prefix_layers(train.lora.layers)
    return TorchBackend(reference.classifier, device, scorer.precision, hidden_depth=depth)


def _tag_failed_child(seed: int, error: Exception) -> None:
    parent = mlflow.active_run()
    runs = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.run_name = 'seed-{seed}'",
        output_format="list",
    )
    for run in runs:
        mlflow.MlflowClient().set_tag(run.info.run_id, "tabcons.error", f"{type(error).__name__}: {error}"[:5000])


def per_row_table(
    data: PreparedData, members: list[Member], member_probabilities: np.ndarray, scores: ConsistencyScores
) -> pd.DataFrame:
    """One row per evaluated input: features, truth, each member's probability, S, LCB, certificate, multiplicity."""
    labels = data.dataset.labels
    reference_class = scores.predicted
    class_probabilities = multiplicity.class_probabilities(member_probabilities, reference_class)
    member_labels = member_probabilities.argmax(axis=2)
    features = data.eval_frame.reset_index(drop=True)
    table = features.rename(columns={data.dataset.target: "label"})
    columns: dict[str, Any] = {
        "predicted": [labels[c] for c in reference_class],
        "probability": scores.confidence,
        **{f"probability_seed_{m.seed}": class_probabilities[j] for j, m in enumerate(members)},
        "consistency": scores.consistency,
        "consistency_lcb": scores.lcb,
        "certified": scores.certified,
        "neighbours": scores.samples,
        "prediction_variance": multiplicity.prediction_variance(class_probabilities),
        "prediction_range": multiplicity.prediction_range(class_probabilities),
        "pairwise_disagreement": multiplicity.pairwise_disagreement(member_labels),
        "agreement_with_reference": multiplicity.agreement_with_reference(member_labels),
    }
    clashes = [c for c in columns if c in table.columns]
    table = table.rename(columns={c: f"{c} (feature)" for c in clashes})
    return pd.concat([table, pd.DataFrame(columns)], axis=1)


def ensemble_metrics(
    labels: np.ndarray, members: list[Member], member_probabilities: np.ndarray, scores: ConsistencyScores
) -> dict[str, float]:
    """What the parent run logs: accuracy and the learning test on every unseen row (``labels``, ``member_probabilities``
    (m, n_test, C)); multiplicity and certification on the scored rows, the first ``len(scores.predicted)`` of them."""
    scored = member_probabilities[:, : len(scores.predicted)]
    member_labels = scored.argmax(axis=2)
    class_probabilities = multiplicity.class_probabilities(scored, scores.predicted)
    metrics: dict[str, float] = {}
    per_member = [classification_scores(labels, p) for p in member_probabilities]
    for name in ("accuracy", "balanced_accuracy", "auroc"):
        values = np.array([s[name] for s in per_member])
        for member, value in zip(members, values):
            metrics[f"{name}_seed_{member.seed}"] = float(value)
        metrics[f"{name}_mean"] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    metrics["majority_rate"] = majority_rate(labels)
    metrics["members_beating_majority"] = float(sum(s["accuracy"] > metrics["majority_rate"] for s in per_member))
    learned, p_values = members_learned(labels, member_probabilities)
    metrics["members_learned"] = float(learned)
    for member, p_value in zip(members, p_values):
        metrics[f"majority_test_pvalue_seed_{member.seed}"] = float(p_value)
    metrics.update(multiplicity.multiplicity_summary(member_labels, class_probabilities))
    fraction, low, high = scores.certified_fraction()
    metrics.update(
        {
            "certified_fraction": fraction,
            "certified_fraction_lower": low,
            "certified_fraction_upper": high,
            "mean_consistency": float(scores.consistency.mean()),
            "mean_neighbours": float(scores.samples.mean()),
        }
    )
    return {k: v for k, v in metrics.items() if np.isfinite(v)}


def baseline_metrics(data: PreparedData) -> dict[str, float]:
    """The classical baselines fit on the members' training rows, scored on the unseen rows the members are judged on."""
    dataset = data.dataset
    scores = classical_baselines(
        data.train_frame, data.train.labels, data.test_frame, data.test.labels,
        dataset.features, num_classes=len(dataset.labels),
    )
    return {k: v for k, v in scores.items() if np.isfinite(v)}


def build_trainer(
    config: TrainingConfig, data: PreparedData, device: str, *, base: BaseModel | None = None, validate: bool = True
) -> EnsembleTrainer:
    """The ensemble trainer for the prepared rows on ``base`` (None: the configured base model, loaded);
    ``validate``: score the validation rows after every epoch."""
    base = base or load_base_model(resolve_model_path(config.model))
    validation = data.validation if validate else None
    return EnsembleTrainer(
        base, len(data.dataset.labels), config.train, data.train, validation, device=device, answer_ids=data.answer_ids
    )


def member_description(trainer: EnsembleTrainer, data: PreparedData) -> dict[str, Any]:
    """What kind of members these are: family, head, how the rows' numbers read, answer cue and words (docs/models.md).

    ``serialized_numbers`` is the number style the rows were written in, also where ``numbers`` is ``auto``.
    """
    described: dict[str, Any] = {"model_family": data.family, "head": trainer.head, "serialized_numbers": data.numbers}
    if trainer.head == "verbalizer":
        described["answer_cue"] = data.serializer.answer_cue
        described["answer_words"] = ",".join(f"{label}={word}" for label, word in zip(data.dataset.labels, data.dataset.label_words))
    return described


def _log_new_params(run: mlflow.ActiveRun, params: dict[str, Any]) -> None:
    """Log the parameters the run does not have yet.

    Under `mlflow run` the project's own parameters are logged before the job
    starts (an empty string for an unset one), and MLflow refuses to change a
    logged value; what the user passed is then already on record.
    """
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({key: value for key, value in params.items() if key not in logged})


def experiment_id_for(name: str | None) -> str | None:
    """The id of experiment ``name`` (created if new) for ``start_run``; None under `mlflow run` or without a name.

    Passed on explicitly rather than made active: when another process creates
    the experiment at the same moment, set_experiment returns it without making
    it the active one.
    """
    if not name or os.environ.get("MLFLOW_RUN_ID"):
        return None
    return mlflow.set_experiment(name).experiment_id


def _open_parent(config: TrainingConfig, data: PreparedData, resume_run_id: str | None) -> mlflow.ActiveRun:
    """A new parent run, or the interrupted one ``resume_run_id`` reopened after checking its configuration."""
    if resume_run_id:
        stored = resume.resumable_parent(resume_run_id)
        resume.check_same_config(stored, config)
        run = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tag(resume.RESUMED_TAG, "true")
        return run
    run = mlflow.start_run(
        run_name=f"{data.dataset.name}-{config.shots}shots-{config.seeds}seeds", experiment_id=experiment_id_for(config.experiment)
    )
    mlflow.set_tags({"tabcons.role": "ensemble", "tabcons.dataset": data.dataset.name})
    _log_new_params(run, config.params())
    resume.log_config(config)
    return run


def run_training(config: TrainingConfig, resume_run_id: str | None = None) -> TrainingOutcome:
    """Run the whole `main` job under a parent run (the active one under `mlflow run`).

    ``resume_run_id`` continues an interrupted parent run of the same
    configuration: finished members are reloaded, only missing seeds are trained.
    """
    configure_threads()
    data = prepare_data(config)
    config = replace(config, train=config.train.for_head(resolve_head(config.train.head, data.family)))  # logged as trained
    initialize_tracking_store()
    with _open_parent(config, data, resume_run_id) as parent:
        _log_new_params(parent, {"n_train": len(data.train), "n_eval": len(data.evaluation), "n_test": len(data.test),
                                 "labels": ",".join(map(str, data.dataset.labels))})
        device = default_device()
        base = load_base_model(resolve_model_path(config.model))
        reopened = mlflow.get_run(parent.info.run_id) if resume_run_id else None
        config, data = choose_recipe(config, data, base, device=device, resumed=reopened)  # the members' own recipe
        trainer = build_trainer(config, data, device, base=base)
        _log_new_params(parent, member_description(trainer, data))
        test_prefix = trainer.prefix_for(data.test)
        eval_prefix = None if test_prefix is None else test_prefix[: len(data.evaluation)]
        finished = resume.reopen_children(reopened, trainer).members if reopened else {}
        started = time.perf_counter()
        trained = train_ensemble_members(trainer, data, config, test_prefix, finished)
        members = trained.members
        seconds_train = time.perf_counter() - started
        mlflow.log_metrics({"members_succeeded": len(members), "members_failed": len(trained.failed),
                            "members_reloaded": len(finished), "members_replaced": len(trained.replaced)})
        mlflow.set_tag("tabcons.members", f"{len(members)} of {config.seeds} succeeded")
        if trained.replaced:
            mlflow.set_tag(REPLACED_TAG, ",".join(map(str, trained.replaced)))
        if len(members) < 2:
            raise TabconsInputError(
                f"only {len(members)} of {config.seeds} members trained (failed seeds: {trained.failed}); "
                "multiplicity needs at least two: see the failed child runs' tabcons.error tags"
            )
        reference = members[0]
        mlflow.set_tag("tabcons.reference_seed", str(reference.seed))
        scorer = ConsistencyScorer(reference_backend(reference, config.train, config.scorer, device), config.scorer)
        started = time.perf_counter()
        scores = scorer.score(data.evaluation.input_ids, value_masks=data.evaluation.value_masks, progress=True)
        seconds_score = time.perf_counter() - started
        test_probabilities = np.stack(trained.probabilities)
        member_probabilities = test_probabilities[:, : len(data.evaluation)]
        metrics = ensemble_metrics(data.test.labels, members, test_probabilities, scores)
        metrics.update(seconds_train=seconds_train, seconds_score=seconds_score)  # the cost the score replaces, and its own
        metrics.update(baseline_metrics(data))
        mlflow.log_metrics(metrics)
        learned = metrics["members_learned"] == 1.0
        mlflow.set_tag(LEARNED_TAG, str(learned).lower())
        rows = per_row_table(data, members, member_probabilities, scores)
        mlflow.log_table(rows, ROWS_ARTIFACT)
        mlflow.log_figure(consistency_vs_range(scores.consistency, rows["prediction_range"].to_numpy()), "tabcons/consistency_vs_range.png")
        mlflow.log_figure(consistency_histogram(scores.consistency, scores.certified, config.scorer.tau), "tabcons/consistency_histogram.png")
        outcome = TrainingOutcome(
            parent.info.run_id, data, trainer, members, member_probabilities, scores, metrics, rows, eval_prefix,
            members_learned=learned, members_replaced=len(trained.replaced),
        )
        if config.register:
            outcome.model_version = register_reference(outcome, config)
        return outcome
