"""Signing keys, one per role: the trainer's and the verifier's. Who holds which is the trust model (docs/gate.md).

- trainer key (``TABCONS_EVIDENCE_KEY`` / ``TABCONS_EVIDENCE_KEY_FILE``): held by the
  training host and the registry server; signs evidence measured at training time.
- verifier key (``TABCONS_VERIFIER_KEY`` / ``TABCONS_VERIFIER_KEY_FILE``): held by the
  registry owner's verifier and the registry server, never by trainers; signs
  evidence that `tabcons verify` measured on a holdout itself.

For the offline demo a per-user key file is created on first use for each role,
so training, verification and ``tabcons server`` on one machine agree. On one
machine anyone who can read both files holds both roles: separate them in production.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from mlflow_tabcons.errors import TabconsInputError, check_choice

TRAINER = "trainer"
VERIFIER = "verifier"
ROLES = (TRAINER, VERIFIER)
KEY_ENV = {TRAINER: "TABCONS_EVIDENCE_KEY", VERIFIER: "TABCONS_VERIFIER_KEY"}
KEY_FILE_ENV = {TRAINER: "TABCONS_EVIDENCE_KEY_FILE", VERIFIER: "TABCONS_VERIFIER_KEY_FILE"}
KEY_DIRECTORY = Path("~/.config/mlflow-tabcons")
DEFAULT_KEY_FILE = {TRAINER: "evidence.key", VERIFIER: "verifier.key"}
MIN_KEY_BYTES = 16


def check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise TabconsInputError(f"an evidence key must be at least {MIN_KEY_BYTES} bytes")
    return key


def key_id(key: bytes) -> str:
    """A short fingerprint naming which key signed, so a key mismatch says so."""
    return hashlib.sha256(b"tabcons-key-id:" + key).hexdigest()[:12]


def default_key_file(role: str) -> Path:
    return (KEY_DIRECTORY / DEFAULT_KEY_FILE[check_choice("role", role, ROLES)]).expanduser()


def read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except OSError as error:
        raise TabconsInputError(f"cannot read the evidence key file {path}: {error.strerror}") from None
    return check_key(text.encode())


def signing_key(role: str = TRAINER) -> bytes | None:
    """The role's key: its variable, else the file its file variable names, else the per-user file, else None."""
    check_choice("role", role, ROLES)
    if os.environ.get(KEY_ENV[role]):
        return check_key(os.environ[KEY_ENV[role]].encode())
    if os.environ.get(KEY_FILE_ENV[role]):
        return read_key_file(Path(os.environ[KEY_FILE_ENV[role]]).expanduser())
    default = default_key_file(role)
    return read_key_file(default) if default.exists() else None


def role_key(role: str) -> bytes | None:
    """The role's key (``signing_key``), refused for the verifier when it is the trainer's key.

    Verifier evidence means "measured by someone the trainer cannot impersonate"; with one key for
    both roles a trainer signs verifier evidence. A deployment that sets the same value twice is
    told so, by key id, instead of trusting it.
    """
    key = signing_key(role)
    if role == VERIFIER and key is not None and key == signing_key(TRAINER):
        raise TabconsInputError(
            f"the verifier key is the trainer key (key id {key_id(key)}): verifier evidence would prove nothing a trainer "
            f"cannot sign; give the verifier its own key ({KEY_ENV[VERIFIER]} / {KEY_FILE_ENV[VERIFIER]})"
        )
    return key


def ensure_signing_key(role: str = TRAINER) -> bytes:
    """The role's key, creating the per-user key file (mode 0600) when none is configured: the offline demo's path."""
    key = role_key(role)
    if key is not None:
        return key
    path = default_key_file(role)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it a moment ago
        return read_key_file(path)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return read_key_file(path)
