"""`mlflow models serve -m models:/NAME@ALIAS` on a real server: answers, params, and refusals that keep it serving."""

import contextlib
import json
import os
import sys

import mlflow
import numpy as np
import pytest
from conftest import (
    build_tabcons_model,
    forget_mlflow_uris,
    pick_free_port,
    randomize_adapters,
    register_in_sqlite,
    require_service,
    running_server,
)


requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow

NAME, ALIAS = "tabcons-serving-test", "live"


def _free_port() -> int:
    try:
        return pick_free_port()
    except OSError as error:
        require_service(f"no free TCP port on 127.0.0.1: {error}")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tabcons_model, diabetes_features):
    """A SQLite registry holding the model as NAME with alias @live."""
    uri = register_in_sqlite(tmp_path_factory.mktemp("serving"), NAME, tabcons_model, diabetes_features.head(2))
    mlflow.MlflowClient().set_registered_model_alias(NAME, ALIAS, 1)
    yield uri
    forget_mlflow_uris()


@contextlib.contextmanager
def serving(model_uri, log_dir, **env):
    """A real `mlflow models serve -m model_uri` on a free port until the block ends; yields its URL."""
    port = _free_port()
    # the server runs `uvicorn` from PATH: the one installed next to this Python
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": path, **env}
    with running_server(command, env=env, ready_url=f"{url}/ping", log_path=log_dir / "server.log"):
        yield url


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    stores = {"MLFLOW_TRACKING_URI": registry, "MLFLOW_REGISTRY_URI": registry}
    with serving(f"models:/{NAME}@{ALIAS}", tmp_path_factory.mktemp("serve"), **stores) as url:
        yield url


@pytest.fixture(scope="module")
def local_model(registry):
    return mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")


def _invoke(url, body):
    # json.dumps writes NaN as the literal MLflow's parser reads (requests' json= refuses it)
    return requests.post(f"{url}/invocations", data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=120)


def _assert_same_answers(records, expected, atol=1e-12):
    assert [r["prediction"] for r in records] == list(expected["prediction"])
    assert [r["certified"] for r in records] == list(expected["certified"])
    for column in ("probability", "consistency", "consistency_lcb"):
        np.testing.assert_allclose([r[column] for r in records], expected[column], rtol=0, atol=atol, err_msg=column)


def test_records_and_split_requests_answer_like_in_process_predict(server, local_model, diabetes_features):
    rows = diabetes_features.iloc[20:25]
    params = {"seed": 3}
    expected = local_model.predict(rows, params=params)
    by_records = _invoke(server, {"dataframe_records": rows.to_dict(orient="records"), "params": params})
    assert by_records.status_code == 200, by_records.text
    _assert_same_answers(by_records.json()["predictions"], expected)
    split = rows.to_dict(orient="split")
    by_split = _invoke(server, {"dataframe_split": {"columns": split["columns"], "data": split["data"]}, "params": params})
    assert by_split.status_code == 200, by_split.text
    _assert_same_answers(by_split.json()["predictions"], expected)


def test_inference_params_travel_in_the_request(server, local_model, diabetes_features):
    rows = diabetes_features.iloc[:3]
    for params in ({"k": 8, "sigma": 1.5, "alpha": 0.01, "seed": 9}, {"score": False}):
        answer = _invoke(server, {"dataframe_records": rows.to_dict(orient="records"), "params": params})
        assert answer.status_code == 200, answer.text
        records = answer.json()["predictions"]
        expected = local_model.predict(rows, params=params)
        if params.get("score") is False:
            assert all(r["certified"] is False and r["consistency"] is None and r["consistency_lcb"] is None for r in records)
            np.testing.assert_allclose([r["probability"] for r in records], expected["probability"], atol=1e-12)
        else:
            _assert_same_answers(records, expected)


def _records(features, **changes):
    rows = features.iloc[:2].to_dict(orient="records")
    for row in rows:
        row.update(changes)
    return rows


