"""The evaluation of the measure: hand-computed cases for the pure functions, then `tabcons evaluate` end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from mlflow_tabcons.evaluation.baselines import dropout_measure, mc_dropout_probabilities
from mlflow_tabcons.cli import cli
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.evaluation.measures import (
    agreement_auroc,
    certified_agreement,
    ground_truth,
    json_ready,
    markdown_table,
    measure_quality,
    members_summary,
    spearman,
)

REQUIRED_KEYS = {
    "dataset", "shots", "seeds", "k", "sigma", "alpha", "n_eval", "accuracy_mean", "arbitrariness", "measures",
    "certified_fraction", "certified_agreement", "seconds_train", "seconds_score",
    "balanced_accuracy_mean", "majority_rate", "beats_majority", "perturb", "noise", "comparisons",
    "certified_agreement_ci", "certified_agreement_matched_confidence", "certified_agreement_matched_confidence_ci",
    "certified_agreement_matched_dropout", "certified_agreement_matched_dropout_ci", "certified_overlap_matched_confidence",
    "partial_spearman_pr_given_confidence", "partial_spearman_pr_given_confidence_ci", "spearman_consistency_confidence",
    "spearman_consistency_confidence_ci",
}
QUALITY_KEYS = {"spearman_pv", "spearman_pv_ci", "spearman_pr", "spearman_pr_ci", "auroc_agree", "auroc_agree_ci"}


def _binary(p1):
    """(m, n) class-1 probabilities -> (m, n, 2)."""
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], axis=2)


def test_spearman_sign_follows_the_ranking():
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([0.9, 0.5, 0.2, 0.1])) == pytest.approx(-1.0)
    # one swap among 4 ranks: 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(0.8)


def test_spearman_of_a_constant_side_is_nan():
    assert math.isnan(spearman(np.array([1.0, 2, 3]), np.array([0.5, 0.5, 0.5])))


def test_agreement_auroc_of_a_perfect_and_an_inverted_measure():
    agree = np.array([True, True, False, False, True])
    assert agreement_auroc(np.array([0.9, 0.8, 0.1, 0.2, 0.7]), agree) == pytest.approx(1.0)
    assert agreement_auroc(np.array([0.1, 0.2, 0.9, 0.8, 0.3]), agree) == pytest.approx(0.0)
    # 3 agreeing x 2 disagreeing pairs; the agreeing 0.5 loses to the disagreeing 0.6 once: 5/6
    assert agreement_auroc(np.array([0.9, 0.5, 0.6, 0.2, 0.7]), agree) == pytest.approx(5 / 6)
    assert math.isnan(agreement_auroc(np.array([0.1, 0.2]), np.array([True, True])))


def test_ground_truth_comes_from_the_other_members_relative_to_the_reference_class():
    # 3 members, 3 rows. Row 0: all predict class 1. Row 1: reference says 0, one other agrees.
    # Row 2: reference says 1 (0.6), both others say 0.
    truth = ground_truth(_binary([[0.9, 0.2, 0.6], [0.8, 0.4, 0.3], [0.7, 0.7, 0.1]]))
    np.testing.assert_array_equal(truth.reference_class, [1, 0, 1])
    assert truth.class_probabilities.shape == (2, 3)  # the reference's own probability is no part of the truth
    np.testing.assert_allclose(truth.class_probabilities[:, 1], [0.6, 0.3])  # probability of class 0 on row 1
    np.testing.assert_allclose(truth.range, [0.1, 0.3, 0.2])
    np.testing.assert_allclose(truth.variance[0], np.var([0.8, 0.7]))
    np.testing.assert_allclose(truth.agreement, [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(truth.all_agree, [True, False, False])


def test_ground_truth_follows_the_class_it_is_given():
    """The scorer's class (its own forward path) decides which class the truth is about."""
    members = _binary([[0.51, 0.2], [0.8, 0.4], [0.3, 0.9]])
    truth = ground_truth(members, reference_class=np.array([0, 0]))
    np.testing.assert_allclose(truth.class_probabilities, [[0.2, 0.6], [0.7, 0.1]])
    np.testing.assert_allclose(truth.agreement, [0.5, 0.5])


def test_a_measure_that_tracks_the_truth_gets_negative_spearman_and_auroc_one():
    truth = ground_truth(_binary([[0.9, 0.2, 0.6, 0.95], [0.8, 0.4, 0.3, 0.9], [0.7, 0.7, 0.1, 0.92]]))
    stable_first = -truth.range  # a perfect measure: high exactly where the range is small
    quality = measure_quality(stable_first, truth)
    assert quality["spearman_pr"] == pytest.approx(-1.0)
    assert quality["spearman_pv"] < 0
    assert quality["auroc_agree"] == pytest.approx(1.0)


