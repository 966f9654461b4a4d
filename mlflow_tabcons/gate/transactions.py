"""One database transaction per gated call, shared with MLflow's own store methods run inside it.

The gated store replaces its session maker with ``SharedSessions.session``:
while a gate transaction is open in this thread, MLflow's methods get that
transaction's session, so the check, the audit row and the change commit (or
roll back) together. Nothing here outlives a call: several server workers,
each with its own store, agree through the database alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy.orm import Session

from mlflow_tabcons.gate.locking import lock_models


class SharedSessions:
    def __init__(self, plain_sessions: Callable[..., Any]) -> None:
        self._plain_sessions = plain_sessions
        self._local = threading.local()

    @contextlib.contextmanager
    def session(self, read_only: bool = True) -> Iterator[Session]:
        """The open gate transaction's session, else a plain one of MLflow's."""
        shared = getattr(self._local, "session", None)
        if shared is not None:
            yield shared
            return
        with self._plain_sessions(read_only=read_only) as session:
            yield session

    @contextlib.contextmanager
    def transaction(self, names: list[str]) -> Iterator[Session]:
        """A write transaction holding the gate's lock on every model name (case-insensitively) until it ends."""
        names = [name.lower() for name in names]
        shared = getattr(self._local, "session", None)
        if shared is not None:
            lock_models(shared, names)
            yield shared
            return
        with self._plain_sessions(read_only=False) as session:
            lock_models(session, names)
            self._local.session = session
            try:
                yield session
            finally:
                self._local.session = None