MALFORMED = {
    "missing column": (lambda f: {"dataframe_records": [{k: v for k, v in r.items() if k != "bmi"} for r in _records(f)]}, "bmi"),
    "wrong type": (lambda f: {"dataframe_records": _records(f, age="old")}, "age"),
    "null value": (lambda f: {"dataframe_records": _records(f, bmi=None)}, "column 'bmi' has missing values"),
    "NaN value": (lambda f: {"dataframe_split": {"columns": list(f.columns), "data": [[1, 90, 70, 30, float("nan"), 0.3, 40]]}},
                  "column 'bmi' has missing values"),
    "empty table": (lambda f: {"dataframe_split": {"columns": list(f.columns), "data": []}}, "no rows"),
    "score not a bool": (lambda f: {"dataframe_records": _records(f), "params": {"score": "maybe"}}, "score"),
    "k not a number": (lambda f: {"dataframe_records": _records(f), "params": {"k": "many"}}, "'k'"),
    "k=0": (lambda f: {"dataframe_records": _records(f), "params": {"k": 0}}, "k must be >= 2, got 0"),
    "huge k": (lambda f: {"dataframe_records": _records(f), "params": {"k": 1_000_000_000}}, "cap of 4096"),
    "negative sigma": (lambda f: {"dataframe_records": _records(f), "params": {"sigma": -1.0}}, "sigma must be in"),
    "alpha out of range": (lambda f: {"dataframe_records": _records(f), "params": {"alpha": 2.0}}, "alpha must be in"),
    "alpha above the packaged": (lambda f: {"dataframe_records": _records(f), "params": {"alpha": 0.5}},
                                 "above the packaged alpha 0.05: a request may not make 'certified' weaker"),
    "sigma below the packaged": (lambda f: {"dataframe_records": _records(f), "params": {"sigma": 0.01}},
                                 "below the packaged sigma 0.5"),
    "no data key": (lambda f: {"rows": _records(f)}, "dataframe_split"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_a_400_with_the_reason_and_the_server_keeps_serving(server, local_model, diabetes_features, case):
    body, reason = MALFORMED[case]
    answer = _invoke(server, body(diabetes_features))
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    assert reason in answer.json()["message"], answer.text
    rows = diabetes_features.iloc[:2]
    again = _invoke(server, {"dataframe_records": rows.to_dict(orient="records")})
    assert again.status_code == 200, again.text
    _assert_same_answers(again.json()["predictions"], local_model.predict(rows))


def test_body_that_is_not_json_is_refused(server):
    answer = requests.post(f"{server}/invocations", data="{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert answer.status_code == 400


def test_an_undeclared_param_is_ignored_by_mlflow_not_applied(server, local_model, diabetes_features):
    rows = diabetes_features.iloc[:2]
    answer = _invoke(server, {"dataframe_records": rows.to_dict(orient="records"), "params": {"tau": -1.0}})
    assert answer.status_code == 200, answer.text
    _assert_same_answers(answer.json()["predictions"], local_model.predict(rows))


def test_a_served_decoder_member_answers_like_in_process_predict(tiny_dirs, diabetes_features, tmp_path):
    """A tiny Llama member behind a real `mlflow models serve`: its verbalizer's answers and S survive the server."""
    from mlflow_tabcons import flavor

    model_dir = tmp_path / "llama"
    model = randomize_adapters(build_tabcons_model(tiny_dirs["llama"], k=8))
    flavor.save_model(model, model_dir, input_example=diabetes_features.head(2))
    local = mlflow.pyfunc.load_model(str(model_dir))
    assert local.get_raw_model().spec.family == "decoder"
    rows = diabetes_features.iloc[20:25]
    with serving(str(model_dir), tmp_path) as url:
        for params in ({"seed": 3}, {"k": 12, "sigma": 1.5, "seed": 9}, {"score": False}):
            answer = _invoke(url, {"dataframe_records": rows.to_dict(orient="records"), "params": params})
            assert answer.status_code == 200, answer.text
            records, expected = answer.json()["predictions"], local.predict(rows, params=params)
            if params.get("score") is False:
                assert all(r["consistency"] is None and r["certified"] is False for r in records)
                assert [r["prediction"] for r in records] == list(expected["prediction"])
                np.testing.assert_allclose([r["probability"] for r in records], expected["probability"], rtol=0, atol=1e-5)
            else:
                _assert_same_answers(records, expected, atol=1e-5)
