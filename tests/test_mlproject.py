"""`mlflow run .` as a user runs it: the MLproject's `main` entry point in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mlflow_run_main_logs_an_ensemble(tmp_path, tiny_model_dir):
    """MLflow logs the project's parameters (blank ones as '') before the job: the job must not clash with them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    params = {"data": "diabetes", "model": tiny_model_dir, "seeds": 2, "max_replacements": 0, "shots": 24, "epochs": 1, "eval_rows": 20, "k": 16,
              "bound": "betting", "class_prior": "uniform", "train_precision": "bfloat16", "scorer_precision": "bfloat16"}
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-name", "mlproject"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["mlproject"], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    parent = next(r for r in runs if r.data.tags.get("tabcons.role") == "ensemble")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    # max_replacements=0 keeps every member as trained, learned or not
    assert sorted(r.info.run_name for r in children) == ["seed-0", "seed-1"]
    assert parent.data.metrics["members_replaced"] == 0 and parent.data.params["max_replacements"] == "0"
    assert parent.data.params["target"] == "''" and parent.data.params["scorer.k"] == "16"
    chosen = {key: parent.data.params[key] for key in ("scorer.bound", "train.class_prior", "train.precision", "scorer.precision")}
    assert chosen == {"scorer.bound": "betting", "train.class_prior": "0.0", "train.precision": "bfloat16",
                      "scorer.precision": "bfloat16"}
    assert parent.data.metrics["members_succeeded"] == 2
    assert 0.0 <= parent.data.metrics["certified_fraction"] <= 1.0