def test_certified_agreement_averages_over_certified_rows_only():
    agreement = np.array([1.0, 0.5, 0.0, 0.75])
    assert certified_agreement(np.array([True, False, False, True]), agreement) == pytest.approx(0.875)
    assert math.isnan(certified_agreement(np.zeros(4, dtype=bool), agreement))


def test_members_summary_flags_an_ensemble_that_does_not_beat_the_majority():
    labels = np.array([0, 0, 0, 1])
    always_zero = _binary([[0.1] * 4, [0.2] * 4])
    summary = members_summary(labels, always_zero)
    assert summary["majority_rate"] == 0.75 and summary["accuracy_mean"] == 0.75
    assert summary["balanced_accuracy_mean"] == 0.5 and summary["beats_majority"] is False
    assert summary["above_chance"] is False
    perfect = _binary([[0.1, 0.1, 0.1, 0.9], [0.2, 0.3, 0.1, 0.8]])
    assert members_summary(labels, perfect)["beats_majority"] is True
    # finds the minority row but misses one majority row: accuracy 0.75 = majority, balanced 0.83
    balanced = _binary([[0.9, 0.1, 0.1, 0.9], [0.8, 0.2, 0.1, 0.9]])
    summary = members_summary(labels, balanced)
    assert summary["beats_majority"] is False and summary["above_chance"] is True


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: spearman(np.array([1.0, 2.0]), np.array([1.0, 2.0, 3.0])), "measure has 2 rows but target has 3"),
        (lambda: spearman(np.array([1.0, np.nan]), np.array([1.0, 2.0])), "NaN"),
        (lambda: agreement_auroc(np.array([0.1, 0.2]), np.array([0.5, 1.0])), "all_agree must be true/false"),
        (lambda: certified_agreement(np.array([True, False]), np.array([1.5, 0.0])), "agreement must be a share"),
        (lambda: ground_truth(_binary([[0.2, 0.3]])), "at least 2 entries along axis 0"),
        (lambda: ground_truth(np.full((2, 3, 2), 1.5)), "must be <= 1.0"),
        (lambda: dropout_measure(np.full((3, 2, 2), 0.5), np.array([0, 0, 1])), "classes has 3 rows"),
    ],
)
def test_bad_input_is_refused_with_a_message(call, message):
    with pytest.raises(TabconsInputError, match=message):
        call()


def test_dropout_measure_is_minus_the_variance_of_the_predicted_class():
    passes = _binary([[0.9, 0.5], [0.7, 0.5], [0.8, 0.5]])  # (3 passes, 2 rows, 2 classes)
    np.testing.assert_allclose(dropout_measure(passes, np.array([1, 0])), [-np.var([0.9, 0.7, 0.8]), 0.0], atol=1e-12)


def test_json_ready_turns_nan_into_null():
    assert json.loads(json.dumps(json_ready({"a": float("nan"), "b": [np.float64(0.5), np.int64(2)]}))) == {"a": None, "b": [0.5, 2]}


def _result(**overrides):
    quality = {"spearman_pv": -0.3, "spearman_pv_ci": [-0.4, -0.2], "spearman_pr": -0.4, "spearman_pr_ci": [-0.5, -0.3],
               "auroc_agree": 0.7, "auroc_agree_ci": [0.6, 0.8]}
    difference = {"spearman_pr": -0.12, "spearman_pr_ci": [-0.2, -0.04], "auroc_agree": 0.05, "auroc_agree_ci": [0.0, 0.1]}
    result = {"dataset": "d", "shots": 64, "seeds": 10, "n_eval": 200, "perturb": "hidden", "noise": "sphere", "sigma": 1.0,
              "sigma_mode": "relative", "k": 64, "accuracy_mean": 0.72, "balanced_accuracy_mean": 0.7, "majority_rate": 0.65,
              "measures": {"consistency": quality, "confidence": quality, "dropout": quality},
              "comparisons": {"consistency_minus_confidence": difference, "consistency_minus_dropout": difference},
              "partial_spearman_pr_given_confidence": -0.2, "partial_spearman_pr_given_confidence_ci": [-0.3, -0.1],
              "spearman_consistency_confidence": 0.8, "spearman_consistency_confidence_ci": [0.7, 0.9], "certified_fraction": 0.4, "certified_fraction_interval": [0.33, 0.47],
              "certified_agreement": 0.97, "certified_agreement_ci": [0.95, 0.99],
              "certified_agreement_matched_confidence": 0.96, "certified_agreement_matched_confidence_ci": [0.94, 0.98],
              "certified_agreement_matched_dropout": 0.9, "certified_agreement_matched_dropout_ci": [0.85, 0.95],
              "certified_overlap_matched_confidence": 0.7, "alpha": 0.05, "beats_majority": True, "above_chance": True}
    return {**result, **overrides}


