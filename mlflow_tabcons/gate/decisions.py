"""The gate's decisions against a registry: which promotions a policy protects, what evidence counts, the verdict.

``Gatekeeper`` is the part of the gated store that judges: it reads the
version, its evidence (verified against the role's key, the version's run,
storage location and stored files), the incumbent for ``max_churn`` (the
current holder, else the last allowed holder from the audit trail, so deleting
or archiving it changes nothing), and an armed break-glass; then it asks the
pure ``verdict.decide`` and writes the audit row and verdict tag in the same
transaction as the change. ``store`` holds only MLflow's method overrides.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from mlflow.entities.model_registry import ModelVersionTag
from mlflow.entities.model_registry.model_version_stages import STAGE_DELETED_INTERNAL
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.store.model_registry.dbmodels.models import SqlModelVersion
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore
from sqlalchemy.orm import Session

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.gate import audit
from mlflow_tabcons.gate.binding import check_binding, storage_location
from mlflow_tabcons.gate.evidence import (
    BREAK_GLASS_TAG,
    EVIDENCE_TAGS,
    Evidence,
    is_break_glass_tag,
    is_reserved_tag,
    verify_evidence,
)
from mlflow_tabcons.gate.keys import role_key
from mlflow_tabcons.gate.loading import PolicyError, PolicyFile
from mlflow_tabcons.gate.protocol import DEFAULT_PROTOCOL, Protocol
from mlflow_tabcons.gate.rules import Policy, RuleSet, Target, person
from mlflow_tabcons.gate.transactions import SharedSessions
from mlflow_tabcons.gate.verdict import Incumbent, Verdict, decide

VERDICT_TAG_PREFIX = "tabcons.verdict."
# audit actions that put a version on a target, per target kind: where the last holder is looked up
PROMOTIONS = {"alias": ("set_alias", "rename"), "stage": ("transition_stage", "rename"), "copy": ()}
ROLE_OF_TAG = {tag: role for role, tag in EVIDENCE_TAGS.items()}


class GateRefusal(MlflowException):
    """A promotion the policy refuses: HTTP 403, so clients fail fast with the reasons."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=PERMISSION_DENIED)


@dataclasses.dataclass(frozen=True)
class Case:
    """One promotion to judge: ``evidence_of`` is the (model, version) whose evidence counts (the source of a copy)."""

    model: str
    version: str
    target: Target
    rules: RuleSet | None
    evidence_of: tuple[str, str]


