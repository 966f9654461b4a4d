"""The ``tabcons`` MLflow flavor: a tabular classifier packaged with its own robustness scorer.

Shaped like ``mlflow.sklearn``: ``save_model``, ``log_model``, ``load_model``
(the native ``TabconsModel``) and ``_load_pyfunc`` (what
``mlflow.pyfunc.load_model``, ``mlflow models serve`` and
``mlflow.pyfunc.spark_udf`` call). The MLmodel file gets a ``tabcons`` flavor
entry and a ``python_function`` one. Every answer carries ``prediction``,
``probability``, ``consistency``, ``consistency_lcb`` and ``certified``; the
signature declares the raw feature columns and the inference params
``k``, ``sigma``, ``alpha``, ``seed`` and ``score``.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import pyfunc
from mlflow.models import Model, ModelInputExample, ModelSignature, infer_signature
from mlflow.models.model import MLMODEL_FILE_NAME, ModelInfo
from mlflow.models.utils import _save_example
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.utils.environment import _CONDA_ENV_FILE_NAME, _PYTHON_ENV_FILE_NAME
from mlflow.utils.file_utils import get_total_file_size
from mlflow.utils.model_utils import _get_flavor_configuration, _validate_and_prepare_target_save_path

import mlflow_tabcons
from mlflow_tabcons.errors import TabconsInputError, check_choice
from mlflow_tabcons.flavor.environment import copy_code, get_default_pip_requirements, write_environment
from mlflow_tabcons.flavor.packaged import BACKENDS, PREDICT_PARAMS, TabconsModel

FLAVOR_NAME = "tabcons"
DATA_DIR = "data"

__all__ = [
    "FLAVOR_NAME",
    "TabconsModel",
    "get_default_pip_requirements",
    "load_model",
    "log_model",
    "save_model",
    "tabcons_signature",
]


def _label_type(labels: list[Any]) -> str:
    if all(isinstance(label, bool) for label in labels):
        return "boolean"
    if all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
        return "long"
    if all(isinstance(label, (int, float)) and not isinstance(label, bool) for label in labels):
        return "double"
    return "string"


def tabcons_signature(model: TabconsModel, features: pd.DataFrame | None = None) -> ModelSignature:
    """Inputs: the feature columns with the types ``features`` has (the training table);
    outputs: the five answer columns; params: k, sigma, alpha, seed, score with the packaged defaults.

    A column is required when ``model.required`` says so (it had no missing value in training).
    """
    inputs = None
    if features is not None:
        missing = [c for c in model.columns if c not in features.columns]
        if missing:
            raise TabconsInputError(f"the example table lacks feature column(s) {missing}")
        with warnings.catch_warnings():  # missing values are checked per column by the model itself
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
            inferred = infer_signature(features[model.columns]).inputs
        required = set(model.required)
        inputs = Schema([ColSpec(spec.type, spec.name, required=spec.name in required) for spec in inferred.inputs])
    outputs = Schema(
        [
            ColSpec(_label_type([_plain(label) for label in model.labels]), "prediction"),
            ColSpec("double", "probability"),
            ColSpec("double", "consistency"),
            ColSpec("double", "consistency_lcb"),
            ColSpec("boolean", "certified"),
        ]
    )
    settings = model.settings
    params = ParamSchema(
        [
            ParamSpec("k", "long", settings.k),
            ParamSpec("sigma", "double", settings.sigma),
            ParamSpec("alpha", "double", settings.alpha),
            ParamSpec("seed", "long", settings.seed),
            ParamSpec("score", "boolean", True),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def save_model(
    tabcons_model: TabconsModel,
    path: str | os.PathLike,
    *,
    backend: str = "torch",
    mlflow_model: Model | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    conda_env: Any = None,
    pip_requirements: Any = None,
    extra_pip_requirements: Any = None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write the model as an MLflow model directory (``tabcons`` + ``python_function`` flavors).

    ``backend`` picks the engine of the neighbour passes once, at save time:
    ``torch``, or ``onnx`` (an exported graph run by ONNX Runtime, on CUDA
    where onnxruntime-gpu and a GPU are present). Without ``signature``, one is
    built from ``input_example``'s column types (``tabcons_signature``).
    The model carries this package's code (``code/``, plus any ``code_paths``)
    and requirements that name public packages only, so MLflow's environment
    managers can rebuild its environment (see ``mlflow_tabcons.flavor.environment``).
    """
    check_choice("backend", backend, BACKENDS)
    path = os.path.abspath(path)
    _validate_and_prepare_target_save_path(path)
    try:
        code = copy_code(path, code_paths)
        _write_model_directory(
            tabcons_model, path, backend, mlflow_model or Model(), signature, input_example, metadata, code
        )
        write_environment(path, backend, conda_env, pip_requirements, extra_pip_requirements)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # nothing half-written: a failed save leaves no model behind
        raise


