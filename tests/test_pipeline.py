"""The `main` job end to end on a tiny real BERT: runs, metrics, table, plots, failures, bad input."""


import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from mlflow_tabcons.cli import cli
from mlflow_tabcons.data.tables import few_shot, load_dataset, outside_few_shot, split_dataset, stratified_sample
from mlflow_tabcons.members.training import EnsembleTrainer, TrainSettings
from mlflow_tabcons.tracking.prepared import evaluation_rows_first

FAST = ["--shots", "24", "--epochs", "1", "--eval-rows", "20", "--k", "16", "--batch-size", "8"]


def _train(tiny_model_dir, *extra):
    return CliRunner().invoke(cli, ["train", "--data", "diabetes", "--model", tiny_model_dir, *FAST, *extra])


def _runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_train_logs_parent_children_metrics_table_and_plots(tracking_uri, tiny_model_dir):
    result = _train(tiny_model_dir, "--seeds", "2")
    assert result.exit_code == 0, result.output
    runs = _runs()
    parents = [r for r in runs if r.data.tags.get("tabcons.role") == "ensemble"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    metrics = parent.data.metrics
    # tiny members rarely rank the validation rows above chance: one of them may be replaced by seed 2
    kept = sorted(int(r.data.params["seed"]) for r in children if r.data.tags["tabcons.replaced"] == "false")
    replaced = sorted(int(r.data.params["seed"]) for r in children if r.data.tags["tabcons.replaced"] == "true")
    assert len(kept) == 2 and len(replaced) == metrics["members_replaced"] <= 1
    assert sorted(kept + replaced) == list(range(2 + len(replaced)))
    assert all(r.info.status == "FINISHED" for r in children + [parent])
    for child in children:
        history = mlflow.MlflowClient().get_metric_history(child.info.run_id, "train_loss")
        assert [m.step for m in history] == [1]
        assert {"accuracy", "balanced_accuracy", "auroc", "val_accuracy", "majority_rate"} <= set(child.data.metrics)
    for key in (f"accuracy_seed_{kept[0]}", f"accuracy_seed_{kept[1]}", "accuracy_mean", "arbitrariness", "mean_pairwise_disagreement",
                "mean_prediction_variance", "mean_prediction_range", "certified_fraction", "certified_fraction_lower",
                "certified_fraction_upper", "members_succeeded", "balanced_accuracy_mean", "majority_rate",
                "baseline_logistic_accuracy", "baseline_logistic_auroc", "baseline_boosting_accuracy", "baseline_boosting_auroc",
                "baseline_logistic_majority_pvalue", "baseline_boosting_majority_pvalue"):
        assert key in metrics, key
    assert metrics["members_succeeded"] == 2
    # accuracy and the learning test read every row no member saw (the test split and the training split
    # outside the shots); S only the 20 scored ones
    split = split_dataset(load_dataset("diabetes"))
    unseen = outside_few_shot(split.train, "type", 24, seed=0)
    test_labels = pd.concat([split.test["type"], unseen["type"]])
    assert parent.data.params["n_test"] == str(len(test_labels)) and parent.data.params["n_eval"] == "20"
    assert metrics["majority_rate"] == pytest.approx(float(test_labels.value_counts(normalize=True).max()))
    assert metrics[f"accuracy_seed_{kept[0]}"] * len(test_labels) == pytest.approx(round(metrics[f"accuracy_seed_{kept[0]}"] * len(test_labels)))
    assert f"on {len(test_labels)} unseen rows; on the 20 scored" in result.output
    assert parent.data.tags["tabcons.members_learned"] == ("true" if metrics["members_learned"] == 1.0 else "false")
    assert 0.0 <= metrics[f"majority_test_pvalue_seed_{kept[0]}"] <= 1.0
    assert metrics["certified_fraction_lower"] <= metrics["certified_fraction"] <= metrics["certified_fraction_upper"]
    assert parent.data.params["scorer.k"] == "16" and parent.data.params["seeds"] == "2"

    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "tabcons")}
    assert {"tabcons/rows.json", "tabcons/consistency_vs_range.png", "tabcons/consistency_histogram.png",
            "tabcons/recipe_trials.json", "tabcons/recipe.json"} <= artifacts
    trials = mlflow.load_table("tabcons/recipe_trials.json", run_ids=[parent.info.run_id])
    assert len(trials) == metrics["recipe_trials"] == 7 and set(trials["numbers"]) == {"plain", "words"}
    chosen = parent.data.params
    assert chosen["recipe.numbers"] in ("plain", "words") and int(chosen["recipe.train.epochs"]) == 1
    assert parent.data.params["serialized_numbers"] == chosen["recipe.numbers"]
    assert {child.data.params["train.learning_rate"] for child in children} == {chosen["recipe.train.learning_rate"]}
    table = mlflow.load_table("tabcons/rows.json", run_ids=[parent.info.run_id])
    assert len(table) == 20
    first, second = (f"probability_seed_{seed}" for seed in kept)
    assert not {f"probability_seed_{seed}" for seed in replaced} & set(table.columns)
    for column in ("label", "predicted", first, second, "consistency", "consistency_lcb", "certified",
                   "prediction_variance", "prediction_range", "glu", "bmi"):
        assert column in table.columns, column
    assert np.all(table["consistency_lcb"] < table["consistency"])
    spread = (table[first] - table[second]).abs()
    np.testing.assert_allclose(table["prediction_range"], spread, atol=1e-6)
    assert metrics["arbitrariness"] == pytest.approx(float((table["pairwise_disagreement"] > 0).mean()))
    assert "certified fraction" in result.output
    assert f"logistic regression accuracy {metrics['baseline_logistic_accuracy']:.3f}" in result.output
    pvalue = f"logistic regression p = {metrics['baseline_logistic_majority_pvalue']:.3f}"
    assert (pvalue in result.output) == (metrics["members_learned"] == 0.0)


