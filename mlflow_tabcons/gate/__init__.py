"""Promotion policy: rules and measurement protocol from YAML, verdicts as pure functions, the audit trail, the gated store.

``store`` imports MLflow's SQLAlchemy registry; import it only where a store is built.
"""

from __future__ import annotations

from mlflow_tabcons.gate.audit import AuditRecord, audit_trail, read_audit
from mlflow_tabcons.gate.loading import POLICY_ENV, PolicyError, load_policy, parse_policy
from mlflow_tabcons.gate.protocol import DEFAULT_PROTOCOL, Protocol
from mlflow_tabcons.gate.rules import BreakGlass, CertifiedFractionRule, Policy, RuleSet, Target
from mlflow_tabcons.gate.verdict import Check, Incumbent, Verdict, decide

__all__ = [
    "AuditRecord",
    "BreakGlass",
    "DEFAULT_PROTOCOL",
    "CertifiedFractionRule",
    "Check",
    "Incumbent",
    "POLICY_ENV",
    "Policy",
    "Protocol",
    "PolicyError",
    "RuleSet",
    "Target",
    "Verdict",
    "audit_trail",
    "decide",
    "load_policy",
    "parse_policy",
    "read_audit",
]