def _write_model_directory(
    tabcons_model: TabconsModel,
    path: str,
    backend: str,
    mlflow_model: Model,
    signature: ModelSignature | None,
    input_example: ModelInputExample | None,
    metadata: dict[str, Any] | None,
    code: str,
) -> None:
    _save_example(mlflow_model, input_example, path)
    if signature is None:
        signature = tabcons_signature(tabcons_model, None if input_example is None else pd.DataFrame(input_example))
    mlflow_model.signature = signature
    if metadata is not None:
        mlflow_model.metadata = metadata
    tabcons_model.write(Path(path) / DATA_DIR, backend)
    pyfunc.add_to_model(
        mlflow_model,
        loader_module="mlflow_tabcons.flavor",
        data=DATA_DIR,
        code=code,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
    )
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        data=DATA_DIR,
        code=code,
        backend=backend,
        mlflow_tabcons_version=mlflow_tabcons.__version__,
        labels=[_plain(label) for label in tabcons_model.labels],
        scorer={key: tabcons_model.settings.to_dict()[key] for key in ("k", "sigma", "sigma_mode", "alpha", "tau", "bound")},
    )
    if size := get_total_file_size(path):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def log_model(
    tabcons_model: TabconsModel,
    name: str = "model",
    *,
    backend: str = "torch",
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: ModelInputExample | None = None,
    **kwargs: Any,
) -> ModelInfo:
    """Log the model (an MLflow 3 LoggedModel called ``name``) in the active run, optionally registering it."""
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        tabcons_model=tabcons_model,
        backend=backend,
        registered_model_name=registered_model_name,
        signature=signature,
        input_example=input_example,
        **kwargs,
    )


def _local_data_dir(model_uri: str, dst_path: str | None = None) -> Path:
    local = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    conf = _get_flavor_configuration(model_path=local, flavor_name=FLAVOR_NAME)
    return Path(local) / conf["data"]


def load_model(model_uri: str, dst_path: str | None = None, *, backend: str | None = None) -> TabconsModel:
    """The native ``TabconsModel`` (classifier, scorer, evidence) from any model URI; no network needed."""
    return TabconsModel.read(_local_data_dir(model_uri, dst_path), backend)


class _TabconsPyfunc:
    """What ``mlflow.pyfunc`` calls: a table in, one answer record per row out."""

    def __init__(self, model: TabconsModel) -> None:
        self.model = model

    def get_raw_model(self) -> TabconsModel:
        return self.model

    def predict(self, data: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = dict(params or {})
        unknown = sorted(set(params) - set(PREDICT_PARAMS))
        if unknown:
            raise TabconsInputError(f"unknown inference param(s) {unknown}; this model takes {list(PREDICT_PARAMS)}")
        return self.model.predict(data, **params)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> _TabconsPyfunc:
    """Called by ``mlflow.pyfunc.load_model`` with the flavor's data directory."""
    return _TabconsPyfunc(TabconsModel.read(path))

