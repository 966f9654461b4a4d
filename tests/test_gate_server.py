"""The gate behind a real `mlflow server` (started by `tabcons server`), over /api/2.0 and the UI's /ajax-api/2.0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import requests
from conftest import ADMIN_URI_FIXTURES, SQL_BACKENDS, new_database, pick_free_port, running_server
from gate_support import KEY, POLICY, evidence, new_version
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_tabcons.gate.evidence import EVIDENCE_TAG, FORMAT_VERSION
from mlflow_tabcons.gate import audit_trail

pytestmark = pytest.mark.slow
TABCONS = str(Path(sys.executable).with_name("tabcons"))
PROJECT = Path(__file__).resolve().parents[1]
PREFIXES = ["/api/2.0", "/ajax-api/2.0"]


@pytest.fixture(scope="module", params=SQL_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('gate-server') / 'mlflow.db'}"
        return
    with new_database(request.getfixturevalue(ADMIN_URI_FIXTURES[request.param])) as uri:
        yield uri


def _server_env() -> dict[str, str]:
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "TABCONS_EVIDENCE_KEY": KEY.decode()}


@pytest.fixture(scope="module")
def server(backend: str, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("gate-server-files")
    (root / "policy.yaml").write_text(POLICY)
    port = pick_free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        TABCONS, "server", "--policy", str(root / "policy.yaml"), "--backend-store-uri", backend,
        "--port", str(port), "--workers", "2", "--default-artifact-root", str(root / "artifacts"),
        # two workers importing MLflow on a loaded machine can miss uvicorn's 5 s health check
        "--uvicorn-opts", "--timeout-worker-healthcheck 120",
    ]
    with running_server(command, env=_server_env(), ready_url=f"{url}/health", log_path=root / "server.log"):
        yield url


@pytest.fixture()
def client(server: str) -> MlflowClient:
    return MlflowClient(tracking_uri=server, registry_uri=server)


@pytest.fixture()
def name() -> str:
    return f"credit-{uuid.uuid4().hex[:8]}"


def post(server: str, prefix: str, endpoint: str, body: dict) -> requests.Response:
    return requests.post(f"{server}{prefix}/mlflow/{endpoint}", json=body, timeout=60)


def assert_denied(response: requests.Response, *fragments: str) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["error_code"] == "PERMISSION_DENIED"
    for fragment in fragments:
        assert fragment in body["message"]


def aliases(server: str, name: str) -> dict[str, str]:
    response = requests.get(f"{server}/api/2.0/mlflow/registered-models/get", params={"name": name}, timeout=60)
    return {a["alias"]: a["version"] for a in response.json()["registered_model"].get("aliases", [])}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_alias_refused_over_rest_and_ui_api(server, client, name, prefix):
    champion = new_version(client, name)
    assert post(server, prefix, "registered-models/alias", {"name": name, "alias": "champion", "version": champion.version}).ok
    weak = new_version(client, name, lower=0.6, predictions="1111")
    response = post(server, prefix, "registered-models/alias", {"name": name, "alias": "champion", "version": weak.version})
    assert_denied(response, "0.5482 < 0.8000", "max_churn (against version 1): 1.0000 > 0.3000")
    assert aliases(server, name) == {"champion": champion.version}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_stage_transition_refused_over_rest(server, client, name, prefix):
    weak = new_version(client, name, lower=0.7)
    body = {"name": name, "version": weak.version, "stage": "Production", "archive_existing_versions": False}
    assert_denied(post(server, prefix, "model-versions/transition-stage", body), "point estimate): 0.7500 < 0.8000")
    assert client.get_model_version(name, weak.version).current_stage == "None"


def test_gate_tags_refused_over_rest(server, client, name):
    version = new_version(client, name, lower=0.6)
    forged = json.dumps({"format": FORMAT_VERSION, "evidence": evidence(version.run_id, lower=0.99).to_dict(), "hmac_sha256": "0" * 64})
    tag = {"name": name, "version": version.version, "key": EVIDENCE_TAG, "value": forged}
    assert_denied(post(server, "/api/2.0", "model-versions/set-tag", tag), "tampered evidence")
    deleted = requests.delete(f"{server}/api/2.0/mlflow/model-versions/delete-tag",
                              json={"name": name, "version": version.version, "key": EVIDENCE_TAG}, timeout=60)
    assert_denied(deleted)
    assert_denied(post(server, "/ajax-api/2.0", "model-versions/set-tag", {**tag, "key": "tabcons.verdict.champion"}))
    assert '"certified_fraction_lower": 0.6' in client.get_model_version(name, version.version).tags[EVIDENCE_TAG]


def test_copy_into_a_new_name_over_rest_leaves_nothing(server, client, name):
    weak = new_version(client, name, lower=0.6)
    target = f"prod-{name}"
    assert post(server, "/api/2.0", "registered-models/create", {"name": target}).ok
    body = {"name": target, "source": f"models:/{name}/{weak.version}", "run_id": weak.run_id}
    assert_denied(post(server, "/api/2.0", "model-versions/create", body), f"copy from {name}")
    missing = requests.get(f"{server}/api/2.0/mlflow/registered-models/get", params={"name": target}, timeout=60)
    assert missing.status_code == 404


def test_python_client_copy_over_rest_is_refused_and_leaves_nothing(client, name):
    weak = new_version(client, name, lower=0.6)
    # the REST client's copy (MLflow's AbstractStore) re-wraps the 403, but the reasons survive
    with pytest.raises(MlflowException, match=f"copy from {name}.*0.5482 < 0.8000"):
        client.copy_model_version(f"models:/{name}/{weak.version}", f"prod-{name}")
    assert client.search_registered_models(f"name = 'prod-{name}'") == []


def test_rename_to_dodge_refused_over_rest(server, client, name):
    sandbox = f"sandbox-{name}"
    weak = new_version(client, sandbox, signed=False)
    client.set_registered_model_alias(sandbox, "champion", weak.version)
    assert_denied(post(server, "/ajax-api/2.0", "registered-models/rename", {"name": sandbox, "new_name": name}))
    assert aliases(server, sandbox) == {"champion": weak.version}


def test_python_client_over_rest_fails_fast_with_the_reason(client, name):
    weak = new_version(client, name, accuracy=0.5)
    with pytest.raises(MlflowException, match="min_accuracy: 0.5000 < 0.7000") as caught:
        client.set_registered_model_alias(name, "champion", weak.version)
    assert caught.value.error_code == "PERMISSION_DENIED"


def test_break_glass_is_off_and_an_unchecked_basic_auth_header_names_nobody(server, client, backend, name):
    weak = new_version(client, name, lower=0.6)
    glass = {"name": name, "version": weak.version, "key": "tabcons.break_glass.champion", "value": "INC-7: outage fix"}
    assert_denied(post(server, "/ajax-api/2.0", "model-versions/set-tag", glass), "break-glass is not available")
    forged = requests.post(f"{server}/api/2.0/mlflow/registered-models/alias", auth=("cro-anna", "anything"), timeout=60,
                           json={"name": name, "alias": "champion", "version": weak.version})
    assert_denied(forged, "0.5482 < 0.8000")
    (row,) = [r for r in audit_trail("tabcons+" + backend, name) if r.action == "set_alias"]
    assert row.actor == "unauthenticated" and not row.allowed


def test_tabcons_promote_and_audit_commands(server, client, backend, name):
    weak, strong = new_version(client, name, lower=0.6), new_version(client, name)
    refused = subprocess.run([TABCONS, "promote", name, weak.version, "champion", "--registry-uri", server],
                             capture_output=True, text=True, env=_server_env())
    assert refused.returncode == 1 and "0.5482 < 0.8000" in refused.stderr
    allowed = subprocess.run([TABCONS, "promote", name, strong.version, "champion", "--registry-uri", server],
                             capture_output=True, text=True, env=_server_env())
    assert allowed.returncode == 0 and "allowed" in allowed.stdout, allowed.stderr
    trail = subprocess.run([TABCONS, "audit", name, "--registry-uri", "tabcons+" + backend],
                           capture_output=True, text=True, env=_server_env())
    lines = [line for line in trail.stdout.splitlines() if "set_alias" in line]
    assert [("REFUSED" in lines[0]), ("ALLOWED" in lines[1])] == [True, True], trail.stdout


def test_mlproject_promote_entry_point(server, client, name):
    strong = new_version(client, name)
    env = {**_server_env(), "MLFLOW_TRACKING_URI": server}
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(PROJECT), "-e", "promote", "--env-manager", "local",
         "-P", f"name={name}", "-P", f"version={strong.version}", "-P", f"registry_uri={server}"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert aliases(server, name) == {"champion": strong.version}


def test_evidence_from_a_real_training_run_is_trusted_by_the_gate(server, client, backend, name, tiny_model_dir):
    """`tabcons train --register` against the gated server: the gate judges the numbers the run logged."""
    args = ["train", "--data", "diabetes", "--model", tiny_model_dir, "--shots", "24", "--epochs", "1", "--eval-rows", "12",
            "--k", "16", "--batch-size", "8", "--seeds", "2", "--register", name]
    trained = subprocess.run([TABCONS, *args], capture_output=True, text=True, timeout=900,
                             env={**_server_env(), "MLFLOW_TRACKING_URI": server, "HF_HUB_OFFLINE": "1"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    post(server, "/api/2.0", "registered-models/alias", {"name": name, "alias": "champion", "version": "1"})
    (row,) = [r for r in audit_trail("tabcons+" + backend, name) if r.action == "set_alias"]
    assert row.detail["problems"] == []  # signature, run id and payload all verified
    metrics = client.get_run(client.get_model_version(name, "1").run_id).data.metrics
    values = {c["rule"]: c["value"] for c in row.detail["checks"]}
    assert values["min_certified_fraction"] == pytest.approx(metrics["certified_fraction_lower"])
    assert values["max_arbitrariness"] == pytest.approx(metrics["arbitrariness"])
    assert row.allowed == all(c["passed"] for c in row.detail["checks"])
    assert (aliases(server, name) == {"champion": "1"}) == row.allowed


def test_eight_concurrent_promotions_over_rest(server, client, backend, name):
    """Four candidates pass against the incumbent but disagree with each other: exactly one may win."""
    incumbent = new_version(client, name)
    client.set_registered_model_alias(name, "champion", incumbent.version)
    strong = [new_version(client, name, predictions=p).version for p in ("1000", "0100", "0010", "0001")]
    weak = [new_version(client, name, lower=0.5).version for _ in range(4)]
    barrier = threading.Barrier(8)
    status: dict[str, int] = {}

    def attempt(version: str) -> None:
        barrier.wait()
        status[version] = post(server, "/api/2.0", "registered-models/alias",
                               {"name": name, "alias": "champion", "version": version}).status_code

    threads = [threading.Thread(target=attempt, args=(v,)) for v in strong + weak]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [v for v, code in status.items() if code == 200]
    assert len(winners) == 1 and winners[0] in strong and sorted(status.values()) == [200] + [403] * 7
    assert aliases(server, name) == {"champion": winners[0]}
    rows = [r for r in audit_trail("tabcons+" + backend, name) if r.action == "set_alias"][1:]
    assert sorted(r.version for r in rows) == sorted(strong + weak)
    assert [r.version for r in rows if r.allowed] == winners


def test_server_command_refuses_a_malformed_policy(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("version: 1\naliases:\n  champion:\n    min_certified_fraction: 0.8\n")
    result = subprocess.run([TABCONS, "server", "--policy", str(bad), "--backend-store-uri", f"sqlite:///{tmp_path / 'x.db'}"],
                            capture_output=True, text=True, env=_server_env(), timeout=120)
    assert result.returncode != 0
    assert "line 4" in result.stderr and "on: point or lower" in result.stderr


def test_server_command_refuses_a_verifier_key_equal_to_the_trainer_key(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    env = {**_server_env(), "TABCONS_VERIFIER_KEY": KEY.decode()}
    result = subprocess.run([TABCONS, "server", "--policy", str(policy), "--backend-store-uri", f"sqlite:///{tmp_path / 'x.db'}"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "the verifier key is the trainer key" in result.stderr and not (tmp_path / "x.db").exists()


def test_audit_names_the_authenticated_user(tmp_path, monkeypatch):
    """Behind MLflow's basic-auth app the audit records who asked, not just an address."""
    password = "gate-test-Passw0rd!"
    (tmp_path / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    (tmp_path / "policy.yaml").write_text(POLICY)
    backend, port = f"sqlite:///{tmp_path / 'mlflow.db'}", pick_free_port()
    url = f"http://127.0.0.1:{port}"
    command = [TABCONS, "server", "--policy", str(tmp_path / "policy.yaml"), "--backend-store-uri", backend,
               "--port", str(port), "--workers", "1", "--app-name", "basic-auth",
               "--default-artifact-root", str(tmp_path / "artifacts")]
    env = {**_server_env(), "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "gate-test"}
    with running_server(command, env=env, ready_url=f"{url}/health", log_path=tmp_path / "server.log"):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = MlflowClient(url, url)
        weak = new_version(client, "credit", lower=0.6)
        with pytest.raises(MlflowException, match="0.5482 < 0.8000"):
            client.set_registered_model_alias("credit", "champion", weak.version)
    rows = audit_trail("tabcons+" + backend, "credit")
    assert [r.action for r in rows] == ["set_evidence", "set_alias"]
    assert {r.actor for r in rows} == {"admin"}
