"""Serialize gate decisions per registered model, inside the caller's transaction.

Check-then-set must not interleave across server workers: two promotions of
one model could both read the old incumbent. PostgreSQL takes a
transaction-scoped advisory lock; SQLite and MySQL write a row of
``tabcons_locks`` first, which holds the database's write lock (SQLite) or
the row lock (MySQL) until commit.
"""

from __future__ import annotations

import hashlib
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from mlflow_tabcons.gate.audit import LOCK_TABLE


def _advisory_key(name: str) -> int:
    digest = hashlib.sha256(b"tabcons-gate:" + name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_models(session: Session, names: list[str]) -> None:
    """Lock every name (sorted, so two renames cannot deadlock) until the transaction ends."""
    dialect = session.get_bind().dialect.name
    now = int(time.time() * 1000)
    for name in sorted(set(names)):
        if dialect == "postgresql":
            session.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _advisory_key(name)})
        elif dialect == "sqlite":
            session.execute(sa.text("INSERT OR REPLACE INTO tabcons_locks (name, touched) VALUES (:name, :now)"),
                            {"name": name, "now": now})
        elif dialect == "mysql":
            session.execute(
                sa.text("INSERT INTO tabcons_locks (name, touched) VALUES (:name, :now) "
                        "ON DUPLICATE KEY UPDATE touched = VALUES(touched)"),
                {"name": name, "now": now},
            )
        else:
            session.execute(LOCK_TABLE.delete().where(LOCK_TABLE.c.name == name))
            session.execute(LOCK_TABLE.insert().values(name=name, touched=now))
