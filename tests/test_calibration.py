"""Calibration: the choice rules on constructed ablations, then `tabcons calibrate` and `train --calibration` end to end."""

import json
import math

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

from mlflow_tabcons.tracking.calibration import (
    CalibrationGrid,
    ablation_table,
    apply_calibration,
    choose_k,
    choose_sigma,
    load_calibration,
    validation_subset,
)
from mlflow_tabcons.cli import cli
from mlflow_tabcons.scoring.consistency import ScorerSettings
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.members.training import EncodedRows

NAN = float("nan")


def _row(sigma, k, spearman_pr, certified_fraction=0.0):
    return {"sigma": sigma, "k": k, "spearman_pv": spearman_pr, "spearman_pr": spearman_pr, "auroc_agree": 0.6,
            "mean_consistency": 0.7, "certified_fraction": certified_fraction, "certified_agreement": NAN, "seconds": 1.0}


def test_choose_sigma_takes_the_most_negative_spearman_at_the_sweep_k_and_skips_nan():
    ablation = [_row(0.25, 32, 0.05), _row(0.5, 32, -0.2), _row(1.0, 32, -0.45), _row(2.0, 32, NAN), _row(4.0, 64, -0.9)]
    assert choose_sigma(ablation, 32) == 1.0


def test_choose_sigma_refuses_an_ablation_without_any_ranking():
    with pytest.raises(TabconsInputError, match="prediction range is constant"):
        choose_sigma([_row(0.5, 32, NAN), _row(1.0, 32, NAN)], 32)
    with pytest.raises(TabconsInputError, match="no rows at k=16"):
        choose_sigma([_row(0.5, 32, -0.1)], 16)


def test_choose_k_is_the_smallest_k_close_to_the_largest_in_ranking_and_certified_fraction():
    ablation = [_row(1.0, 16, -0.30, 0.0), _row(1.0, 32, -0.41, 0.10), _row(1.0, 64, -0.43, 0.30),
                _row(1.0, 128, -0.44, 0.33), _row(0.5, 16, -0.44, 0.33)]
    assert choose_k(ablation, 1.0, tolerance=0.05) == 64  # 32 ranks as well but certifies far fewer rows
    assert choose_k(ablation, 1.0, tolerance=0.25) == 32
    assert choose_k(ablation, 1.0, tolerance=0.0) == 128


def test_ablation_table_marks_the_chosen_setting():
    table = ablation_table([_row(0.5, 32, -0.1), _row(1.0, 32, -0.4)], {"sigma": 1.0, "k": 32})
    lines = table.strip().splitlines()
    assert lines[2].startswith("| 0.5 | 32 | -0.100") and not lines[2].endswith("chosen |")
    assert lines[3].startswith("| 1 | 32 | -0.400") and lines[3].endswith("chosen |")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"sigmas": ()}, "at least one sigma"), ({"sigmas": (0.5, -1.0)}, "sigma must be in"),
     ({"ks": (1,)}, "k must be >= 2"), ({"rows": 2}, "calibration rows must be >= 4")],
)
def test_grid_refuses_bad_values(kwargs, message):
    with pytest.raises(TabconsInputError, match=message):
        CalibrationGrid(**kwargs)


def test_validation_subset_is_stratified_and_keeps_rows_aligned():
    import torch

    labels = np.array([0] * 30 + [1] * 10)
    rows = EncodedRows([torch.tensor([i]) for i in range(40)], labels)
    subset = validation_subset(rows, 20, seed=0)
    assert len(subset) == 20 and int((subset.labels == 1).sum()) == 5
    assert all(int(ids[0]) < 30 if label == 0 else int(ids[0]) >= 30 for ids, label in zip(subset.input_ids, subset.labels))
    assert validation_subset(rows, 100, seed=0) is rows


def test_load_and_apply_a_calibration_file(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"sigma": 1.5, "sigma_mode": "absolute", "k": 96}))
    settings = apply_calibration(ScorerSettings(), load_calibration(str(path)))
    assert (settings.sigma, settings.sigma_mode, settings.k) == (1.5, "absolute", 96)
    path.write_text(json.dumps({"sigma": 1.5}))
    with pytest.raises(TabconsInputError, match=r"lacks \['sigma_mode', 'k'\]"):
        load_calibration(str(path))
    path.write_text("{not json")
    with pytest.raises(TabconsInputError, match="is not JSON"):
        load_calibration(str(path))


def test_an_unknown_calibration_source_is_refused(tracking_uri):
    with pytest.raises(TabconsInputError, match="neither a JSON file nor an MLflow run"):
        load_calibration("0123456789abcdef0123456789abcdef")


FAST = ["--data", "diabetes", "--shots", "24", "--epochs", "1", "--batch-size", "8", "--seeds", "3"]


@pytest.mark.slow
def test_calibrate_then_train_with_the_calibration(tracking_uri, tiny_model_dir, tmp_path):
    out = tmp_path / "calibration.json"
    result = CliRunner().invoke(cli, ["calibrate", "--model", tiny_model_dir, *FAST, "--sigmas", "0.1,1,3", "--ks", "8,16",
                                      "--sweep-k", "8", "--calibration-rows", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    calibration = json.loads(out.read_text())
    sweep = [row for row in calibration["ablation"] if row["k"] == 8]
    assert sorted(row["sigma"] for row in sweep) == [0.1, 1.0, 3.0]
    ranked = [row for row in sweep if row["spearman_pr"] is not None]
    assert calibration["sigma"] == min(ranked, key=lambda row: row["spearman_pr"])["sigma"]
    assert sorted(row["k"] for row in calibration["ablation"] if row["sigma"] == calibration["sigma"]) == [8, 16]
    assert calibration["k"] in (8, 16) and calibration["n_rows"] == 20 and calibration["seeds"] == 3
    run = mlflow.get_run(calibration["run_id"])
    assert run.data.tags["tabcons.role"] == "calibration"
    assert run.data.metrics["calibrated_sigma"] == calibration["sigma"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "tabcons")}
    assert {"tabcons/calibration.json", "tabcons/calibration.md", "tabcons/calibration.png"} <= artifacts
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(children) == 3

    for source in (str(out), calibration["run_id"]):
        trained = CliRunner().invoke(cli, ["train", "--model", tiny_model_dir, *FAST[:-2], "--seeds", "2", "--eval-rows", "10",
                                           "--register", "none", "--calibration", source])
        assert trained.exit_code == 0, trained.output
        parent = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"],
                                    filter_string="tags.`tabcons.role` = 'ensemble'")[0]
        assert float(parent.data.params["scorer.sigma"]) == calibration["sigma"]
        assert int(parent.data.params["scorer.k"]) == calibration["k"]
        assert not math.isnan(parent.data.metrics["mean_consistency"])
