"""The audit trail: one row per gate decision in the registry's own database, and who asked.

The rows live in ``tabcons_audit`` beside MLflow's registry tables and are
written in the same transaction as the change they judge, so an allowed
promotion and its record commit together. ``tabcons_locks`` holds one row per
model name for databases without advisory locks.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.gate.verdict import Verdict

ARM_BREAK_GLASS = "arm_break_glass"
_METADATA = sa.MetaData()
AUDIT_TABLE = sa.Table(
    "tabcons_audit",
    _METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("version", sa.String(64)),
    sa.Column("target", sa.String(300), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("allowed", sa.Boolean, nullable=False),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("break_glass", sa.Text),
    sa.Column("summary", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)
LOCK_TABLE = sa.Table(
    "tabcons_locks",
    _METADATA,
    sa.Column("name", sa.String(256), primary_key=True),
    sa.Column("touched", sa.BigInteger, nullable=False),
)


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    id: int
    created_at: float
    model: str
    version: str | None
    target: str
    action: str
    allowed: bool
    actor: str
    break_glass: str | None
    summary: str
    detail: dict[str, Any]


def ensure_tables(engine: sa.engine.Engine) -> None:
    """Create the tables if missing; several server workers may race to do it, so a lost race is fine."""
    try:
        _METADATA.create_all(engine, checkfirst=True)
    except sa.exc.SQLAlchemyError:
        if not sa.inspect(engine).has_table(AUDIT_TABLE.name):
            raise


UNAUTHENTICATED = "unauthenticated"


def current_actor() -> str:
    """Who is asking: a user MLflow's auth app authenticated, else "unauthenticated"; in-process, the OS user.

    A Basic-auth header nobody checked names nobody, so it is never read here.
    An in-process client (a ``tabcons+sqlite://`` store in the caller's own
    Python) holds the database credentials itself; it is named by its OS user.
    """
    try:
        from flask import g, has_request_context
    except ImportError:  # flask ships with mlflow; this guards a stripped install
        has_request_context = lambda: False  # noqa: E731
    if has_request_context():
        user = getattr(g, "mlflow_authenticated_user", None)
        user = getattr(user, "username", user)
        return str(user) if user else UNAUTHENTICATED
    return f"local:{getpass.getuser()}"


def is_identified(actor: str) -> bool:
    return actor != UNAUTHENTICATED


def record(session: Session, *, action: str, model: str, version: str | None, target: str,
           allowed: bool, summary: str, detail: dict[str, Any], break_glass: str | None = None) -> None:
    session.execute(
        AUDIT_TABLE.insert().values(
            created_at=int(time.time() * 1000),
            model=model,
            version=None if version is None else str(version),
            target=target,
            action=action,
            allowed=allowed,
            actor=current_actor()[:256],
            break_glass=break_glass,
            summary=summary,
            detail=json.dumps(detail, sort_keys=True),
        )
    )


def record_verdict(session: Session, verdict: Verdict, action: str) -> None:
    record(
        session, action=action, model=verdict.model, version=verdict.version, target=verdict.target.key,
        allowed=verdict.allowed, summary=verdict.summary(), detail=verdict.to_dict(), break_glass=verdict.break_glass,
    )


def _newest(session: Session, *conditions: Any) -> AuditRecord | None:
    query = sa.select(AUDIT_TABLE).where(*conditions).order_by(AUDIT_TABLE.c.id.desc()).limit(1)
    row = session.execute(query).mappings().first()
    return None if row is None else _record(row)


def last_allowed(session: Session, model: str, target: str, actions: tuple[str, ...]) -> AuditRecord | None:
    """The newest allowed promotion (one of ``actions``) onto ``target`` of ``model``: who held it last, with its evidence.

    Model names compare case-insensitively, and rows outlive the versions and
    models they name, so deleting either does not forget the last holder.
    """
    return _newest(session, sa.func.lower(AUDIT_TABLE.c.model) == model.lower(), AUDIT_TABLE.c.target == target,
                   AUDIT_TABLE.c.action.in_(actions), AUDIT_TABLE.c.allowed.is_(True))


def last_armed(session: Session, model: str, version: str, target: str) -> AuditRecord | None:
    """The newest break-glass arming of one version for one target."""
    return _newest(session, sa.func.lower(AUDIT_TABLE.c.model) == model.lower(), AUDIT_TABLE.c.version == str(version),
                   AUDIT_TABLE.c.target == target, AUDIT_TABLE.c.action == ARM_BREAK_GLASS)


def _record(row: Any) -> AuditRecord:
    return AuditRecord(**{**row, "created_at": row["created_at"] / 1000, "detail": json.loads(row["detail"])})


def read_audit(engine: sa.engine.Engine, model: str | None = None, limit: int | None = None) -> list[AuditRecord]:
    """Audit rows, oldest first, for one model or all."""
    query = sa.select(AUDIT_TABLE).order_by(AUDIT_TABLE.c.id)
    if model is not None:
        query = query.where(AUDIT_TABLE.c.model == model)
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table(AUDIT_TABLE.name):
            return []
        rows = connection.execute(query).mappings().all()
    records = [_record(row) for row in rows]
    return records[-limit:] if limit else records


def audit_trail(registry_uri: str, model: str | None = None, limit: int | None = None) -> list[AuditRecord]:
    """The audit rows from a registry database URI (``tabcons+sqlite:///mlflow.db`` or the plain database URI)."""
    uri = registry_uri.removeprefix("tabcons+")
    if uri.split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "postgresql", "mysql"):
        raise TabconsInputError(
            f"the audit trail lives in the registry database; {registry_uri!r} is not a database URI "
            "(over REST, read the versions' tabcons.verdict.* tags instead)"
        )
    engine = sa.create_engine(uri)
    try:
        return read_audit(engine, model, limit)
    finally:
        engine.dispose()
