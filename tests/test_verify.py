"""`tabcons verify`: the protocol it measures under, holdouts it refuses, and end to end (train a tiny ensemble,
verify it on a holdout CSV, promote through the gated registry)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from gate_support import KEY, VERIFIER_KEY

from mlflow_tabcons.cli import cli
from mlflow_tabcons.data.tables import load_dataset
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.flavor import load_model
from mlflow_tabcons.flavor.packaged import TabconsModel
from mlflow_tabcons.gate.evidence import VERIFIED_EVIDENCE_TAG, decode_predictions, verify_evidence
from mlflow_tabcons.gate.protocol import Protocol
from mlflow_tabcons.metrics.classification import passes_majority_test
from mlflow_tabcons.scoring.consistency import ScorerSettings
from mlflow_tabcons.tracking.verification import holdout_labels, measure_holdout, protocol_settings, verify_version

# A tiny random checkpoint cannot beat the majority rate: this policy waives that one protocol item, nothing else.
POLICY = """\
version: 1
aliases:
  champion:
    min_accuracy: 0.1
    protocol: {evidence: verified, members_learned: false}
"""


def test_the_gate_never_imports_torch():
    code = "import sys, mlflow_tabcons.gate.store, mlflow_tabcons.gate.decisions; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_protocol_settings_keep_allowed_choices_and_tighten_the_rest():
    settings = ScorerSettings(k=16, tau=0.1, alpha=0.2, sigma=0.1, noise="gaussian", perturb="pooled", precision="bfloat16")
    protocol = Protocol(perturbs=("hidden", "embeddings"), precisions=("float32",))
    measured = protocol_settings(settings, protocol)
    assert (measured.noise, measured.perturb, measured.precision) == ("gaussian", "hidden", "float32")
    assert (measured.k, measured.tau, measured.alpha, measured.sigma) == (64, 0.5, 0.05, 0.5)


@pytest.mark.parametrize(("content", "fragment"), [(b"", "not a readable CSV"), (b"a,a\n1,2\n", "duplicate column"),
                                                  (b"a\n\xff\n", "not UTF-8")])
def test_a_bad_holdout_is_named_before_the_registry_is_asked(tmp_path, content, fragment):
    holdout = tmp_path / "holdout.csv"
    holdout.write_bytes(content)
    with pytest.raises(TabconsInputError, match=fragment):
        verify_version("credit", "1", holdout, registry_uri=f"sqlite:///{tmp_path / 'absent.db'}")


def test_a_holdout_missing_a_feature_is_named():
    model = types.SimpleNamespace(columns=["age", "job"], required=[], labels=["no", "yes"])
    model.check_frame = lambda frame: TabconsModel.check_frame(model, frame)
    frame = pd.DataFrame({"age": [41, 7], "risk": ["no", "yes"]})
    with pytest.raises(TabconsInputError, match=r"missing column\(s\) \['job'\]"):
        measure_holdout(model, frame, holdout_labels(model, frame, "risk"), ScorerSettings())


@pytest.mark.slow
def test_train_verify_promote(tracking_uri, tiny_model_dir, monkeypatch, tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    monkeypatch.setenv("TABCONS_POLICY", str(tmp_path / "policy.yaml"))
    monkeypatch.setenv("TABCONS_EVIDENCE_KEY", KEY.decode())
    monkeypatch.setenv("TABCONS_VERIFIER_KEY", VERIFIER_KEY.decode())
    registry = "tabcons+" + tracking_uri
    mlflow.set_registry_uri(registry)
    runner = CliRunner()
    train = ["train", "--data", "diabetes", "--model", tiny_model_dir, "--shots", "24", "--epochs", "1", "--eval-rows", "12",
             "--k", "16", "--batch-size", "8", "--seeds", "2", "--register", "pima"]
    result = runner.invoke(cli, train)
    assert result.exit_code == 0, result.output

    promote = ["promote", "pima", "1", "champion", "--registry-uri", registry]
    refused = runner.invoke(cli, promote)
    assert refused.exit_code != 0 and "no tabcons.evidence.verified tag" in refused.output

    dataset = load_dataset("diabetes")
    dataset.frame.tail(60).to_csv(tmp_path / "holdout.csv", index=False)
    verified = runner.invoke(cli, ["verify", "pima", "1", "--data", str(tmp_path / "holdout.csv"), "--registry-uri", registry])
    assert verified.exit_code == 0, verified.output
    assert "verified on 60 holdout rows" in verified.output and "signed as the verifier" in verified.output
    client = mlflow.MlflowClient(registry_uri=registry)
    evidence = verify_evidence(client.get_model_version("pima", "1").tags[VERIFIED_EVIDENCE_TAG], VERIFIER_KEY, "verifier")
    assert (evidence.k, evidence.tau, evidence.alpha, evidence.n_eval) == (64, 0.5, 0.05, 60)  # tightened to the protocol
    model = load_model("models:/pima/1")  # on a local store MLflow writes a file into the version: still allowed below
    labels = holdout_labels(model, pd.read_csv(tmp_path / "holdout.csv"), None)
    predicted = np.array(decode_predictions(evidence.predictions))
    assert evidence.accuracy == pytest.approx(np.mean(predicted == labels))
    assert evidence.members_learned == passes_majority_test(labels, predicted)  # the trainer's test, not a point

    allowed = runner.invoke(cli, promote)
    assert allowed.exit_code == 0 and "allowed" in allowed.output, allowed.output

    weights = next(Path(client.get_model_version_download_uri("pima", "1").removeprefix("file://")).rglob("*.safetensors"))
    with open(weights, "ab") as handle:
        handle.write(b"\0")
    client.delete_registered_model_alias("pima", "champion")
    tampered = runner.invoke(cli, promote)
    assert tampered.exit_code != 0 and "files changed after the evidence was signed" in tampered.output


@pytest.mark.slow
def test_the_issues_two_commands_end_in_a_refusal_naming_the_breach(tracking_uri, tiny_model_dir, monkeypatch, tmp_path):
    """`tabcons train ... --tau -0.9 --alpha 0.5 --register cheat`, then `tabcons promote cheat 1 champion`."""
    (tmp_path / "policy.yaml").write_text("version: 1\naliases:\n  champion:\n"
                                          "    min_certified_fraction: {threshold: 0.9, on: lower}\n")
    monkeypatch.setenv("TABCONS_POLICY", str(tmp_path / "policy.yaml"))
    monkeypatch.setenv("TABCONS_EVIDENCE_KEY", KEY.decode())
    registry = "tabcons+" + tracking_uri
    mlflow.set_registry_uri(registry)
    runner = CliRunner()
    train = ["train", "--data", "diabetes", "--model", tiny_model_dir, "--shots", "16", "--seeds", "2", "--epochs", "1",
             "--eval-rows", "60", "--k", "16", "--batch-size", "8", "--tau", "-0.9", "--alpha", "0.5", "--register", "cheat"]
    assert runner.invoke(cli, train).exit_code == 0
    refused = runner.invoke(cli, ["promote", "cheat", "1", "champion", "--registry-uri", registry])
    assert refused.exit_code != 0
    for breach in ("protocol breach: tau -0.9 (policy: at least 0.5", "protocol breach: alpha 0.5 (policy: at most 0.05)",
                   "protocol breach: k 16 (policy: at least 64)"):
        assert breach in refused.output
    assert mlflow.MlflowClient(registry_uri=registry).get_registered_model("cheat").aliases == {}