def test_markdown_table_shows_intervals_and_marks_rows_without_evidence():
    table = markdown_table([_result(), _result(beats_majority=False, above_chance=False), _result(certified_agreement=None),
                            _result(beats_majority=False, above_chance=True), _result(above_chance=False),
                            _result(bound="betting", tau=0.75)])
    lines = table.strip().splitlines()
    assert len(lines) == 8 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| 64 | empirical-bernstein | 0.5 | 0.72 / 0.65 |" in lines[2]  # results written before bound and tau existed
    assert "| 64 | betting | 0.75 | 0.72 / 0.65 |" in lines[7]
    assert "| -0.12 [-0.20, -0.04] |" in lines[2]  # the paired difference with its interval
    assert "| -0.20 [-0.30, -0.10] | 0.80 [0.70, 0.90] |" in lines[2]  # partial rho and rho(S,conf), with intervals
    assert "| 0.970 [0.950, 0.990] | 0.960 [0.940, 0.980] | 0.900 [0.850, 0.950] | 0.70 |" in lines[2]
    assert "| 0.40 [0.33, 0.47] |" in lines[2] and lines[2].endswith("| yes |")
    assert "do not beat the majority class" in lines[3]
    assert "| n/a [0.950, 0.990] |" in lines[4]
    assert "weak: balanced accuracy above chance" in lines[5]
    assert "weak: accuracy above the majority rate, balanced accuracy at chance" in lines[6]


class _Tiny(torch.nn.Module):
    """A classifier-shaped module with one dropout layer: enough to test MC-dropout's mechanics."""

    num_labels = 2

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(50, 8)
        self.dropout = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        hidden = self.dropout(self.embedding(input_ids)).mean(dim=1)
        return self.head(hidden)


def test_mc_dropout_is_seeded_stochastic_and_leaves_modes_and_global_rng_alone():
    torch.manual_seed(0)
    model = _Tiny().eval()
    rows = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    state = torch.random.get_rng_state()
    first = mc_dropout_probabilities(model, rows, passes=5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    np.testing.assert_array_equal(first, mc_dropout_probabilities(model, rows, passes=5, seed=3))
    assert first.shape == (5, 2, 2) and np.ptp(first[:, 0, 0]) > 0  # dropout really acted
    assert not model.training and not model.dropout.training
    with torch.no_grad():
        plain = torch.softmax(model(torch.tensor([[1, 2, 3]]), torch.ones(1, 3)), -1).numpy()
    assert not np.allclose(first[:, 0], plain)


def test_mc_dropout_refuses_a_model_without_dropout():
    model = _Tiny()
    model.dropout = torch.nn.Identity()
    with pytest.raises(TabconsInputError, match="no dropout modules"):
        mc_dropout_probabilities(model, [torch.tensor([1, 2])], passes=3)


# -- end to end on the tiny model ---------------------------------------------------------------

FAST = ["--shots", "24", "--epochs", "1", "--eval-rows", "20", "--k", "16", "--batch-size", "8", "--dropout-passes", "4"]


def _evaluate(tiny_model_dir, *extra):
    return CliRunner().invoke(cli, ["evaluate", "--model", tiny_model_dir, *FAST, *extra])


@pytest.mark.slow
def test_evaluate_writes_every_key_and_logs_to_mlflow(tracking_uri, tiny_model_dir, tmp_path):
    out = tmp_path / "evaluation.json"
    result = _evaluate(tiny_model_dir, "--data", "diabetes", "--seeds", "3", "--perturb", "hidden", "--noise", "gaussian",
                       "--recipe", "fixed", "--lr", "2e-3", "--head-lr", "5e-3", "--schedule-epochs", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(written)
    assert set(written["measures"]) == {"consistency", "confidence", "dropout"}
    for quality in written["measures"].values():
        assert set(quality) == QUALITY_KEYS
    assert set(written["comparisons"]) == {"consistency_minus_confidence", "consistency_minus_dropout"}
    for difference in written["comparisons"].values():
        assert set(difference) == QUALITY_KEYS
    assert written["seeds"] == 3 and written["n_eval"] == 20 and written["k"] == 16 and written["shots"] == 24
    assert (written["perturb"], written["noise"]) == ("hidden", "gaussian")
    assert (written["learning_rate"], written["head_learning_rate"]) == (2e-3, 5e-3)  # the members' own rates
    assert written["schedule_epochs"] == 3  # the schedule they stopped on

    run = mlflow.get_run(written["parent_run_id"])
    table = mlflow.load_table("tabcons/rows.json", run_ids=[run.info.run_id])
    others = table[["probability_seed_1", "probability_seed_2"]].to_numpy()  # the truth leaves the reference (seed 0) out
    expected = spearman(table["consistency"].to_numpy(), others.max(axis=1) - others.min(axis=1))
    if math.isnan(expected):
        assert written["measures"]["consistency"]["spearman_pr"] is None
    else:
        assert written["measures"]["consistency"]["spearman_pr"] == pytest.approx(expected)
        assert run.data.metrics["eval_consistency_spearman_pr"] == pytest.approx(expected)
    certified = table["certified"].to_numpy(dtype=bool)
    if certified.any():
        assert written["certified_agreement"] == pytest.approx(table["agreement_with_reference"][certified].mean())
        low, high = written["certified_agreement_ci"]
        assert low <= written["certified_agreement"] <= high
    assert written["certified_fraction"] == pytest.approx(certified.mean())
    assert run.data.tags["tabcons.evaluation"] == "true"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "tabcons")}
    assert {"tabcons/evaluation.json", "tabcons/evaluation.md", "tabcons/measures_vs_range.png"} <= artifacts
    logged = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/tabcons/evaluation.json")
    assert logged == written
    assert "consistency" in result.output and "Spearman(PR)" in result.output


