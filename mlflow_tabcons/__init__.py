"""mlflow-tabcons: prediction consistency under fine-tuning multiplicity for tabular LLMs.

The public API is importable from here; submodules load on first use, so
`import mlflow_tabcons` stays cheap for code that needs only a part (the
registry plugin never imports torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_dataset": "mlflow_tabcons.data",
    "split_dataset": "mlflow_tabcons.data",
    "few_shot": "mlflow_tabcons.data",
    "TabularDataset": "mlflow_tabcons.data",
    "DataDictionary": "mlflow_tabcons.serialize",
    "RowSerializer": "mlflow_tabcons.serialize",
    "LoraSettings": "mlflow_tabcons.model",
    "TrainSettings": "mlflow_tabcons.finetune",
    "EnsembleTrainer": "mlflow_tabcons.finetune",
    "ScorerSettings": "mlflow_tabcons.consistency",
    "ConsistencyScorer": "mlflow_tabcons.consistency",
    "TorchBackend": "mlflow_tabcons.consistency",
    "TrainingConfig": "mlflow_tabcons.pipeline",
    "run_training": "mlflow_tabcons.pipeline",
    "run_evaluation": "mlflow_tabcons.evaluation_job",
    "run_calibration": "mlflow_tabcons.calibration",
    "CalibrationGrid": "mlflow_tabcons.calibration",
    "TabconsInputError": "mlflow_tabcons.errors",
    "TabconsModel": "mlflow_tabcons.flavor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlflow_tabcons' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
