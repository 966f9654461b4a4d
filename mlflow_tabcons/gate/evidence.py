"""Signed evidence of a model version's consistency, the facts the promotion gate reads.

The trainer computes the numbers once, at evaluation time, and writes them on
the model version as the tag ``tabcons.evidence``: a JSON payload plus an
HMAC-SHA256 over it with a key the trainer and the registry server share.
Anyone can read the tag; only a holder of the key can write one the gate
accepts, so a hand-set tag cannot lift a model over a policy threshold.

Trust model: whoever holds the key can mint evidence. In production the key
lives only on the training host and the registry server (``TABCONS_EVIDENCE_KEY``
or ``TABCONS_EVIDENCE_KEY_FILE``). For the offline demo a per-user key file is
created on first use, so training and ``tabcons server`` on one machine agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
import secrets
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
from mlflow.store.artifact.utils.models import get_model_name_and_version

from mlflow_tabcons.errors import TabconsInputError, check_float, check_int

EVIDENCE_TAG = "tabcons.evidence"
# Set on a version by a person to override one refusal; the gate consumes it and audits it.
BREAK_GLASS_TAG = "tabcons.break_glass"
# Tag keys only the gate itself may write: evidence, verdicts, audit markers.
RESERVED_TAG_PREFIXES = ("tabcons.evidence", "tabcons.verdict", "tabcons.audit")
KEY_ENV = "TABCONS_EVIDENCE_KEY"
KEY_FILE_ENV = "TABCONS_EVIDENCE_KEY_FILE"
DEFAULT_KEY_FILE = Path("~/.config/mlflow-tabcons/evidence.key")
FORMAT_VERSION = 2
# How many models:/NAME/VERSION sources a version's artifact is followed through (copies of copies).
_MAX_SOURCE_HOPS = 16


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What the evaluation of one model version showed, on one evaluation set.

    ``predictions`` holds the reference member's predicted class id for each
    evaluation row (see :func:`encode_predictions`), so the churn between two
    versions evaluated on the same ``eval_digest`` can be computed later.
    ``artifact`` names the model the numbers were measured on (see
    :func:`version_artifact`); :func:`attach_evidence` fills it in once the
    version exists, so signed evidence cannot be replayed onto another model
    registered from the same run.
    """

    run_id: str
    certified_fraction: float
    certified_fraction_lower: float
    certified_fraction_upper: float
    n_eval: int
    k: int
    sigma: float
    sigma_mode: str
    alpha: float
    tau: float
    bound: str
    eval_digest: str
    accuracy: float
    arbitrariness: float
    predictions: str
    created_at: float = dataclasses.field(default_factory=time.time)
    artifact: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise TabconsInputError(f"evidence run_id must be a non-empty string, got {self.run_id!r}")
        for name in ("certified_fraction", "certified_fraction_lower", "certified_fraction_upper", "accuracy", "arbitrariness"):
            check_float(f"evidence {name}", getattr(self, name), low=0.0, high=1.0)
        if not self.certified_fraction_lower <= self.certified_fraction <= self.certified_fraction_upper:
            raise TabconsInputError(
                "evidence interval must contain its estimate: "
                f"{self.certified_fraction_lower} <= {self.certified_fraction} <= {self.certified_fraction_upper} is false"
            )
        check_int("evidence n_eval", self.n_eval, minimum=1)
        check_int("evidence k", self.k, minimum=1)
        check_float("evidence sigma", self.sigma, low=0.0, low_open=True)
        check_float("evidence alpha", self.alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        check_float("evidence tau", self.tau, low=-1.0, high=1.0)
        check_float("evidence created_at", self.created_at, low=0.0)
        if not isinstance(self.artifact, str):
            raise TabconsInputError(f"evidence artifact must be a string, got {self.artifact!r}")
        for name in ("sigma_mode", "bound", "eval_digest"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TabconsInputError(f"evidence {name} must be a non-empty string, got {getattr(self, name)!r}")
        rows = len(decode_predictions(self.predictions))
        if rows != self.n_eval:
            raise TabconsInputError(f"evidence predictions hold {rows} rows, n_eval says {self.n_eval}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evidence:
        """Build from a dict, refusing missing or unknown fields (a payload from another version)."""
        if not isinstance(data, dict):
            raise TabconsInputError(f"evidence must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = names - data.keys(), data.keys() - names
        if missing or unknown:
            raise TabconsInputError(f"evidence fields wrong: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(**data)

    def predicted_classes(self) -> list[int]:
        return decode_predictions(self.predictions)


def encode_predictions(class_ids: Sequence[int]) -> str:
    """Class ids as one digit per row when all are < 10 (the usual case), else comma-separated."""
    ids = [check_int("predicted class id", c, minimum=0) for c in class_ids]
    if all(c < 10 for c in ids):
        return "".join(map(str, ids))
    return ",".join(map(str, ids))


def decode_predictions(text: str) -> list[int]:
    if not isinstance(text, str) or not text or not all(c.isdigit() or c == "," for c in text):
        raise TabconsInputError(f"evidence predictions must be a string of class ids, got {str(text)[:40]!r}")
    parts = text.split(",") if "," in text else list(text)
    if any(not p for p in parts):
        raise TabconsInputError("evidence predictions contain an empty class id")
    return [int(p) for p in parts]


def churn(old: Evidence, new: Evidence) -> float:
    """Share of evaluation rows whose predicted class differs between two versions on the same eval set."""
    if old.eval_digest != new.eval_digest:
        raise TabconsInputError(
            f"churn needs the same evaluation set; digests differ ({old.eval_digest[:12]} vs {new.eval_digest[:12]})"
        )
    a, b = old.predicted_classes(), new.predicted_classes()
    return sum(x != y for x, y in zip(a, b)) / len(a)


def eval_digest(frame: pd.DataFrame) -> str:
    """sha256 of the evaluation rows (columns, order, values, labels) in a canonical serialization.

    Column order does not matter (columns are sorted); row order does, because
    ``predictions`` is aligned with it.
    """
    if not isinstance(frame, pd.DataFrame) or frame.empty:
        raise TabconsInputError("eval_digest needs a non-empty DataFrame")
    canonical = frame.rename(columns=str).reset_index(drop=True)
    canonical = canonical[sorted(canonical.columns)]
    payload = canonical.to_json(orient="split", date_format="iso", double_precision=15, index=False)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def key_id(key: bytes) -> str:
    """A short fingerprint naming which key signed, so a key mismatch says so."""
    return hashlib.sha256(b"tabcons-key-id:" + key).hexdigest()[:12]


def sign_evidence(evidence: Evidence, key: bytes) -> str:
    """The tag value: the evidence as JSON with an HMAC-SHA256 over its canonical form."""
    _check_key(key)
    payload = evidence.to_dict()
    for name, value in payload.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TabconsInputError(f"evidence {name} is not finite")
    signature = hmac.new(key, _canonical(payload), hashlib.sha256).hexdigest()
    return json.dumps(
        {"format": FORMAT_VERSION, "evidence": payload, "key_id": key_id(key), "hmac_sha256": signature},
        sort_keys=True,
    )


def _refuse(message: str) -> MlflowException:
    return MlflowException(f"tabcons evidence refused: {message}", error_code=PERMISSION_DENIED)


def verify_evidence(value: str | None, key: bytes | None) -> Evidence:
    """Return the evidence in a signed tag value, or raise PERMISSION_DENIED saying why it is not trusted."""
    if key is None:
        raise _refuse(f"no evidence key configured on this side (set {KEY_ENV} or {KEY_FILE_ENV})")
    if not value:
        raise _refuse(f"no {EVIDENCE_TAG} tag: train/evaluate with tabcons to attach signed evidence")
    try:
        document = json.loads(value)
    except json.JSONDecodeError as error:
        raise _refuse(f"tampered evidence: not JSON ({error})") from None
    if not isinstance(document, dict) or not {"evidence", "hmac_sha256"} <= document.keys():
        raise _refuse("tampered evidence: no signed payload (missing 'evidence' or 'hmac_sha256')")
    if document.get("format") != FORMAT_VERSION:
        raise _refuse(f"evidence format {document.get('format')!r} is not {FORMAT_VERSION}")
    payload = document["evidence"]
    if not isinstance(payload, dict):
        raise _refuse("tampered evidence: payload is not an object")
    expected = hmac.new(key, _canonical(payload), hashlib.sha256).hexdigest()
    if not isinstance(document["hmac_sha256"], str) or not hmac.compare_digest(expected, document["hmac_sha256"]):
        if document.get("key_id") not in (None, key_id(key)):
            raise _refuse(f"evidence signed with another key (key id {document.get('key_id')}, this server's is {key_id(key)})")
        raise _refuse("tampered evidence: signature does not match the payload")
    try:
        return Evidence.from_dict(payload)
    except TabconsInputError as error:
        raise _refuse(f"signed but invalid evidence: {error.message}") from None


def _check_key(key: Any) -> bytes:
    if not isinstance(key, bytes) or len(key) < 16:
        raise TabconsInputError("the evidence key must be at least 16 bytes")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except OSError as error:
        raise TabconsInputError(f"cannot read the evidence key file {path}: {error.strerror}") from None
    return _check_key(text.encode())


def evidence_key() -> bytes | None:
    """The shared signing key: $TABCONS_EVIDENCE_KEY, else the file $TABCONS_EVIDENCE_KEY_FILE, else the per-user file."""
    if os.environ.get(KEY_ENV):
        return _check_key(os.environ[KEY_ENV].encode())
    if os.environ.get(KEY_FILE_ENV):
        return _read_key_file(Path(os.environ[KEY_FILE_ENV]).expanduser())
    default = DEFAULT_KEY_FILE.expanduser()
    return _read_key_file(default) if default.exists() else None


def ensure_evidence_key() -> bytes:
    """The key, creating the per-user key file (mode 0600) when none is configured: the offline demo's path."""
    key = evidence_key()
    if key is not None:
        return key
    path = DEFAULT_KEY_FILE.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return _read_key_file(path)


def version_artifact(version: Any, registry: Any) -> str:
    """The model a version serves: its logged-model id, else its source URI.

    A ``models:/NAME/VERSION`` source (a copy) is followed to the version it
    names, so a copy serves, and is bound to, its origin's model. ``registry``
    is an ``MlflowClient`` or a registry store.
    """
    for _ in range(_MAX_SOURCE_HOPS):
        if version.model_id:
            return version.model_id
        if urllib.parse.urlparse(version.source or "").scheme != "models":
            return version.source or ""
        resolved = get_model_name_and_version(registry, version.source)
        if len(resolved) == 1:  # models:/<logged model id>
            return resolved[0]
        version = registry.get_model_version(resolved[0], str(resolved[1]))
    raise _refuse(f"model version source {version.source!r} is a chain of more than {_MAX_SOURCE_HOPS} registered copies")


def attach_evidence(client: Any, name: str, version: str | int, evidence: Evidence, key: bytes | None = None) -> None:
    """Sign the evidence, bound to this version's run and model artifact, and write it on the version."""
    model_version = client.get_model_version(name, str(version))
    if model_version.run_id and model_version.run_id != evidence.run_id:
        raise TabconsInputError(
            f"evidence is for run {evidence.run_id}, but {name} version {version} comes from run {model_version.run_id}"
        )
    artifact = version_artifact(model_version, client)
    if evidence.artifact and evidence.artifact != artifact:
        raise TabconsInputError(f"evidence is for model {evidence.artifact}, but {name} version {version} serves {artifact}")
    bound = dataclasses.replace(evidence, artifact=artifact)
    client.set_model_version_tag(name, str(version), EVIDENCE_TAG, sign_evidence(bound, key or ensure_evidence_key()))


def is_reserved_tag(key: str) -> bool:
    """Tag keys the gate owns; nobody may set or delete them by hand."""
    return key.startswith(RESERVED_TAG_PREFIXES)
