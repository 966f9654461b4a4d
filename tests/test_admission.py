"""Members that did not learn: the ranking test on validation rows, and their replacement by new seeds."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import binom
from training_faults import flaky_training

from mlflow_tabcons.cli import cli
from mlflow_tabcons.cli.options import blank_or_count
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.members import admission
from mlflow_tabcons.metrics.classification import auroc, ranking_pvalue
from mlflow_tabcons.tracking import training_job
from mlflow_tabcons.tracking.config import TrainingConfig

FAST = ["--data", "diabetes", "--shots", "24", "--epochs", "1", "--eval-rows", "20", "--k", "16", "--batch-size", "8",
        "--recipe", "fixed"]


def _binary(scores: np.ndarray) -> np.ndarray:
    return np.c_[1 - scores, scores]


def test_the_ranking_test_holds_its_level_when_a_model_ranks_at_chance():
    """Scores unrelated to the labels: P(p <= 0.05) must be at most 0.05 (here within a 99.9% binomial band)."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(70, np.int64), np.ones(30, np.int64)]
    p_values = np.array([ranking_pvalue(labels, _binary(rng.random(100)), seed=i) for i in range(400)])
    rejected = int(np.sum(p_values <= 0.05))
    assert rejected <= binom.ppf(0.999, 400, 0.05)
    assert rejected >= binom.ppf(0.001, 400, 0.05)  # and is not a test that never rejects


def test_the_ranking_test_finds_a_model_that_ranks_and_agrees_with_auroc():
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(105, np.int64), np.ones(45, np.int64)]
    learned = _binary(np.clip(rng.normal(0.4 + 0.2 * labels, 0.15), 0, 1))
    assert auroc(labels, learned) > 0.75
    assert ranking_pvalue(labels, learned) == pytest.approx(1 / 1000)
    assert ranking_pvalue(labels, learned) == ranking_pvalue(labels, learned)  # the same rows, the same answer
    backwards = learned[:, ::-1]
    assert ranking_pvalue(labels, backwards) > 0.99


def test_the_ranking_test_reads_multiclass_one_vs_rest_and_refuses_nothing_to_rank():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 300)
    probabilities = rng.dirichlet(np.ones(3), 300)
    assert ranking_pvalue(labels, probabilities) > 0.05
    probabilities[np.arange(300), labels] += 0.5
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    assert ranking_pvalue(labels, probabilities) < 0.01
    assert ranking_pvalue(np.zeros(10, np.int64), _binary(rng.random(10))) == 1.0  # one class: nothing to rank
    with pytest.raises(TabconsInputError, match="permutations"):
        ranking_pvalue(labels, probabilities, permutations=0)


def test_admission_without_validation_rows_admits_and_the_default_cap_is_half_the_members():
    assert admission.admit(None, None).admitted
    assert [admission.default_replacements(m) for m in (2, 3, 5, 10)] == [1, 1, 2, 5]
    assert TrainingConfig(seeds=4).replacements == 2 and TrainingConfig(seeds=4, max_replacements=0).replacements == 0
    with pytest.raises(TabconsInputError, match="max_replacements"):
        TrainingConfig(max_replacements=-1)


def _refusing(seeds: set[int]):
    """An admission test that fails the members of ``seeds`` and passes the rest (``training_job._admission``)."""

    def admission_of(trainer, member):
        failed = member.seed in seeds
        return admission.Admission(not failed, 0.5 if failed else 0.8, 1.0 if failed else 0.001)

    return admission_of


def _runs():
    parent = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string="tags.`tabcons.role` = 'ensemble'")[0]
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, {int(c.data.params["seed"]): c for c in children}


