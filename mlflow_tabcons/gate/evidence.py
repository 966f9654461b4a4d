"""Signed evidence of a model version's consistency: the facts the promotion gate reads, and how they are signed.

Evidence is written on the model version as a tag: ``tabcons.evidence`` when the
trainer measured it at training time, ``tabcons.evidence.verified`` when the
verifier measured it on a holdout (`tabcons verify`). The value is a JSON payload
plus an HMAC-SHA256 over it with the role's key (see ``keys``): anyone can read
the tag, only a key holder can write one the gate accepts. The payload records
everything that decides what "certified" meant (tau, alpha, bound, variance
bound, k, sigma, noise, perturbation site, early stop, seed, precision, rows,
members and how many were replaced) so the policy's protocol can be checked
against it, and the sha256 of the model's files, so the numbers stay bound to
the content they were measured on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

from mlflow_tabcons.errors import TabconsInputError, check_choice, check_float, check_int
from mlflow_tabcons.gate.keys import KEY_ENV, KEY_FILE_ENV, ROLES, TRAINER, VERIFIER, check_key, key_id

EVIDENCE_TAG = "tabcons.evidence"
VERIFIED_EVIDENCE_TAG = "tabcons.evidence.verified"
EVIDENCE_TAGS = {TRAINER: EVIDENCE_TAG, VERIFIER: VERIFIED_EVIDENCE_TAG}
# Set on a version by an approver to override one refusal on one target; the gate consumes it and audits it.
BREAK_GLASS_TAG = "tabcons.break_glass"
# Tag keys only the gate itself may write: evidence, verdicts, audit markers.
RESERVED_TAG_PREFIXES = ("tabcons.evidence", "tabcons.verdict", "tabcons.audit")
# 3: protocol fields, content digest, signer role (2 had neither; its numbers were measured under the trainer's own rules)
# 5: members_replaced (4 could not say whether members that did not learn had been swapped for new seeds)
# 6: a relative sigma is a share of the row's typical token norm (5's was ||E(x)||_F, which one outlier token could set)
FORMAT_VERSION = 6


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What measuring one model version showed, on one set of rows, and exactly how it was measured.

    ``predictions`` holds the model's predicted class id per row (see
    :func:`encode_predictions`), so churn between two versions measured on the
    same ``eval_digest`` can be computed later. ``model_sha256`` is the digest
    of the model's files (``artifacts.content_digest``); ``artifact`` the
    storage location the version serves them from, filled in by
    ``binding.attach_evidence`` once the version exists. ``max_row_variance``
    is the largest per-row sample variance of the neighbour samples Z, which a
    stated ``variance_bound`` (classical Bernstein) must not undercut.
    """

    run_id: str
    role: str
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
    variance_bound: float
    max_row_variance: float
    noise: str
    perturb: str
    early_stop: bool
    score_seed: int
    precision: str
    members: int
    members_learned: bool
    members_replaced: int
    eval_digest: str
    accuracy: float
    arbitrariness: float | None
    predictions: str
    model_sha256: str
    training: dict[str, str] = dataclasses.field(default_factory=dict)
    created_at: float = dataclasses.field(default_factory=time.time)
    artifact: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise TabconsInputError(f"evidence run_id must be a non-empty string, got {self.run_id!r}")
        check_choice("evidence role", self.role, ROLES)
        fractions = ["certified_fraction", "certified_fraction_lower", "certified_fraction_upper", "accuracy"]
        for name in fractions + ([] if self.arbitrariness is None else ["arbitrariness"]):
            check_float(f"evidence {name}", getattr(self, name), low=0.0, high=1.0)
        if not self.certified_fraction_lower <= self.certified_fraction <= self.certified_fraction_upper:
            raise TabconsInputError(
                "evidence interval must contain its estimate: "
                f"{self.certified_fraction_lower} <= {self.certified_fraction} <= {self.certified_fraction_upper} is false"
            )
        check_int("evidence n_eval", self.n_eval, minimum=1)
        if abs(self.certified_count / self.n_eval - self.certified_fraction) > 1e-9:
            raise TabconsInputError(f"evidence certified_fraction {self.certified_fraction} is no whole share of {self.n_eval} rows")
        check_int("evidence k", self.k, minimum=1)
        check_int("evidence members", self.members, minimum=1)
        check_int("evidence members_replaced", self.members_replaced, minimum=0)
        check_int("evidence score_seed", self.score_seed, minimum=0)
        check_float("evidence sigma", self.sigma, low=0.0, low_open=True)
        check_float("evidence alpha", self.alpha, low=0.0, high=1.0, low_open=True, high_open=True)
        check_float("evidence tau", self.tau, low=-1.0, high=1.0)
        check_float("evidence variance_bound", self.variance_bound, low=0.0, low_open=True)
        check_float("evidence max_row_variance", self.max_row_variance, low=0.0)
        check_float("evidence created_at", self.created_at, low=0.0)
        for name in ("early_stop", "members_learned"):
            if not isinstance(getattr(self, name), bool):
                raise TabconsInputError(f"evidence {name} must be true or false, got {getattr(self, name)!r}")
        for name in ("sigma_mode", "bound", "noise", "perturb", "precision", "eval_digest", "model_sha256"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TabconsInputError(f"evidence {name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.artifact, str):
            raise TabconsInputError(f"evidence artifact must be a string, got {self.artifact!r}")
        if not isinstance(self.training, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.training.items()):
            raise TabconsInputError("evidence training must map setting names to strings")
        rows = len(decode_predictions(self.predictions))
        if rows != self.n_eval:
            raise TabconsInputError(f"evidence predictions hold {rows} rows, n_eval says {self.n_eval}")

    @property
    def certified_count(self) -> int:
        return round(self.certified_fraction * self.n_eval)

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

    def predicted_classes(self) -> np.ndarray:
        return np.array(decode_predictions(self.predictions))


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


def canonical_json(data: dict[str, Any]) -> bytes:
    """The bytes the HMAC covers: sorted keys, no whitespace, no NaN."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sign_evidence(evidence: Evidence, key: bytes) -> str:
    """The tag value: the evidence as JSON with an HMAC-SHA256 over its canonical form."""
    check_key(key)
    payload = evidence.to_dict()
    for name, value in payload.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise TabconsInputError(f"evidence {name} is not finite")
    signature = hmac.new(key, canonical_json(payload), hashlib.sha256).hexdigest()
    return json.dumps(
        {"format": FORMAT_VERSION, "evidence": payload, "key_id": key_id(key), "hmac_sha256": signature},
        sort_keys=True,
    )


def refuse(message: str) -> MlflowException:
    """A PERMISSION_DENIED (HTTP 403) error about evidence the gate does not trust."""
    return MlflowException(f"tabcons evidence refused: {message}", error_code=PERMISSION_DENIED)


def verify_evidence(value: str | None, key: bytes | None, role: str = TRAINER) -> Evidence:
    """Return the evidence in a signed tag value of ``role``, or raise PERMISSION_DENIED saying why it is not trusted."""
    tag = EVIDENCE_TAGS[role]
    if not value:
        how = "train or evaluate with tabcons" if role == TRAINER else "the verifier runs `tabcons verify NAME VERSION --data HOLDOUT`"
        raise refuse(f"no {tag} tag: {how} to attach signed evidence")
    if key is None:
        raise refuse(f"no {role} key configured on this side (set {KEY_ENV[role]} or {KEY_FILE_ENV[role]})")
    try:
        document = json.loads(value)
    except json.JSONDecodeError as error:
        raise refuse(f"tampered evidence: not JSON ({error})") from None
    if not isinstance(document, dict) or not {"evidence", "hmac_sha256"} <= document.keys():
        raise refuse("tampered evidence: no signed payload (missing 'evidence' or 'hmac_sha256')")
    if document.get("format") != FORMAT_VERSION:
        raise refuse(
            f"evidence format {document.get('format')!r} is not {FORMAT_VERSION}: it was written by another version of "
            "mlflow-tabcons and does not record everything the gate checks; measure the version again"
        )
    payload = document["evidence"]
    if not isinstance(payload, dict):
        raise refuse("tampered evidence: payload is not an object")
    expected = hmac.new(key, canonical_json(payload), hashlib.sha256).hexdigest()
    if not isinstance(document["hmac_sha256"], str) or not hmac.compare_digest(expected, document["hmac_sha256"]):
        if document.get("key_id") not in (None, key_id(key)):
            raise refuse(f"evidence signed with another key (key id {document.get('key_id')}, this side's {role} key is {key_id(key)})")
        raise refuse("tampered evidence: signature does not match the payload")
    try:
        evidence = Evidence.from_dict(payload)
    except TabconsInputError as error:
        raise refuse(f"signed but invalid evidence: {error.message}") from None
    if evidence.role != role:
        raise refuse(f"evidence in {tag} says it was measured by the {evidence.role}, not the {role}")
    return evidence


def is_reserved_tag(key: str) -> bool:
    """Tag keys the gate owns, in any spelling (MySQL and MariaDB compare keys case-insensitively, so
    ``TABCONS.EVIDENCE`` is the row ``tabcons.evidence``); nobody may set or delete them by hand."""
    return key.lower().startswith(RESERVED_TAG_PREFIXES)


def is_break_glass_tag(key: str) -> bool:
    """A break-glass tag (``tabcons.break_glass`` or ``tabcons.break_glass.<target>``), in any spelling."""
    key = key.lower()
    return key == BREAK_GLASS_TAG or key.startswith(BREAK_GLASS_TAG + ".")
