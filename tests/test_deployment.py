"""A registered model rebuilds its own environment: MLflow's environment managers serve it with nothing installed by hand.

One model is logged and registered for the module; its environment is created
once by `mlflow models predict --env-manager virtualenv` (MLflow caches it
under MLFLOW_ENV_ROOT, ~/.mlflow/envs) and reused by `mlflow models serve`
with the default environment manager. The uv test builds its own environment
in a temporary root, so that it really exercises uv. Creating an environment
pip-installs MLflow, torch and transformers: minutes, not seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import forget_mlflow_uris, pick_free_port, register_in_sqlite, require_service, running_server


requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow

NAME = "tabcons-deployment-test"
MODEL_URI = f"models:/{NAME}/1"
ANSWER = {"prediction", "probability", "consistency", "consistency_lcb", "certified"}
ENV_TIMEOUT = 1800  # seconds to create an environment on a slow, shared machine


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tabcons_model, diabetes_features):
    """A SQLite registry holding the model as NAME version 1."""
    root = tmp_path_factory.mktemp("deployment")
    uri = register_in_sqlite(root, NAME, tabcons_model, diabetes_features.head(2))
    local = Path(mlflow.artifacts.download_artifacts(MODEL_URI, dst_path=str(root / "downloaded")))
    yield uri, local
    forget_mlflow_uris()


def _subprocess_env(registry_uri: str, **extra: str) -> dict[str, str]:
    """The caller's environment without PYTHONPATH: the rebuilt environment must find mlflow_tabcons in the model."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    path = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])  # mlflow's own CLI, uvicorn
    return {**env, "PATH": path, "MLFLOW_TRACKING_URI": registry_uri, "MLFLOW_REGISTRY_URI": registry_uri, **extra}


@pytest.fixture(scope="module")
def resolved(registry, tmp_path_factory) -> dict[str, str]:
    """What `pip install -r requirements.txt` would install in a clean venv: {package: version}."""
    _, local = registry
    root = tmp_path_factory.mktemp("clean-venv")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    report = root / "report.json"
    result = subprocess.run(
        [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet",
         "--report", str(report), "-r", str(local / "requirements.txt")],
        capture_output=True, text=True, timeout=ENV_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}


def test_requirements_name_public_packages_only(registry):
    _, local = registry
    requirements = (local / "requirements.txt").read_text().split()
    assert not [line for line in requirements if line.lower().startswith("mlflow-tabcons")]
    assert not [line for line in requirements if "+" in line], "a local version label cannot be installed from an index"
    assert any(line.startswith("torch==") for line in requirements)
    assert (local / "code" / "mlflow_tabcons" / "flavor" / "__init__.py").is_file()
    conda = (local / "conda.yaml").read_text()
    assert "mlflow-tabcons" not in conda and "torch==" in conda


def test_requirements_resolve_in_a_clean_venv(resolved):
    assert "mlflow-tabcons" not in resolved
    for package in ("mlflow", "torch", "transformers", "safetensors"):
        assert package in resolved, f"{package} missing from the resolved environment"


def _torch_is_affordable(torch_version: str) -> None:
    """Skip rather than pull PyTorch's multi-GB CUDA build onto a machine without a GPU."""
    if "+cpu" not in torch_version and not torch.cuda.is_available():
        require_service(
            f"pip would install torch {torch_version} (the CUDA build) here; give pip a CPU wheel first "
            "(PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu or PIP_FIND_LINKS)"
        )


def _predict(registry_uri: str, tmp_path: Path, rows, env_manager: str, **extra_env: str) -> list[dict]:
    request = tmp_path / "input.json"
    request.write_text(json.dumps({"dataframe_split": rows.to_dict(orient="split"), "params": {"k": 8}}, default=str))
    output = tmp_path / "output.json"
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", MODEL_URI, "-i", str(request), "-t", "json",
         "-o", str(output), "--env-manager", env_manager],
        env=_subprocess_env(registry_uri, **extra_env), capture_output=True, text=True, timeout=ENV_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(output.read_text())["predictions"]


def _offline_pyenv(folder: Path) -> dict[str, str]:
    """PATH with a `pyenv` that installs a Python version by linking the one the real pyenv already has.

    `mlflow models predict` builds its environment under a fresh temporary
    PYENV_ROOT, so pyenv would download and compile CPython from python.org,
    which an offline machine cannot reach. Everything after that (the venv,
    pip installing the model's requirements, loading the model) is real.
    """
    real = shutil.which("pyenv")
    if real is None:
        require_service("MLflow's virtualenv environment manager needs pyenv on PATH")
    real_root = subprocess.run([real, "root"], capture_output=True, text=True, check=True).stdout.strip()
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "pyenv"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = install ] && [ -x "{real_root}/versions/$3/bin/python" ]; then\n'
        '  mkdir -p "$PYENV_ROOT/versions" && ln -sfn "' + real_root + '/versions/$3" "$PYENV_ROOT/versions/$3" && exit 0\n'
        "fi\n"
        f'exec "{real}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return {"PATH": os.pathsep.join([str(folder), os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