class Gatekeeper:
    """Judges promotions on ``store`` (a SqlAlchemyStore); writes go through MLflow's unguarded methods."""

    def __init__(self, store: SqlAlchemyStore, policy_file: PolicyFile, sessions: SharedSessions) -> None:
        self.store = store
        self.policy_file = policy_file
        self.sessions = sessions

    # -- reading the facts -------------------------------------------------------------

    def policy(self) -> tuple[Policy | None, str | None]:
        """The current policy, or None and why it cannot be used (every protected promotion is then refused)."""
        try:
            return self.policy_file.current(), None
        except PolicyError as error:
            return None, f"the promotion policy cannot be used, so every protected promotion is refused ({error.message})"

    def cases_needed(self, model: str, target: Target, version: str, evidence_of: tuple[str, str] | None = None) -> list[Case]:
        """[] when the policy does not protect this target; one case otherwise (also when the policy is unreadable)."""
        policy, _problem = self.policy()
        rules = policy.rules_for(model, target) if policy is not None else None
        if policy is not None and rules is None:
            return []
        return [Case(model, str(version), target, rules, evidence_of or (model, str(version)))]

    def bound_evidence(self, value: str | None, role: str, run_id: str | None, location: str) -> Evidence:
        """Evidence signed with the role's key and measured on this very run, location and content; else refused."""
        evidence = verify_evidence(value, role_key(role), role)
        check_binding(evidence, run_id, location)
        return evidence

    def trusted_evidence(self, name: str, version: str, protocol: Protocol) -> tuple[Evidence | None, str | None]:
        """The first evidence the protocol accepts that is present (verifier's first), or why there is none.

        Only that one is read: evidence present but refused is not passed over for the next role's.
        """
        try:
            model_version = self.store.get_model_version(name, version)
            location = storage_location(self.store, name, version)
            role = next((r for r in protocol.roles if EVIDENCE_TAGS[r] in model_version.tags), protocol.roles[-1])
            value = model_version.tags.get(EVIDENCE_TAGS[role])  # None: refused below, saying what is missing
            return self.bound_evidence(value, role, model_version.run_id, location), None
        except MlflowException as error:
            return None, f"{name} version {version}: {error.message}"

    def incumbent(self, model: str, target: Target, session: Session, protocol: Protocol) -> Incumbent | None:
        """What ``max_churn`` compares with: the current holder, else the audit trail's last allowed one, else None."""
        holder = self._current_holder(model, target, session)
        if holder is not None:
            evidence, problem = self.trusted_evidence(model, holder, protocol)
            return Incumbent(holder, evidence, problem)
        record = audit.last_allowed(session, model, target.key, PROMOTIONS[target.kind]) if PROMOTIONS[target.kind] else None
        if record is None:
            return None
        snapshot = record.detail.get("evidence")
        try:
            evidence = Evidence.from_dict(snapshot) if snapshot else None
        except TabconsInputError:
            evidence = None
        problem = None if evidence is not None else "the audit trail holds no usable evidence for it"
        return Incumbent(f"{record.version} (last allowed holder, no longer holding it)", evidence, problem, live=False)

    def _current_holder(self, model: str, target: Target, session: Session) -> str | None:
        """The version holding the target now; None also when ``model`` does not exist yet (a rename's new name)."""
        if target.kind == "alias":
            try:
                aliases = self.store.get_registered_model(model).aliases
            except MlflowException as error:
                if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                    raise
                return None
            holder = {alias.lower(): version for alias, version in aliases.items()}.get(target.name)
            return None if holder is None else str(holder)
        query = session.query(SqlModelVersion.version).filter(
            SqlModelVersion.name == model, SqlModelVersion.current_stage != STAGE_DELETED_INTERNAL
        )
        if target.kind == "stage":
            query = query.filter(SqlModelVersion.current_stage == target.name)
        holder = query.order_by(SqlModelVersion.version.desc()).limit(1).scalar()
        return None if holder is None else str(holder)

    # -- break-glass -------------------------------------------------------------------

    def take_break_glass(self, case: Case, session: Session, policy: Policy | None) -> tuple[str | None, str | None]:
        """The armed justification for this case's target, consumed whatever the verdict, or why it cannot be used."""
        name, version = case.evidence_of
        tag = case.target.break_glass_tag
        justification = self.store.get_model_version(name, version).tags.get(tag)
        if justification is None:
            return None, None
        SqlAlchemyStore.delete_model_version_tag(self.store, name, version, tag)
        if policy is None or not policy.break_glass.allowed:
            return None, "break-glass is not available: " + ("the policy is unreadable" if policy is None else "the policy does not allow it")
        armed = audit.last_armed(session, name, version, case.target.key)
        if armed is None:
            return None, f"break-glass on {case.target.describe()} was not armed through the gate"
        ttl = policy.break_glass.ttl_minutes
        if time.time() - armed.created_at > ttl * 60:
            return None, f"break-glass armed by {armed.actor} expired (the policy allows {ttl:g} minutes)"
        promoter = audit.current_actor()
        if not audit.is_identified(promoter) or not audit.is_identified(armed.actor):
            return None, "break-glass needs authenticated identities for both the approver and the promoter"
        if person(promoter) == person(armed.actor):
            return None, f"break-glass was armed by {armed.actor}, who cannot also promote: a second person must"
        if not policy.break_glass.may_arm(armed.actor):
            return None, f"break-glass was armed by {armed.actor}, who is not one of the policy's approvers"
        return justification, None

    def arm_break_glass(self, name: str, version: str, key: str, value: str) -> None:
        """Record who armed an override for one target of one version (audited), then set its tag."""
        target = Target.from_break_glass_tag(key)
        if target is None:
            raise MlflowException(
                f"name the target the override is for: set {BREAK_GLASS_TAG}.<alias>, {BREAK_GLASS_TAG}.stage.<Stage> "
                f"or {BREAK_GLASS_TAG}.copy, not {key!r}", error_code=INVALID_PARAMETER_VALUE,
            )
        justification = (value or "").strip()
        if not justification:
            raise MlflowException(f"{key} needs a justification text", error_code=INVALID_PARAMETER_VALUE)
        policy, problem = self.policy()
        actor = audit.current_actor()
        if policy is None or not policy.break_glass.allowed:
            raise GateRefusal("break-glass is not available: " + (problem or "the policy does not allow it (break_glass.allowed)"))
        if not audit.is_identified(actor):
            raise GateRefusal("break-glass can only be armed by an authenticated user (start the server with MLflow's auth app)")
        if not policy.break_glass.may_arm(actor):
            raise GateRefusal(f"{actor} is not one of the policy's break-glass approvers {list(policy.break_glass.approvers)}")
        with self.sessions.transaction([name]) as session:
            self.store.get_model_version(name, version)
            audit.record(session, action=audit.ARM_BREAK_GLASS, model=name, version=version, target=target.key,
                         allowed=True, summary=f"break-glass armed for {target.describe()}: {justification}", detail={},
                         break_glass=justification)
            SqlAlchemyStore.set_model_version_tag(self.store, name, version, ModelVersionTag(target.break_glass_tag, justification))

    # -- deciding ----------------------------------------------------------------------

    def judge(self, case: Case, session: Session) -> Verdict:
        """The verdict on one case, from the facts read inside the caller's locked transaction."""
        policy, policy_problem = self.policy()
        problems = [policy_problem] if policy_problem else []
        protocol = policy.protocol_for(case.model, case.target) if policy is not None else DEFAULT_PROTOCOL
        evidence, evidence_problem = self.trusted_evidence(*case.evidence_of, protocol)
        if evidence_problem:
            problems.append(evidence_problem)
        wants_incumbent = case.rules is not None and case.rules.max_churn is not None
        incumbent = self.incumbent(case.model, case.target, session, protocol) if wants_incumbent else None
        glass, glass_problem = self.take_break_glass(case, session, policy)
        if glass_problem:
            problems.append(glass_problem)
        overrides = policy is not None and policy.break_glass.overrides_evidence
        return decide(case.model, case.version, case.target, case.rules, evidence, protocol=protocol,
                      problems=tuple(problems), incumbent=incumbent, break_glass=glass, break_glass_overrides_evidence=overrides)

    def enforce(self, action: str, cases: list[Case] | Callable[[], list[Case]], apply: Callable[[], Any], *,
                lock: tuple[str, ...] = (), tag_verdicts: bool = True, drop_if_pristine: str | None = None) -> Any:
        """Judge every case in one locked transaction; apply the change only if all are allowed.

        ``cases`` may be a function, called once ``lock`` is held, for cases read from what the registry holds
        (a rename's aliases and stage holders): read before the lock, a change in between would go unjudged.
        ``lock`` must then name every model its cases concern.
        """
        if not callable(cases) and not cases:
            return apply()
        with self.sessions.transaction(list(lock) if callable(cases) else [c.model for c in cases] + list(lock)) as session:
            if callable(cases):
                cases = cases()
            verdicts = [self.judge(case, session) for case in cases]
            for verdict in verdicts:
                audit.record_verdict(session, verdict, action)
                if tag_verdicts:
                    tag = ModelVersionTag(verdict.target.verdict_tag, verdict.summary()[:5000])
                    SqlAlchemyStore.set_model_version_tag(self.store, verdict.model, verdict.version, tag)
            refused = [v for v in verdicts if not v.allowed]
            result = None if refused else apply()
            if refused and drop_if_pristine:
                self._drop_if_pristine(drop_if_pristine, session)
        if refused:
            raise GateRefusal(self._refusal_message(refused))
        return result

    def _refusal_message(self, refused: list[Verdict]) -> str:
        lines = [
            f"tabcons gate refused {v.target.describe()} for model '{v.model}' version {v.version}: " + "; ".join(v.failures)
            for v in refused
        ]
        return (
            "\n".join(lines)
            + f"\n(policy: {self.policy_file.path}; this verdict is in the audit trail: `tabcons audit {refused[0].model}`."
            " Where the policy allows break-glass, an approver other than the promoter arms it for this target with"
            f" `tabcons break-glass NAME VERSION TARGET --justification TEXT` (tag {refused[0].target.break_glass_tag}).)"
        )

    def _drop_if_pristine(self, name: str, session: Session) -> None:
        """Remove a registered model created only to receive a refused version: no versions ever, no tags, no aliases."""
        model = self.store.get_registered_model(name)
        ever_versions = session.query(SqlModelVersion).filter(SqlModelVersion.name == name).count()
        if not ever_versions and not model.tags and not model.aliases and not model.description:
            SqlAlchemyStore.delete_registered_model(self.store, name)

    # -- the gate's own tags -----------------------------------------------------------

    def set_evidence(self, name: str, version: str, tag: ModelVersionTag) -> None:
        """Accept an evidence tag only when it verifies for this version's run, location and stored files (audited)."""
        role = ROLE_OF_TAG[tag.key]
        with self.sessions.transaction([name]) as session:
            try:
                model_version = self.store.get_model_version(name, version)
                location = storage_location(self.store, name, version)
                evidence = self.bound_evidence(tag.value, role, model_version.run_id, location)
                refusal = None
            except MlflowException as error:
                refusal = error.message
            summary = refusal or (f"{role} evidence accepted: certified fraction {evidence.certified_fraction:.4f} "
                                  f"on {evidence.eval_digest}, model {evidence.model_sha256}")
            audit.record(session, action="set_evidence", model=name, version=version, target=tag.key,
                         allowed=refusal is None, summary=summary, detail={"refusal": refusal})
            if refusal is None:
                SqlAlchemyStore.set_model_version_tag(self.store, name, version, tag)
        if refusal is not None:
            raise GateRefusal(refusal)

    def checked_initial_tags(self, tags: list[ModelVersionTag], run_id: str | None,
                             location: str | None) -> list[ModelVersionTag]:
        """Initial tags of a new version. A copy (``location`` set) keeps evidence that verifies for it and drops the
        source's verdicts and break-glass; a fresh version gets evidence only after it exists (``attach_evidence``)."""
        kept = []
        for tag in tags:
            if location is not None and (tag.key.lower().startswith(VERDICT_TAG_PREFIX) or is_break_glass_tag(tag.key)):
                continue
            if tag.key in ROLE_OF_TAG and location is not None:
                self.bound_evidence(tag.value, ROLE_OF_TAG[tag.key], run_id, location)
            elif is_reserved_tag(tag.key) or is_break_glass_tag(tag.key):
                raise GateRefusal(f"tag {tag.key!r} cannot be set when creating a version; only the tabcons gate writes it "
                                  "(evidence is attached once the version exists)")
            kept.append(tag)
        return kept
