"""Resuming an interrupted `main` job: `tabcons train --resume RUN_ID`.

A job killed mid-run (SIGKILL, OOM killer, a lost host) leaves its parent run
and the children it was training RUNNING forever, next to the children that
finished. Each finished member logged its trained weights (the LoRA adapters
and head, the only parameters training changes) in its child run, and the
parent logged its full configuration when it started, so a resume reopens the
parent with the same configuration, closes the interrupted children as KILLED,
reloads the finished members and trains only the seeds still missing.
"""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.members.training import EnsembleTrainer, Member, TrainSettings
from mlflow_tabcons.tracking.config import TrainingConfig

CONFIG_ARTIFACT = "tabcons/config.json"
RECIPE_ARTIFACT = "tabcons/recipe.json"
MEMBER_ARTIFACT_DIR = "tabcons"
MEMBER_FILE = "member.safetensors"
TRAIN_ROWS_KEY = "__train_rows__"
INTERRUPTED_TAG = "tabcons.interrupted"
RESUMED_TAG = "tabcons.resumed"
_UNFINISHED = (RunStatus.to_string(RunStatus.RUNNING), RunStatus.to_string(RunStatus.SCHEDULED))


def config_to_dict(config: TrainingConfig) -> dict[str, Any]:
    return asdict(config)


def _build(cls: type, values: dict[str, Any]) -> Any:
    """A (nested, frozen) settings dataclass from its ``asdict`` form; JSON lists become tuples."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for spec in dataclasses.fields(cls):
        if spec.name not in values:
            continue
        value, kind = values[spec.name], hints[spec.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = _build(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[spec.name] = value
    return cls(**kwargs)


# Settings added after runs were first recorded, with the behaviour those runs had: a run resumed
# under today's default would mix members trained two ways.
_SETTINGS_BEFORE_THEY_EXISTED = {"class_prior": "uniform", "tune_class_prior": False}
_CONFIG_BEFORE_IT_EXISTED = {"max_replacements": 0}


def config_from_dict(values: dict[str, Any]) -> TrainingConfig:
    values = {**_CONFIG_BEFORE_IT_EXISTED, **values}
    train = values.get("train")
    if isinstance(train, dict):
        values = {**values, "train": {**_SETTINGS_BEFORE_THEY_EXISTED, **train}}
    return _build(TrainingConfig, values)


def log_config(config: TrainingConfig) -> None:
    """Record the exact configuration in the active parent run, for a later resume."""
    mlflow.log_dict(config_to_dict(config), CONFIG_ARTIFACT)


def log_recipe(settings: TrainSettings, numbers: str) -> None:
    """Record the recipe the members train with in the active parent run, so a resume reuses it."""
    mlflow.log_dict({"train": asdict(settings), "numbers": numbers}, RECIPE_ARTIFACT)


def stored_recipe(run: Run) -> tuple[TrainSettings, str] | None:
    """The member settings and number style the run chose; None when it stopped before choosing."""
    try:
        values = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{RECIPE_ARTIFACT}")
    except Exception:  # not there: MlflowException or OSError depending on the store
        return None
    return _build(TrainSettings, values["train"]), values["numbers"]


def resumable_parent(run_id: str) -> Run:
    """The parent run to reopen: interrupted, FAILED, or FINISHED with failed members; nothing else."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or error.get_http_status_code() == 404:
            raise MlflowException(f"--resume {run_id}: no such run", error_code=RESOURCE_DOES_NOT_EXIST) from None
        raise
    if run.data.tags.get("tabcons.role") != "ensemble":
        raise TabconsInputError(f"--resume {run_id}: not the parent run of `tabcons train` (no tabcons.role=ensemble tag)")
    if run.info.status == RunStatus.to_string(RunStatus.FINISHED) and not run.data.metrics.get("members_failed"):
        raise TabconsInputError(f"--resume {run_id}: the run FINISHED with every member; there is nothing to resume")
    return run


def stored_config(run: Run) -> TrainingConfig:
    """The configuration the parent run was started with."""
    try:
        values = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}")
    except Exception as error:  # missing artifact: MlflowException or OSError depending on the store
        raise TabconsInputError(
            f"--resume {run.info.run_id}: the run has no {CONFIG_ARTIFACT} ({type(error).__name__}); "
            "it was not started by a `tabcons train` that can be resumed"
        ) from None
    return config_from_dict(values)


def config_conflicts(stored: TrainingConfig, given: TrainingConfig, defaults: TrainingConfig) -> dict[str, tuple]:
    """Settings the command line changes from their default to something the run was not started with."""
    was, now, default = stored.params(), given.params(), defaults.params()
    return {key: (was.get(key), value) for key, value in now.items() if value != default.get(key) and value != was.get(key)}


