"""Entry point of the ``mlflow.model_registry_store`` group for ``tabcons+sqlite``,
``tabcons+postgresql`` and ``tabcons+mysql`` URIs, with or without a driver (``+pymysql``).

Thin on purpose: the gate lives in ``mlflow_tabcons.gate.store``. MLflow is
imported inside the builder because entry points load while ``import mlflow``
is still running.
"""

from __future__ import annotations

from typing import Any


def build_gated_registry_store(store_uri: str, tracking_uri: str | None = None) -> Any:
    from mlflow_tabcons.gate.store import GatedRegistryStore

    return GatedRegistryStore(store_uri)
