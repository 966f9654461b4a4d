"""Create a fresh tracking database once, however many `tabcons train` processes start on it together.

MLflow's SqlAlchemyStore creates and migrates the schema of an empty database
when it first connects, without a lock: two processes starting on one new
SQLite file both run the migrations and one dies with ``table
_alembic_tmp_experiments already exists``. MLflow guards its own job and
workspace stores with ``_safe_initialize_tables`` (an exclusive lock file per
database URL, host-wide); this runs the tracking store's initialization under
the same lock before anything else touches the store.
"""

from __future__ import annotations

import mlflow
from mlflow.store.db.db_types import DATABASE_ENGINES


def initialize_tracking_store(uri: str | None = None) -> None:
    """Create the tables of an empty tracking database under MLflow's init lock; no-op for other stores."""
    from mlflow.store.db.utils import _safe_initialize_tables, create_sqlalchemy_engine_with_retry

    uri = uri or mlflow.get_tracking_uri()
    if uri.split(":", 1)[0].split("+", 1)[0] not in DATABASE_ENGINES:
        return
    engine = create_sqlalchemy_engine_with_retry(uri)
    try:
        _safe_initialize_tables(engine)
    finally:
        engine.dispose()
