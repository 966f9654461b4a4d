"""The environment a logged model rebuilds: public packages from an index, plus this package's code inside the model.

MLflow's environment managers (virtualenv, uv, conda: `mlflow models serve`,
`predict`, `build-docker`, `spark_udf(env_manager=...)`) install a model's
``requirements.txt`` or ``conda.yaml`` into a fresh environment. mlflow-tabcons
is not on a public index, so it travels inside the model as MLflow
``code_paths`` (the ``code/`` folder, put on ``sys.path`` before the flavor
loads), and the requirements name only public packages. Versions are pinned
to what is installed, without local labels such as torch's ``+cpu``: which
build of torch to take (CPU or CUDA) stays the deployer's choice, made with
the index they point pip at. ``conda.yaml`` is the GPU hosts' environment: the
ONNX backend gets ``onnxruntime-gpu`` there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.model_utils import _validate_and_copy_code_paths
from mlflow.utils.requirements_utils import _get_pinned_requirement
from packaging.requirements import Requirement

import mlflow_tabcons

# What the model's own code imports when it loads and predicts (flavor, packaged model,
# classifier, scorer, serializer). Training-only packages (peft, datasets, plots) stay out.
SERVING_PACKAGES: tuple[str, ...] = (
    "mlflow",
    "torch",
    "transformers",
    "safetensors",
    "numpy",
    "pandas",
    "scipy",
    "pyyaml",
    "tqdm",
)
# Where a package's module is named otherwise: the fallback when no distribution metadata is found.
MODULE_OF = {"pyyaml": "yaml"}
ONNX_PACKAGE = "onnxruntime"
# onnxruntime and onnxruntime-gpu are one module and must not be installed together;
# the GPU build follows its own release numbers, so the conda environment asks for a floor.
ONNX_GPU_REQUIREMENT = "onnxruntime-gpu>=1.18"
CODE_DIR = "code"


def public_pin(package: str) -> str:
    """``package==version`` as installed, without a local label (``torch==2.13.0``, never ``+cpu``).

    MLflow's own pinning, as its flavors use it: ``mlflow`` is pinned by its
    ``__version__``, so an environment that has only ``mlflow-skinny`` (no
    ``mlflow`` distribution) still logs models.
    """
    return _get_pinned_requirement(package, module=MODULE_OF.get(package))


def get_default_pip_requirements(backend: str = "torch") -> list[str]:
    """Public packages the model needs at load time, pinned; mlflow-tabcons itself travels as code inside the model."""
    packages = [*SERVING_PACKAGES, *([ONNX_PACKAGE] if backend == "onnx" else [])]
    return [public_pin(package) for package in packages]


def package_code_path() -> str:
    """The folder of the ``mlflow_tabcons`` package that is running: what the model carries as code."""
    return str(Path(mlflow_tabcons.__file__).resolve().parent)


def copy_code(path: str, code_paths: list[str] | None) -> str:
    """Copy this package (and any extra ``code_paths``) into the model's ``code/`` folder; returns that subpath."""
    return _validate_and_copy_code_paths([package_code_path(), *(code_paths or [])], path, CODE_DIR)


def _for_gpu_hosts(conda_env: dict[str, Any]) -> dict[str, Any]:
    """The conda environment with ONNX Runtime's CUDA build in place of the CPU one."""
    dependencies = []
    for entry in conda_env.get("dependencies", []):
        if isinstance(entry, dict) and "pip" in entry:
            pip = [
                ONNX_GPU_REQUIREMENT if _requirement_name(line) == ONNX_PACKAGE else line for line in entry["pip"]
            ]
            entry = {**entry, "pip": pip}
        dependencies.append(entry)
    return {**conda_env, "dependencies": dependencies}


def _requirement_name(line: str) -> str | None:
    try:
        return Requirement(line).name.lower()
    except Exception:  # "-r file", "--index-url ...": not a package
        return None


def write_environment(path: str, backend: str, conda_env: Any, pip_requirements: Any, extra: Any) -> None:
    """Write conda.yaml, python_env.yaml, requirements.txt (and constraints.txt) the way MLflow's flavors do."""
    if conda_env is None:
        default = get_default_pip_requirements(backend) if pip_requirements is None else None
        conda_env, pip_requirements, constraints = _process_pip_requirements(default, pip_requirements, extra)
        conda_env = _for_gpu_hosts(conda_env)
    else:
        conda_env, pip_requirements, constraints = _process_conda_env(conda_env)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as handle:
        yaml.safe_dump(conda_env, stream=handle, default_flow_style=False)
    if constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))