@pytest.fixture(scope="module")
def virtualenv_predictions(registry, resolved, diabetes_features, tmp_path_factory):
    """`mlflow models predict --env-manager virtualenv`: a fresh venv with the model's requirements pip-installed."""
    _torch_is_affordable(resolved["torch"])
    uri, _ = registry
    folder = tmp_path_factory.mktemp("predict-virtualenv")
    return _predict(uri, folder, diabetes_features.iloc[:3], "virtualenv", **_offline_pyenv(folder / "bin"))


def test_models_predict_in_a_rebuilt_virtualenv(virtualenv_predictions, tabcons_model, diabetes_features):
    assert len(virtualenv_predictions) == 3
    assert all(ANSWER <= set(row) for row in virtualenv_predictions)
    expected = tabcons_model.predict(diabetes_features.iloc[:3], k=8)
    assert [row["prediction"] for row in virtualenv_predictions] == list(expected["prediction"])
    assert [row["certified"] for row in virtualenv_predictions] == list(expected["certified"])


def test_models_serve_with_the_default_environment_manager(registry, virtualenv_predictions, diabetes_features, tmp_path):
    uri, _ = registry
    port = pick_free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL_URI, "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running_server(command, env=_subprocess_env(uri), ready_url=f"{url}/ping", log_path=tmp_path / "serve.log",
                        startup_seconds=ENV_TIMEOUT):
        body = {"dataframe_records": diabetes_features.iloc[:3].to_dict(orient="records"), "params": {"k": 8}}
        answer = requests.post(f"{url}/invocations", data=json.dumps(body), headers={"Content-Type": "application/json"},
                               timeout=300)
    assert answer.status_code == 200, answer.text
    rows = answer.json()["predictions"]
    assert [row["consistency"] for row in rows] == pytest.approx([row["consistency"] for row in virtualenv_predictions])


def _pip_settings_for_uv() -> dict[str, str]:
    """uv does not read pip's configuration: hand it the same extra indexes and wheel folders."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = dict(line.split("=", 1) for line in listed.splitlines() if "=" in line)
    env = {}
    for pip_key, uv_key in (("find-links", "UV_FIND_LINKS"), ("extra-index-url", "UV_EXTRA_INDEX_URL")):
        values = [settings[key].strip("'\"") for key in settings if key.endswith(f".{pip_key}")]
        if os.environ.get(f"PIP_{pip_key.upper().replace('-', '_')}"):
            values.append(os.environ[f"PIP_{pip_key.upper().replace('-', '_')}"])
        if values:
            env[uv_key] = " ".join(values) if uv_key == "UV_EXTRA_INDEX_URL" else ",".join(" ".join(values).split())
    if "UV_EXTRA_INDEX_URL" in env:
        env["UV_INDEX_STRATEGY"] = "unsafe-best-match"  # pip's way: the best version from any index
    return env


def test_models_predict_with_uv(registry, resolved, diabetes_features, tmp_path):
    if shutil.which("uv", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])) is None:
        pytest.skip("uv is not installed (pip install uv: it comes with the test extra)")
    uri, local = registry
    uv_env = {**_pip_settings_for_uv(), "UV_PYTHON_DOWNLOADS": "never", "MLFLOW_ENV_ROOT": str(tmp_path / "envs")}
    dry_run = subprocess.run(
        ["uv", "pip", "install", "--dry-run", "--python", sys.executable, "--target", str(tmp_path / "dry"),
         "-r", str(local / "requirements.txt")],
        env=_subprocess_env(uri, **uv_env), capture_output=True, text=True, timeout=ENV_TIMEOUT,
    )
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    torch_line = next((line for line in dry_run.stderr.splitlines() if " torch==" in line), "torch==unknown")
    _torch_is_affordable(torch_line.split("==", 1)[1])
    rows = _predict(uri, tmp_path, diabetes_features.iloc[:2], "uv", **uv_env)
    assert len(rows) == 2 and all(ANSWER <= set(row) for row in rows)


@pytest.fixture(scope="module")
def dockerfile_dir(registry, tmp_path_factory) -> Path:
    uri, _ = registry
    out = tmp_path_factory.mktemp("dockerfile") / "docker"
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "generate-dockerfile", "-m", MODEL_URI, "-d", str(out)],
        env=_subprocess_env(uri), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_generate_dockerfile_carries_the_model_and_its_code(dockerfile_dir):
    assert "model_dir" in (dockerfile_dir / "Dockerfile").read_text()
    assert (dockerfile_dir / "model_dir" / "code" / "mlflow_tabcons" / "flavor" / "__init__.py").is_file()
    assert "mlflow-tabcons" not in (dockerfile_dir / "model_dir" / "requirements.txt").read_text()


def test_the_dockerfile_builds_an_image(dockerfile_dir):
    engine = shutil.which("docker") or shutil.which("podman")
    if engine is None or subprocess.run([engine, "info"], capture_output=True).returncode != 0:
        pytest.skip("no running container engine (docker or podman): the Dockerfile is generated, no image is built")
    build = subprocess.run([engine, "build", "-t", "tabcons-deployment-test", str(dockerfile_dir)],
                           capture_output=True, text=True, timeout=ENV_TIMEOUT)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
