"""Faults in training lose nothing: failed and killed members are marked, `--resume` trains only what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from training_faults import flaky_training

from mlflow_tabcons.cli import cli
from mlflow_tabcons.members.training import EnsembleTrainer
from mlflow_tabcons.tracking.resume import INTERRUPTED_TAG, MEMBER_FILE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from reliability_faults import integrity, train_until_killed  # noqa: E402

TABCONS = str(Path(sys.executable).parent / "tabcons")
FAST = ["--shots", "24", "--epochs", "1", "--eval-rows", "20", "--k", "16", "--batch-size", "8", "--register", "none",
        "--max-replacements", "0"]  # tiny members rarely learn: the seeds trained are exactly 0 .. seeds - 1


def _train(tiny_model_dir: str, *extra: str):
    return CliRunner().invoke(cli, ["train", "--data", "diabetes", "--model", tiny_model_dir, *FAST, *extra])


def _parent():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string="tags.`tabcons.role` = 'ensemble'")
    assert len(runs) == 1
    return runs[0]


def _children(parent_id: str) -> list:
    return mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )


def test_each_member_logs_weights_that_reload_to_the_same_probabilities(tracking_uri, tiny_model_dir):
    from mlflow_tabcons.tracking.prepared import prepare_data
    from mlflow_tabcons.tracking.resume import load_member, resumable_parent, stored_config, stored_recipe

    assert _train(tiny_model_dir, "--seeds", "2").exit_code == 0
    parent = _parent()
    children = {int(c.data.params["seed"]): c for c in _children(parent.info.run_id)}
    assert all(
        f"tabcons/{MEMBER_FILE}" in {a.path for a in mlflow.MlflowClient().list_artifacts(c.info.run_id, "tabcons")}
        for c in children.values()
    )
    with pytest.raises(Exception, match="FINISHED with every member"):
        resumable_parent(parent.info.run_id)
    config = stored_config(parent)
    assert config.seeds == 2 and config.train.epochs == 1 and config.train.lora.target_modules == ()

    from mlflow_tabcons.members.classifier import load_base_model

    settings, numbers = stored_recipe(parent)  # what the recipe search chose: the members' own settings
    assert settings.epochs == 1 and numbers in ("plain", "words")
    config = replace(config, train=settings, numbers=numbers)
    data = prepare_data(config)
    trainer = EnsembleTrainer(load_base_model(tiny_model_dir), 2, config.train, data.train, data.validation)
    table = mlflow.load_table("tabcons/rows.json", run_ids=[parent.info.run_id])
    for seed, child in children.items():
        member = load_member(trainer, child)
        probabilities = trainer.predict_proba(member.classifier, data.evaluation, trainer.prefix_for(data.evaluation))
        predicted = [data.dataset.labels.index(label) for label in table["predicted"]]
        logged = table[f"probability_seed_{seed}"].to_numpy()
        np.testing.assert_allclose(probabilities[np.arange(len(predicted)), predicted], logged, atol=1e-5)


@pytest.mark.parametrize("faults, parent_status", [({1, 2}, "FAILED"), ({1}, "FINISHED")])
def test_resume_after_members_raised_trains_only_the_failed_seeds(tracking_uri, tiny_model_dir, monkeypatch,
                                                                  faults, parent_status):
    faulty = set(faults)
    trained = flaky_training(monkeypatch, faulty)
    first = _train(tiny_model_dir, "--seeds", "3")
    assert (first.exit_code == 0) == (parent_status == "FINISHED"), first.output
    parent = _parent()
    assert parent.info.status == parent_status
    before = {c.info.run_id: (c.info.status, c.data.params["seed"]) for c in _children(parent.info.run_id)}
    assert sorted(before.values()) == sorted(("FAILED" if s in faults else "FINISHED", str(s)) for s in range(3))
    finished_metrics = {run_id: mlflow.get_run(run_id).data.metrics
                        for run_id, (status, _) in before.items() if status == "FINISHED"}

    trained.clear()
    faulty.clear()
    resumed = CliRunner().invoke(cli, ["train", "--resume", parent.info.run_id])  # configuration comes from the run
    assert resumed.exit_code == 0, resumed.output
    assert sorted(trained) == sorted(faults)  # the recipe search's seeds are not among them: its choice was reused
    parent = mlflow.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["tabcons.resumed"] == "true"
    assert parent.data.metrics["members_succeeded"] == 3 and parent.data.metrics["members_reloaded"] == 3 - len(faults)
    assert parent.data.metrics["members_failed"] == 0
    after = {c.info.run_id: (c.info.status, c.data.params["seed"]) for c in _children(parent.info.run_id)}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing earlier was touched
    assert sorted(v for k, v in after.items() if k not in before) == sorted(("FINISHED", str(s)) for s in faults)
    assert {run_id: mlflow.get_run(run_id).data.metrics for run_id in finished_metrics} == finished_metrics
    assert {"accuracy_seed_0", "accuracy_seed_1", "accuracy_seed_2", "certified_fraction"} <= set(parent.data.metrics)


def test_resume_refuses_a_conflicting_configuration_and_unknown_or_finished_runs(tracking_uri, tiny_model_dir, monkeypatch):
    def broken(self, seed, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(EnsembleTrainer, "train_member", broken)
    _train(tiny_model_dir, "--seeds", "2")
    parent = _parent()
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    conflicting = CliRunner().invoke(cli, ["train", "--resume", parent.info.run_id, "--epochs", "3", "--k", "32"])
    assert conflicting.exit_code == 2
    assert "train.epochs: run has 1, command line 3" in conflicting.output
    assert "scorer.k: run has 16, command line 32" in conflicting.output
    agreeing = CliRunner().invoke(cli, ["train", "--resume", "no-such-run"])
    assert agreeing.exit_code != 0 and "no such run" in agreeing.output and "Traceback" not in agreeing.output
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before
    assert mlflow.get_run(parent.info.run_id).info.status == "FAILED"

    from mlflow_tabcons.tracking.config import TrainingConfig
    from mlflow_tabcons.tracking.training_job import run_training

    other = TrainingConfig(data="diabetes", model=tiny_model_dir, seeds=3, shots=24, eval_rows=20, register=None)
    with pytest.raises(Exception, match="different configuration; changed: .*seeds"):
        run_training(other, parent.info.run_id)


def test_resume_refuses_a_run_that_is_not_a_tabcons_parent(tracking_uri):
    with mlflow.start_run() as run:
        pass
    result = CliRunner().invoke(cli, ["train", "--resume", run.info.run_id])
    assert result.exit_code == 2 and "not the parent run of `tabcons train`" in result.output


@pytest.mark.slow
def test_sigkill_mid_run_keeps_the_database_and_resume_trains_only_the_missing_seeds(tracking_uri, tiny_model_dir, tmp_path):
    db = tmp_path / "mlflow.db"
    args = ["--data", "diabetes", "--model", tiny_model_dir, "--shots", "96", "--epochs", "25", "--eval-rows", "20",
            "--k", "16", "--batch-size", "8", "--seeds", "4", "--register", "none"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}
    assert train_until_killed([TABCONS, "train", *args], env, db, finished=1), "training ended before it could be killed"

    assert integrity(db) == "ok"
    parent = _parent()
    assert parent.info.status == "RUNNING"  # a killed process cannot close its run
    before = {c.info.run_id: c for c in _children(parent.info.run_id)}
    finished = {run_id: c for run_id, c in before.items() if c.info.status == "FINISHED"}
    assert 1 <= len(finished) < 4
    for child in finished.values():
        assert {"accuracy", "train_loss"} <= set(child.data.metrics)
        assert f"tabcons/{MEMBER_FILE}" in {a.path for a in mlflow.MlflowClient().list_artifacts(child.info.run_id, "tabcons")}
    running = [run_id for run_id, c in before.items() if c.info.status == "RUNNING"]

    resumed = subprocess.run([TABCONS, "train", "--resume", parent.info.run_id],
                             env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parent = mlflow.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["members_succeeded"] == 4
    assert parent.data.metrics["members_reloaded"] == len(finished)
    after = {c.info.run_id: c for c in _children(parent.info.run_id)}
    assert set(before) <= set(after)
    for run_id in finished:
        assert after[run_id].info.status == "FINISHED" and after[run_id].data.metrics == finished[run_id].data.metrics
    for run_id in running:
        assert after[run_id].info.status == "KILLED" and INTERRUPTED_TAG in after[run_id].data.tags
    new = [c for run_id, c in after.items() if run_id not in before]
    finished_seeds = {c.data.params["seed"] for c in finished.values()}
    assert sorted(c.data.params["seed"] for c in new) == sorted({"0", "1", "2", "3"} - finished_seeds)
    assert all(c.info.status == "FINISHED" for c in new)


def test_a_run_recorded_before_class_prior_existed_resumes_with_the_prior_it_was_trained_with():
    from mlflow_tabcons.tracking.config import TrainingConfig
    from mlflow_tabcons.tracking.resume import config_from_dict, config_to_dict

    recorded = config_to_dict(TrainingConfig(data="diabetes", register=None))
    assert config_from_dict(recorded) == TrainingConfig(data="diabetes", register=None)  # today's runs round-trip
    del recorded["train"]["class_prior"]
    assert config_from_dict(recorded).train.class_prior == 0.0  # uniform
