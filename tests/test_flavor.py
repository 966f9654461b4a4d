"""The tabcons flavor: save/load round trips, the signature, inference params, refusals, and `main` registering it."""

import dataclasses
import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import build_tabcons_model, build_tiny_checkpoint
from mlflow.exceptions import MlflowException

from mlflow_tabcons import flavor
from mlflow_tabcons.cli import cli
from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.gate.artifacts import content_digest
from mlflow_tabcons.gate.evidence import EVIDENCE_TAG, verify_evidence
from mlflow_tabcons.flavor import TabconsModel
from mlflow_tabcons.scoring.onnx import OnnxBackend

ANSWER = ["prediction", "probability", "consistency", "consistency_lcb", "certified"]


@pytest.fixture(scope="module")
def saved(tabcons_model, diabetes_features, tmp_path_factory):
    path = tmp_path_factory.mktemp("flavor") / "model"
    flavor.save_model(tabcons_model, path, input_example=diabetes_features.head(2))
    return path


@pytest.fixture(scope="module")
def pyfunc_model(saved):
    return mlflow.pyfunc.load_model(str(saved))


def test_mlmodel_has_its_own_flavor_and_python_function(saved, tabcons_model):
    mlmodel = yaml.safe_load((saved / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow_tabcons.flavor"
    entry = mlmodel["flavors"]["tabcons"]
    assert entry["backend"] == "torch" and entry["labels"] == ["No", "Yes"]
    assert entry["scorer"]["k"] == tabcons_model.settings.k
    for packed in ("classifier/encoder", "classifier/head.safetensors", "tokenizer", "tabcons.json"):
        assert (saved / "data" / packed).exists(), packed
    requirements = (saved / "requirements.txt").read_text()
    assert "torch==" in requirements and "mlflow-tabcons" not in requirements and "+" not in requirements
    assert (saved / "code" / "mlflow_tabcons" / "flavor" / "__init__.py").is_file()  # the package travels inside the model
    assert mlmodel["flavors"]["python_function"]["code"] == "code"


def test_pins_hold_where_only_mlflow_skinny_is_installed(monkeypatch):
    """No ``mlflow`` or ``pyyaml`` distribution metadata (mlflow-skinny, a vendored yaml): pins come from the modules."""
    import importlib.metadata

    import importlib_metadata  # the backport MLflow reads

    from mlflow_tabcons.flavor.environment import public_pin

    for module in (importlib.metadata, importlib_metadata):
        def version(package, found=module.version, missing=module.PackageNotFoundError):
            if package in ("mlflow", "pyyaml"):
                raise missing(package)
            return found(package)

        monkeypatch.setattr(module, "version", version)
    assert public_pin("mlflow") == f"mlflow=={mlflow.__version__}"
    assert public_pin("pyyaml") == f"pyyaml=={yaml.__version__}"


def test_signature_declares_the_columns_the_answer_and_the_params(pyfunc_model, diabetes_features):
    signature = pyfunc_model.metadata.signature
    assert signature.inputs.input_names() == list(diabetes_features.columns)
    assert dict(zip(signature.inputs.input_names(), [t.name for t in signature.inputs.input_types()]))["bmi"] == "double"
    assert signature.outputs.input_names() == ANSWER
    params = {p.name: (p.dtype.name, p.default) for p in signature.params.params}
    assert params == {"k": ("long", 16), "sigma": ("double", 0.5), "alpha": ("double", 0.05),
                      "seed": ("long", 0), "score": ("boolean", True)}


def test_native_pyfunc_and_in_memory_answers_agree(saved, pyfunc_model, tabcons_model, diabetes_features):
    rows = diabetes_features.iloc[:6]
    expected = tabcons_model.predict(rows)
    native = flavor.load_model(str(saved))
    assert isinstance(native, TabconsModel) and native.settings == tabcons_model.settings
    pd.testing.assert_frame_equal(native.predict(rows), expected, atol=1e-6, rtol=0)
    answer = pyfunc_model.predict(rows)
    assert list(answer.columns) == ANSWER
    pd.testing.assert_frame_equal(answer, expected, atol=1e-6, rtol=0)
    assert set(answer["prediction"]) <= {"No", "Yes"}
    assert np.all(answer["consistency_lcb"] < answer["consistency"])
    assert list(answer["certified"]) == list(answer["consistency_lcb"] > tabcons_model.settings.tau)


def test_a_row_scores_the_same_alone_and_inside_a_batch(pyfunc_model, diabetes_features):
    batch = pyfunc_model.predict(diabetes_features.iloc[:5])
    alone = pyfunc_model.predict(diabetes_features.iloc[[3]])
    pd.testing.assert_frame_equal(alone.reset_index(drop=True), batch.iloc[[3]].reset_index(drop=True))


def test_inference_params_change_the_answer_as_declared(pyfunc_model, diabetes_features):
    rows = diabetes_features.iloc[:4]
    default = pyfunc_model.predict(rows)
    assert pyfunc_model.predict(rows, params={"seed": 0}).equals(default)
    reseeded = pyfunc_model.predict(rows, params={"seed": 7})
    assert not np.allclose(reseeded["consistency"], default["consistency"])
    np.testing.assert_allclose(reseeded["probability"], default["probability"])
    wider = pyfunc_model.predict(rows, params={"sigma": 3.0})
    assert not np.allclose(wider["consistency"], default["consistency"])
    more = pyfunc_model.predict(rows, params={"k": 64})
    # more neighbours tighten the bound: the gap between S and its lower bound shrinks
    assert np.all((more["consistency"] - more["consistency_lcb"]) < (default["consistency"] - default["consistency_lcb"]))
    stricter = pyfunc_model.predict(rows, params={"alpha": 0.001})
    assert np.all(stricter["consistency_lcb"] < default["consistency_lcb"])
    for weaker in ({"alpha": 0.5}, {"sigma": 0.1}):  # a caller cannot make 'certified' weaker than the packaged protocol
        with pytest.raises(MlflowException, match="may not make 'certified' weaker") as caught:
            pyfunc_model.predict(rows, params=weaker)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    fast = pyfunc_model.predict(rows, params={"score": False})
    assert fast["consistency"].isna().all() and fast["consistency_lcb"].isna().all() and not fast["certified"].any()
    assert fast.loc[0, "consistency"] is None  # JSON null when served, not NaN
    assert list(fast["prediction"]) == list(default["prediction"])
    np.testing.assert_allclose(fast["probability"], default["probability"])


@pytest.mark.parametrize(
    "mangle, params, message",
    [
        (lambda f: f.iloc[:0], None, "the input has no rows"),
        (lambda f: f.drop(columns=["bmi"]), None, "bmi"),
        (lambda f: f.assign(bmi=np.nan), None, "column 'bmi' has missing values in row(s) [0, 1]"),
        (lambda f: f.assign(age="old"), None, "age"),
        (lambda f: f, {"k": 0}, "k must be >= 2, got 0"),
        (lambda f: f, {"k": 10**7}, "above this model's cap of 4096"),
        (lambda f: f, {"sigma": 0.0}, "sigma must be in"),
        (lambda f: f, {"alpha": 1.0}, "alpha must be in (0.0, 1.0)"),
        (lambda f: f, {"seed": -1}, "seed must be between 0"),
        (lambda f: f, {"score": "maybe"}, "score"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(pyfunc_model, diabetes_features, mangle, params, message):
    with pytest.raises(MlflowException) as caught:
        pyfunc_model.predict(mangle(diabetes_features.head(2)), params=params)
    assert caught.value.get_http_status_code() == 400
    assert message in caught.value.message


def test_the_pyfunc_refuses_params_it_does_not_know(saved, diabetes_features):
    # MLflow drops undeclared params (with a warning) before the model sees them; called directly, the model refuses
    with pytest.raises(MlflowException, match=r"unknown inference param\(s\) \['tau'\]"):
        flavor._load_pyfunc(str(saved / "data")).predict(diabetes_features.head(1), {"tau": 0.1})


def test_loading_needs_nothing_but_the_model_directory(tmp_path, diabetes_features):
    checkpoint = build_tiny_checkpoint(tmp_path / "checkpoint", layers=2, seed=3)
    model = build_tabcons_model(str(checkpoint), seed=3)
    expected = model.predict(diabetes_features.head(3))
    flavor.save_model(model, tmp_path / "model", input_example=diabetes_features.head(2))
    shutil.rmtree(checkpoint)  # the base checkpoint is gone: weights and tokenizer must be inside the model
    loaded = flavor.load_model(str(tmp_path / "model"))
    pd.testing.assert_frame_equal(loaded.predict(diabetes_features.head(3)), expected, atol=1e-6, rtol=0)


def test_bfloat16_scoring_travels_with_the_model_and_onnx_refuses_it(tabcons_model, tmp_path, diabetes_features):
    fast = dataclasses.replace(tabcons_model, settings=dataclasses.replace(tabcons_model.settings, precision="bfloat16"),
                               backend=None)
    flavor.save_model(fast, tmp_path / "model")
    loaded = flavor.load_model(str(tmp_path / "model"))
    assert loaded.settings.precision == "bfloat16" and loaded.backend.precision == "bfloat16"
    rows = diabetes_features.head(4)
    exact, rounded = tabcons_model.predict(rows), loaded.predict(rows)
    np.testing.assert_allclose(rounded["probability"], exact["probability"], atol=0.03)
    assert not np.array_equal(rounded["probability"], exact["probability"])
    with pytest.raises(TabconsInputError, match="ONNX backend runs float32 only"):
        flavor.load_model(str(tmp_path / "model"), backend="onnx")
    with pytest.raises(TabconsInputError, match="ONNX backend runs float32 only"):
        flavor.save_model(fast, tmp_path / "onnx-model", backend="onnx")
    assert not (tmp_path / "onnx-model").exists()


def test_main_registers_the_reference_member_with_signed_evidence_and_the_chosen_backend(tracking_uri, tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TABCONS_EVIDENCE_KEY", "k" * 32)
    args = ["train", "--data", "diabetes", "--model", tiny_model_dir, "--shots", "24", "--epochs", "1", "--eval-rows", "12",
            "--k", "16", "--batch-size", "8", "--seeds", "2", "--register", "pima-{dataset}", "--serve-backend", "onnx"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "models:/pima-diabetes/1" in result.output
    client = mlflow.MlflowClient()
    version = client.get_model_version("pima-diabetes", "1")
    parent = client.get_run(version.run_id)
    assert parent.data.tags["tabcons.role"] == "ensemble"
    assert parent.data.tags["tabcons.registered_model"] == "pima-diabetes"
    assert parent.data.tags["tabcons.registered_version"] == "1"
    evidence = verify_evidence(version.tags[EVIDENCE_TAG], b"k" * 32)
    assert evidence.run_id == parent.info.run_id and evidence.n_eval == 12 and evidence.k == 16
    assert evidence.certified_fraction == pytest.approx(parent.data.metrics["certified_fraction"])

    assert evidence.members == 2 and evidence.tau == 0.5 and evidence.variance_bound == 1.0 and evidence.training["shots"] == "24"
    assert evidence.members_learned == (parent.data.metrics["members_learned"] == 1.0)

    model = flavor.load_model("models:/pima-diabetes/1", dst_path=str(tmp_path))
    # bound to the files stored for this version, at the location the registry resolved when it was created
    assert evidence.artifact == client.get_model_version_download_uri("pima-diabetes", "1")
    assert evidence.model_sha256 == content_digest(evidence.artifact)
    assert {**model.evidence, "artifact": evidence.artifact, "model_sha256": evidence.model_sha256} == evidence.to_dict()
    assert isinstance(model.backend, OnnxBackend)
    table = mlflow.load_table("tabcons/rows.json", run_ids=[parent.info.run_id])
    features = table[model.columns]
    answer = model.predict(features)
    # the packaged model (in ONNX Runtime) answers the evaluation rows as the training job (in PyTorch) scored them
    assert list(answer["prediction"]) == list(table["predicted"])
    np.testing.assert_allclose(answer["consistency"], table["consistency"], atol=1e-4)
    assert list(answer["certified"]) == list(table["certified"])
    example = json.loads((tmp_path / "input_example.json").read_text())
    assert example["columns"] == model.columns


def test_a_bad_registered_name_is_refused_before_training(tracking_uri, tiny_model_dir):
    result = CliRunner().invoke(cli, ["train", "--data", "diabetes", "--model", tiny_model_dir, "--register", "a/b"])
    assert result.exit_code == 2
    assert "--register must be a model name" in result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.slow
def test_real_minilm_weights_round_trip_through_the_flavor(tmp_path, diabetes_features):
    from mlflow_tabcons.members.checkpoints import resolve_model_path

    model = build_tabcons_model(resolve_model_path("minilm"), k=8)
    rows = diabetes_features.head(3)
    expected = model.predict(rows)
    flavor.save_model(model, tmp_path / "model", input_example=rows.head(1))
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    pd.testing.assert_frame_equal(loaded.predict(rows), expected, atol=1e-5, rtol=0)
    assert loaded.get_raw_model().classifier.config.hidden_size == 384


@pytest.mark.parametrize(
    "template, dataset, expected",
    [("tabcons-{dataset}", "credit-g", "tabcons-credit-g"), ("tabcons-{dataset}", "My Loans (2024)", "tabcons-my-loans-2024"),
     ("risk-model", "credit-g", "risk-model"), ("{dataset}", "pima_v2.1", "pima_v2.1")],
)
def test_registered_names_fill_in_a_registry_safe_dataset_name(template, dataset, expected):
    from mlflow_tabcons.tracking.config import registered_model_name

    assert registered_model_name(template, dataset) == expected


@pytest.mark.parametrize("template", ["", "   ", "a/b", "models:x"])
def test_registered_names_that_cannot_be_model_uris_are_refused(template):
    from mlflow_tabcons.errors import TabconsInputError
    from mlflow_tabcons.tracking.config import registered_model_name

    with pytest.raises(TabconsInputError, match="--register must be a model name"):
        registered_model_name(template, "credit-g")