def test_a_member_that_did_not_learn_is_replaced_by_the_next_seed_and_the_evidence_says_so(
    tracking_uri, tiny_model_dir, monkeypatch
):
    monkeypatch.setattr(training_job, "_admission", _refusing({1}))
    result = CliRunner().invoke(cli, ["train", "--model", tiny_model_dir, *FAST, "--seeds", "3", "--register", "weak"])
    assert result.exit_code == 0, result.output
    parent, children = _runs()
    assert sorted(children) == [0, 1, 2, 3]  # seed 1 trained, replaced by seed 3 (the next unused)
    assert children[1].data.tags["tabcons.replaced"] == "true"
    assert {children[s].data.tags["tabcons.replaced"] for s in (0, 2, 3)} == {"false"}
    assert parent.data.metrics["members_replaced"] == 1 and parent.data.tags["tabcons.replaced_seeds"] == "1"
    rows = mlflow.load_table("tabcons/rows.json", run_ids=[parent.info.run_id])
    assert {c for c in rows.columns if c.startswith("probability_seed_")} == {f"probability_seed_{s}" for s in (0, 2, 3)}
    version = mlflow.MlflowClient().get_model_version("weak", "1")
    payload = json.loads(version.tags["tabcons.evidence"])["evidence"]
    assert (payload["members"], payload["members_replaced"]) == (3, 1)


def test_replacements_stop_at_the_cap_and_zero_keeps_every_member(tracking_uri, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(training_job, "_admission", _refusing({0, 1, 2, 3, 4}))  # nothing passes
    args = ["train", "--model", tiny_model_dir, *FAST, "--register", "none"]
    assert CliRunner().invoke(cli, [*args, "--seeds", "2"]).exit_code == 0
    parent, children = _runs()
    # one replacement for two members: seed 0 replaced by seed 2; seed 1 fails too but is kept, and so is seed 2
    assert sorted(children) == [0, 1, 2] and parent.data.metrics["members_replaced"] == 1
    assert [children[s].data.tags["tabcons.replaced"] for s in (0, 1, 2)] == ["true", "false", "false"]
    assert [children[s].data.tags["tabcons.learned_on_validation"] for s in (0, 1, 2)] == ["false"] * 3

    mlflow.delete_run(parent.info.run_id)
    for child in children.values():
        mlflow.delete_run(child.info.run_id)
    assert CliRunner().invoke(cli, [*args, "--seeds", "2", "--max-replacements", "0"]).exit_code == 0
    parent, children = _runs()
    assert sorted(children) == [0, 1] and parent.data.metrics["members_replaced"] == 0
    assert "tabcons.replaced_seeds" not in parent.data.tags


def test_a_resumed_run_replaces_the_same_seeds_and_reuses_the_replacement(tracking_uri, tiny_model_dir, monkeypatch):
    faulty = {2}
    trained = flaky_training(monkeypatch, faulty)
    monkeypatch.setattr(training_job, "_admission", _refusing({1}))
    first = CliRunner().invoke(cli, ["train", "--model", tiny_model_dir, *FAST, "--seeds", "3", "--register", "none"])
    assert first.exit_code == 0, first.output
    assert trained == [0, 1, 3, 2]  # seed 1 replaced by seed 3; seed 2 failed
    parent, _ = _runs()
    trained.clear()
    faulty.clear()
    resumed = CliRunner().invoke(cli, ["train", "--resume", parent.info.run_id])
    assert resumed.exit_code == 0, resumed.output
    assert trained == [2]  # seeds 0, 1 and 3 reloaded; 1 tested again and replaced again, by the same seed 3
    parent = mlflow.get_run(parent.info.run_id)
    assert parent.data.metrics["members_replaced"] == 1 and parent.data.metrics["members_reloaded"] == 3
    rows = mlflow.load_table("tabcons/rows.json", run_ids=[parent.info.run_id])
    assert {c for c in rows.columns if c.startswith("probability_seed_")} == {f"probability_seed_{s}" for s in (0, 2, 3)}


@pytest.mark.parametrize(("value", "message"), [("two", "'two' is not a whole number"), ("-1", "must be between 0 and 1000, got -1"), ("1001", "got 1001")])
def test_a_bad_replacement_cap_is_refused_by_name_before_training(value, message, tracking_uri):
    result = CliRunner().invoke(cli, ["train", "--max-replacements", value, "--register", "none"])
    assert result.exit_code == 2 and "--max-replacements" in result.output and message in result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_the_replacement_cap_reads_an_mlproject_blank_as_the_default():
    assert blank_or_count(None, None, "") is None and blank_or_count(None, None, None) is None
    assert blank_or_count(None, None, "0") == 0 and blank_or_count(None, None, "3") == 3