@pytest.mark.slow
def test_evaluate_works_on_a_three_class_csv(tracking_uri, tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    n = 150
    x = rng.normal(size=n)
    frame = pd.DataFrame({
        "size": np.round(x * 10 + 50, 1),
        "colour": rng.choice(["red", "green", "blue"], size=n),
        "grade": np.where(x < -0.5, "low", np.where(x > 0.5, "high", "mid")),
    })
    path = tmp_path / "three.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "three.json"
    result = _evaluate(tiny_model_dir, "--data", str(path), "--target", "grade", "--seeds", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["classes"] == 3 and written["n_eval"] == 20
    assert REQUIRED_KEYS <= set(written)
    table = mlflow.load_table("tabcons/rows.json", run_ids=[written["parent_run_id"]])
    assert set(table["predicted"]) <= {"low", "mid", "high"}
    assert 0.0 <= written["arbitrariness"] <= 1.0


def test_evaluate_refuses_bad_input_before_training(tracking_uri, tiny_model_dir):
    result = _evaluate(tiny_model_dir, "--data", "diabetes", "--seeds", "1")
    assert result.exit_code != 0
    assert "seeds must be between 2 and 1000, got 1" in result.output
    result = _evaluate(tiny_model_dir, "--data", "diabetes", "--seeds", "2")
    assert result.exit_code != 0
    assert "evaluate needs seeds >= 3, got 2" in result.output
    result = _evaluate(tiny_model_dir, "--data", "diabetes", "--dropout-passes", "1")
    assert result.exit_code != 0
    assert "dropout_passes must be >= 2" in result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.slow
def test_mlflow_run_evaluate_entry_point(tmp_path, tiny_model_dir):
    """The MLproject's `evaluate` entry point in a real `mlflow run` subprocess, blank optional parameters included."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for leaked in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # mlflow.set_experiment exports the id
        env.pop(leaked, None)
    out = tmp_path / "evaluation.json"
    params = {"data": "diabetes", "model": tiny_model_dir, "seeds": 3, "shots": 24, "epochs": 1, "eval_rows": 20, "k": 16,
              "perturb": "pooled", "out": str(out)}
    command = [sys.executable, "-m", "mlflow", "run", str(Path(__file__).resolve().parent.parent), "-e", "evaluate",
               "--env-manager", "local", "--experiment-name", "mlproject-evaluate"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(written) and written["seeds"] == 3 and written["perturb"] == "pooled"
    mlflow.set_tracking_uri(uri)
    try:
        run = mlflow.get_run(written["parent_run_id"])
    finally:
        mlflow.set_tracking_uri(None)
    assert run.info.status == "FINISHED" and run.data.tags["tabcons.evaluation"] == "true"