def test_the_scored_rows_come_first_and_every_test_row_is_kept():
    test = split_dataset(load_dataset("diabetes")).test
    frame, scored = evaluation_rows_first(test, "type", 20, seed=3)
    assert scored == 20 and len(frame) == len(test)
    pd.testing.assert_frame_equal(frame.iloc[:20], stratified_sample(test, "type", 20, seed=3))
    columns = list(test.columns)
    pd.testing.assert_frame_equal(frame.sort_values(columns).reset_index(drop=True), test.sort_values(columns).reset_index(drop=True))
    whole, scored = evaluation_rows_first(test, "type", 0, seed=3)
    pd.testing.assert_frame_equal(whole, test)
    assert scored == len(test)
    capped, scored = evaluation_rows_first(test, "type", 20, seed=3, max_rows=50)
    assert scored == 20 and len(capped) == 50 and not capped.duplicated().any()
    pd.testing.assert_frame_equal(capped.iloc[:20], frame.iloc[:20])
    assert len(capped.merge(test)) == 50  # every kept row is a test row


def test_the_members_are_also_judged_on_the_training_rows_outside_the_shots():
    split = split_dataset(load_dataset("diabetes"))
    shots, unseen = few_shot(split.train, "type", 24, seed=0), outside_few_shot(split.train, "type", 24, seed=0)
    assert len(shots) + len(unseen) == len(split.train) and shots.merge(unseen).empty
    frame, scored = evaluation_rows_first(split.test, "type", 20, seed=3, unseen=unseen[list(reversed(unseen.columns))])
    assert scored == 20 and len(frame) == len(split.test) + len(unseen) and list(frame.columns) == list(split.test.columns)
    pd.testing.assert_frame_equal(frame.iloc[:20], stratified_sample(split.test, "type", 20, seed=3))
    assert len(frame.merge(shots)) == 0  # never a row a member trained on
    assert len(frame.iloc[:20].merge(unseen)) == 0  # S keeps to the test split
    capped, _ = evaluation_rows_first(split.test, "type", 20, seed=3, max_rows=200, unseen=unseen)
    assert len(capped) == 200 and not capped.duplicated().any() and 0 < len(capped.iloc[20:].merge(unseen)) < 180