def resumed_config(run_id: str, given: TrainingConfig, defaults: TrainingConfig) -> TrainingConfig:
    """The run's own configuration; options left at their default are taken from it, others must agree."""
    stored = stored_config(resumable_parent(run_id))
    conflicts = config_conflicts(stored, given, defaults)
    if conflicts:
        listed = "; ".join(f"{key}: run has {was!r}, command line {now!r}" for key, (was, now) in sorted(conflicts.items()))
        raise TabconsInputError(
            f"--resume {run_id} continues the run with its own configuration, which conflicts with the command line "
            f"({listed}); drop those options, or start a new run without --resume"
        )
    return stored


def check_same_config(run: Run, config: TrainingConfig) -> None:
    """Refuse to continue a run under a configuration it was not started with."""
    stored = stored_config(run)
    if stored != config:
        was, now = stored.params(), config.params()
        changed = sorted(key for key in set(was) | set(now) if was.get(key) != now.get(key))
        raise TabconsInputError(
            f"cannot resume run {run.info.run_id} with a different configuration; changed: {', '.join(changed)}"
        )


def child_runs(parent: Run) -> list[Run]:
    return mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        output_format="list",
    )


def close_interrupted_children(children: list[Run]) -> list[str]:
    """Mark the children a killed process left RUNNING as KILLED; their run ids."""
    client = mlflow.MlflowClient()
    closed = []
    for child in children:
        if child.info.status in _UNFINISHED:
            client.set_tag(child.info.run_id, INTERRUPTED_TAG, "the process training this member stopped before it finished")
            client.set_terminated(child.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            closed.append(child.info.run_id)
    return closed


def finished_member_runs(children: list[Run]) -> dict[int, Run]:
    """Seed -> the FINISHED member run holding its weights (the newest one, should there be several)."""
    done: dict[int, Run] = {}
    for child in sorted(children, key=lambda run: run.info.start_time or 0):
        if (
            child.info.status == RunStatus.to_string(RunStatus.FINISHED)
            and child.data.tags.get("tabcons.role") == "member"
            and "seed" in child.data.params
        ):
            done[int(child.data.params["seed"])] = child
    return done


def _changed(name: str, parameter: torch.nn.Parameter) -> bool:
    """What training changes: the trained weights, and the head (whose bias takes the class prior after training)."""
    return parameter.requires_grad or name.startswith("head.")


def log_member(member: Member) -> None:
    """Log a trained member's changed weights (adapters and head) and its training rows in the active child run."""
    from safetensors.torch import save_file

    tensors = {name: p.detach().cpu().contiguous() for name, p in member.classifier.named_parameters() if _changed(name, p)}
    tensors[TRAIN_ROWS_KEY] = torch.as_tensor(np.asarray(member.train_rows, dtype=np.int64))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / MEMBER_FILE
        save_file(tensors, str(path))
        mlflow.log_artifact(str(path), MEMBER_ARTIFACT_DIR)


def load_member(trainer: EnsembleTrainer, run: Run) -> Member:
    """Rebuild a finished member from its child run: the seeded classifier with the logged weights put back."""
    from safetensors.torch import load_file

    seed = int(run.data.params["seed"])
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path=f"{MEMBER_ARTIFACT_DIR}/{MEMBER_FILE}", dst_path=folder
            )
        except Exception as error:  # missing artifact or unreadable store
            raise TabconsInputError(
                f"finished member run {run.info.run_id} (seed {seed}) has no readable {MEMBER_FILE}: {error}"
            ) from None
        tensors = load_file(path)
    classifier = trainer.new_classifier(seed)
    train_rows = tensors.pop(TRAIN_ROWS_KEY).numpy()
    trainable = {name for name, p in classifier.named_parameters() if _changed(name, p)}
    if set(tensors) != trainable:
        raise TabconsInputError(
            f"member run {run.info.run_id} (seed {seed}) holds weights for another model shape "
            f"({len(set(tensors) ^ trainable)} parameter names differ)"
        )
    classifier.load_state_dict(tensors, strict=False)
    prior = run.data.metrics.get("class_prior", trainer.settings.class_prior)  # already in the logged head bias
    return Member(seed, classifier.eval(), history=[], train_rows=train_rows, class_prior=prior)


@dataclass
class ResumeState:
    """What a reopened parent already has."""

    members: dict[int, Member]  # seed -> reloaded finished member
    member_runs: dict[int, str]  # seed -> its child run id
    closed: list[str]  # run ids of the interrupted children marked KILLED


def reopen_children(parent: Run, trainer: EnsembleTrainer) -> ResumeState:
    """Close the interrupted children of ``parent`` and reload its finished members."""
    children = child_runs(parent)
    closed = close_interrupted_children(children)
    finished = finished_member_runs(children)
    members = {seed: load_member(trainer, run) for seed, run in finished.items()}
    return ResumeState(members, {seed: run.info.run_id for seed, run in finished.items()}, closed)
