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
    "load_dataset": "mlflow_tabcons.data.tables",
    "split_dataset": "mlflow_tabcons.data.tables",
    "few_shot": "mlflow_tabcons.data.tables",
    "TabularDataset": "mlflow_tabcons.data.tables",
    "DataDictionary": "mlflow_tabcons.data.serialize",
    "RowSerializer": "mlflow_tabcons.data.serialize",
    "LoraSettings": "mlflow_tabcons.members.classifier",
    "TrainSettings": "mlflow_tabcons.members.training",
    "EnsembleTrainer": "mlflow_tabcons.members.training",
    "ScorerSettings": "mlflow_tabcons.scoring.consistency",
    "ConsistencyScorer": "mlflow_tabcons.scoring.consistency",
    "TorchBackend": "mlflow_tabcons.scoring.consistency",
    "TrainingConfig": "mlflow_tabcons.tracking.config",
    "run_training": "mlflow_tabcons.tracking.training_job",
    "run_evaluation": "mlflow_tabcons.tracking.evaluation_job",
    "run_calibration": "mlflow_tabcons.tracking.calibration",
    "CalibrationGrid": "mlflow_tabcons.tracking.calibration",
    "TabconsInputError": "mlflow_tabcons.errors",
    "TabconsModel": "mlflow_tabcons.flavor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mlflow_tabcons' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
