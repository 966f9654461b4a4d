"""Promotion policy: rules from YAML, verdicts as pure functions, the audit trail, and the gated registry store.

``store`` imports MLflow's SQLAlchemy registry; import it only where a store is built.
"""

from __future__ import annotations

from mlflow_tabcons.gate.audit import AuditRecord, audit_trail, read_audit
from mlflow_tabcons.gate.loading import POLICY_ENV, PolicyError, load_policy, parse_policy
from mlflow_tabcons.gate.rules import CertifiedFractionRule, Policy, RuleSet, Target
from mlflow_tabcons.gate.verdict import Check, Incumbent, Verdict, decide

__all__ = [
    "AuditRecord",
    "CertifiedFractionRule",
    "Check",
    "Incumbent",
    "POLICY_ENV",
    "Policy",
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