def test_a_fixed_recipe_trains_every_member_as_configured(tracking_uri, tiny_model_dir):
    result = _train(tiny_model_dir, "--seeds", "2", "--recipe", "fixed", "--numbers", "words", "--lr", "0.002")
    assert result.exit_code == 0, result.output
    parent = next(r for r in _runs() if r.data.tags.get("tabcons.role") == "ensemble")
    assert not any(key.startswith("recipe.") for key in parent.data.params) and "recipe_trials" not in parent.data.metrics
    assert parent.data.params["serialized_numbers"] == "words"
    children = [r for r in _runs() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {child.data.params["train.learning_rate"] for child in children} == {"0.002"}
    table = mlflow.load_table("tabcons/rows.json", run_ids=[parent.info.run_id])
    assert len(table) == 20


def test_a_failing_member_marks_its_child_and_the_parent_carries_on(tracking_uri, tiny_model_dir, monkeypatch):
    original = EnsembleTrainer.train_member

    def flaky(self, seed, **kwargs):
        if seed == 1:
            raise RuntimeError("simulated out-of-memory")
        return original(self, seed, **kwargs)

    monkeypatch.setattr(EnsembleTrainer, "train_member", flaky)
    result = _train(tiny_model_dir, "--seeds", "3")
    assert result.exit_code == 0, result.output
    runs = {r.info.run_name: r for r in _runs()}
    assert runs["seed-1"].info.status == "FAILED"
    assert runs["seed-1"].data.tags["tabcons.error"] == "RuntimeError: simulated out-of-memory"
    assert runs["seed-0"].info.status == runs["seed-2"].info.status == "FINISHED"
    parent = next(r for r in runs.values() if r.data.tags.get("tabcons.role") == "ensemble")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["members_succeeded"] == 2 and parent.data.metrics["members_failed"] == 1
    assert parent.data.tags["tabcons.members"] == "2 of 3 succeeded"


def test_too_few_members_fails_the_parent_with_the_reason(tracking_uri, tiny_model_dir, monkeypatch):
    def broken(self, seed, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(EnsembleTrainer, "train_member", broken)
    result = _train(tiny_model_dir, "--seeds", "2")
    assert result.exit_code != 0
    assert "only 0 of 2 members trained" in result.output
    parent = next(r for r in _runs() if r.data.tags.get("tabcons.role") == "ensemble")
    assert parent.info.status == "FAILED"


@pytest.fixture()
def bad_tables(tmp_path):
    pd.DataFrame({"x": [1, 2, 3, 4], "y": [0, 0, 0, 0]}).to_csv(tmp_path / "one_class.csv", index=False)
    pd.DataFrame({"x": [1, 2, 3, 4], "y": [0, None, 1, 1]}).to_csv(tmp_path / "nan_target.csv", index=False)
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "no-such-dataset"], "unknown dataset 'no-such-dataset'"),
        (["--data", "diabetes", "--target", "nope"], "target column 'nope' not in dataset"),
        (["--data", "{tmp}/one_class.csv", "--target", "y"], "single class"),
        (["--data", "{tmp}/nan_target.csv", "--target", "y"], "missing value"),
        (["--data", "diabetes", "--shots", "5000"], "shots=5000 is larger than"),
        (["--data", "diabetes", "--seeds", "1"], "seeds must be between 2"),
        (["--data", "diabetes", "--k", "1"], "k must be between 2"),
        (["--data", "diabetes", "--sigma", "0"], "sigma must be in"),
        (["--data", "diabetes", "--sigma", "-0.5"], "sigma must be in"),
        (["--data", "diabetes", "--alpha", "1.5"], "alpha must be in (0.0, 1.0)"),
        (["--data", "diabetes", "--alpha", "0"], "alpha must be in"),
        (["--data", "diabetes", "--eval-rows", "100000"], "eval_rows=100000 is larger than"),
        (["--data", "diabetes", "--serve-backend", "onnx", "--scorer-precision", "bfloat16"], "ONNX backend runs float32 only"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_no_run(tracking_uri, tiny_model_dir, bad_tables, args, message):
    args = [a.replace("{tmp}", str(bad_tables)) for a in args]
    result = CliRunner().invoke(cli, ["train", "--model", tiny_model_dir, *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert _runs() == []


@pytest.mark.slow
def test_real_minilm_ensemble_learns_and_is_scored(tracking_uri):
    """The default path on the packaged MiniLM weights: members learn (loss falls) and every row is scored."""
    from mlflow_tabcons.scoring.consistency import ScorerSettings
    from mlflow_tabcons.tracking.config import TrainingConfig
    from mlflow_tabcons.tracking.training_job import run_training

    config = TrainingConfig(
        data="credit-g", shots=32, seeds=2, eval_rows=8,
        train=TrainSettings(epochs=3), scorer=ScorerSettings(k=8), register=None,
    )
    outcome = run_training(config)
    assert outcome.members[0].classifier.config.hidden_size == 384  # MiniLM-L6, not a stand-in
    for member in outcome.members:
        losses = [record["train_loss"] for record in member.history]
        assert losses[-1] < losses[0], (member.seed, losses)
    assert len(outcome.rows) == 8 and outcome.rows["consistency"].between(-1, 1).all()
    assert mlflow.get_run(outcome.parent_run_id).data.metrics["members_succeeded"] == 2
