"""Calibration: the choice rules on constructed ablations, then `tabcons calibrate` and `train --calibration` end to end."""

import json
import math

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

from mlflow_tabcons.tracking.calibration import (
    CalibrationGrid,
    ablation_figure,
    ablation_table,
    apply_calibration,
    choose_neighbourhood,
    load_calibration,
    validation_subset,
)
from mlflow_tabcons.cli import cli
from mlflow_tabcons.scoring.consistency import ScorerSettings
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.members.training import EncodedRows

NAN = float("nan")


def _candidate(perturb, sigma, difference, certified, agree, matched):
    return {"perturb": perturb, "noise": "sphere", "sigma": sigma, "sigma_mode": "relative", "k": 128,
            "measures": {"consistency": {"spearman_pr": -0.3}},
            "comparisons": {"consistency_minus_confidence": {"spearman_pr": difference, "spearman_pr_ci": [difference - 0.1, difference + 0.1]}},
            "spearman_consistency_confidence": 0.9, "certified_fraction": certified, "certified_agreement": agree,
            "certified_agreement_matched_confidence": matched, "certified_overlap_matched_confidence": 0.8, "seconds": 2.0}


def test_the_chosen_neighbourhood_carries_its_settings_and_reason():
    candidates = [_candidate("embeddings", 0.5, -0.01, 0.6, 0.99, 0.99), _candidate("hidden", 1.0, -0.12, 0.35, 0.98, 0.97),
                  _candidate("pooled", 1.0, -0.3, 0.0, NAN, NAN)]
    chosen = choose_neighbourhood(candidates)
    assert (chosen["perturb"], chosen["sigma"], chosen["k"], chosen["constraints_met"]) == ("hidden", 1.0, 128, True)
    table = ablation_table(candidates, chosen).strip().splitlines()
    assert table[3].startswith("| hidden | sphere | 1 | -0.300 | -0.120 [-0.220, -0.020]") and table[3].endswith("chosen |")
    assert not table[2].endswith("chosen |") and "| n/a | n/a |" in table[4]


def test_the_ablation_figure_says_which_rows_were_scored():
    candidates = [_candidate("hidden", 0.5, -0.1, 0.5, 1.0, 1.0), _candidate("hidden", 1.0, -0.2, 0.2, 1.0, 1.0)]
    chosen = choose_neighbourhood(candidates)
    assert ablation_figure(candidates, chosen)._suptitle.get_text().startswith("Scored on held-out rows; calibration chose hidden")
    title = ablation_figure(candidates, chosen, scored_on="200 evaluation rows")._suptitle.get_text()
    assert title == f"Scored on 200 evaluation rows; calibration chose hidden, sphere, sigma {chosen['sigma']:g}"


def test_grid_lists_every_site_noise_and_sigma():
    grid = CalibrationGrid(sites=("hidden", "pooled"), noises=("sphere", "gaussian"), sigmas=(0.5, 1.0))
    assert len(grid.candidates()) == 8
    assert {"perturb": "pooled", "noise": "gaussian", "sigma": 0.5} in grid.candidates()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"sigmas": ()}, "at least one site, one noise and one sigma"), ({"sigmas": (0.5, -1.0)}, "sigma must be in"),
     ({"sites": ("logits",)}, "perturb site must be one of"), ({"noises": ("uniform",)}, "noise must be one of"),
     ({"rows": 2}, "calibration rows must be >= 4")],
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
    assert (settings.sigma, settings.sigma_mode, settings.k, settings.perturb) == (1.5, "absolute", 96, "embeddings")
    path.write_text(json.dumps({"sigma": 0.5, "sigma_mode": "relative", "k": 128, "perturb": "hidden", "noise": "gaussian"}))
    settings = apply_calibration(ScorerSettings(), load_calibration(str(path)))
    assert (settings.perturb, settings.noise) == ("hidden", "gaussian")
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
    result = CliRunner().invoke(cli, ["calibrate", "--model", tiny_model_dir, *FAST, "--k", "8", "--sites", "hidden,pooled",
                                      "--sigmas", "0.1,1", "--calibration-rows", "100", "--out", str(out)])
    assert result.exit_code == 0, result.output
    calibration = json.loads(out.read_text())
    swept = {(row["perturb"], row["sigma"]) for row in calibration["candidates"]}
    assert swept == {("hidden", 0.1), ("hidden", 1.0), ("pooled", 0.1), ("pooled", 1.0)}
    assert all(row["k"] == 8 for row in calibration["candidates"])
    assert (calibration["perturb"], calibration["sigma"]) in swept and calibration["chosen_by"]
    # diabetes has 80 validation rows: unused training rows fill up to 100
    assert calibration["n_rows"] == 100 and calibration["seeds"] == 3
    run = mlflow.get_run(calibration["run_id"])
    assert run.data.tags["tabcons.role"] == "calibration"
    assert run.data.metrics["calibrated_sigma"] == calibration["sigma"]
    assert run.data.tags["tabcons.calibrated_perturb"] == calibration["perturb"]
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
        assert parent.data.params["scorer.perturb"] == calibration["perturb"]
        assert not math.isnan(parent.data.metrics["mean_consistency"])


def test_rows_that_fill_up_the_validation_split_were_never_trained_on(tiny_model_dir):
    from mlflow_tabcons.data.tables import split_dataset
    from mlflow_tabcons.tracking.calibration import held_out_rows
    from mlflow_tabcons.tracking.config import TrainingConfig
    from mlflow_tabcons.tracking.prepared import prepare_data

    config = TrainingConfig(data="diabetes", model=tiny_model_dir, shots=24, seeds=2, register=None)
    data = prepare_data(config)
    unused = len(split_dataset(data.dataset).train) - config.shots
    rows = held_out_rows(config, data, len(data.validation) + unused)  # every training-split row outside the shots
    assert len(rows) == len(data.validation) + unused
    trained_on = {tuple(ids.tolist()) for ids in data.train.input_ids}
    assert not trained_on & {tuple(ids.tolist()) for ids in rows.input_ids}
