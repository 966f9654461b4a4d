"""The gated registry store: MLflow's SqlAlchemyStore, with every promotion path checked against the policy.

Each gated call runs as one transaction: lock the model name, verify the
evidence, decide, write the audit row and the verdict tag, and make the change
only when allowed. A refusal commits the audit row alone and then raises
PERMISSION_DENIED (HTTP 403). MLflow's own methods run inside that transaction
because the store's session maker hands them the gate's session while one is
open in the thread. Nothing is kept in memory between calls except the parsed
policy, which is re-read whenever the file changes, so several server workers
agree and a policy made unreadable later refuses every protected promotion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersionTag
from mlflow.entities.model_registry.model_version_stages import STAGE_DELETED_INTERNAL, get_canonical_stage
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, PERMISSION_DENIED
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.store.model_registry.dbmodels.models import SqlModelVersion, SqlRegisteredModel
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore
from sqlalchemy.orm import Session

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.gate.evidence import (
    BREAK_GLASS_TAG,
    EVIDENCE_TAG,
    Evidence,
    evidence_key,
    is_reserved_tag,
    verify_evidence,
    version_artifact,
)
from mlflow_tabcons.gate import audit
from mlflow_tabcons.gate.loading import PolicyError, load_policy, policy_path_from_env
from mlflow_tabcons.gate.locking import lock_models
from mlflow_tabcons.gate.rules import Policy, RuleSet, Target
from mlflow_tabcons.gate.verdict import Incumbent, Verdict, decide

SCHEME_PREFIX = "tabcons+"
VERDICT_TAG_PREFIX = "tabcons.verdict."


class GateRefusal(MlflowException):
    """A promotion the policy refuses: HTTP 403, so clients fail fast with the reasons."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=PERMISSION_DENIED)


def database_uri(store_uri: str) -> str:
    """``tabcons+postgresql://...`` -> ``postgresql://...``."""
    if not store_uri.startswith(SCHEME_PREFIX):
        raise TabconsInputError(f"a tabcons registry URI starts with {SCHEME_PREFIX!r}, got {store_uri!r}")
    return store_uri[len(SCHEME_PREFIX):]


class PolicyFile:
    """The policy at a path, re-parsed when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._policy: Policy | None = None

    def current(self) -> Policy:
        try:
            stat = self.path.stat()
        except OSError as error:
            raise PolicyError(f"policy {self.path}: cannot read it: {error.strerror}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp or self._policy is None:
            self._policy, self._stamp = load_policy(self.path), stamp
        return self._policy


@dataclasses.dataclass(frozen=True)
class _Case:
    """One promotion to judge: ``evidence_of`` is the (model, version) whose evidence counts (the source of a copy)."""

    model: str
    version: str
    target: Target
    rules: RuleSet | None
    evidence_of: tuple[str, str]


class GatedRegistryStore(SqlAlchemyStore):
    def __init__(self, store_uri: str, policy_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(database_uri(store_uri))
        self.policy_file = PolicyFile(Path(policy_path) if policy_path else policy_path_from_env())
        self.policy_file.current()  # a malformed policy is a startup error, with its line
        audit.ensure_tables(self.engine)
        self._local = threading.local()
        self._plain_sessions = self.ManagedSessionMaker
        self.ManagedSessionMaker = self._shared_or_new_session

    # -- one transaction per gated call -------------------------------------------------

    @contextlib.contextmanager
    def _shared_or_new_session(self, read_only: bool = True) -> Iterator[Session]:
        shared = getattr(self._local, "session", None)
        if shared is not None:
            yield shared
            return
        with self._plain_sessions(read_only=read_only) as session:
            yield session

    @contextlib.contextmanager
    def _transaction(self, names: list[str]) -> Iterator[Session]:
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

    # -- reading the facts -------------------------------------------------------------

    def _policy(self) -> tuple[Policy | None, str | None]:
        try:
            return self.policy_file.current(), None
        except PolicyError as error:
            return None, f"the promotion policy cannot be used, so every protected promotion is refused ({error.message})"

    def _cases_needed(self, model: str, target: Target, version: str, evidence_of: tuple[str, str] | None = None) -> list[_Case]:
        """[] when the policy does not protect this target; one case otherwise (also when the policy is unreadable)."""
        policy, _problem = self._policy()
        rules = policy.rules_for(model, target) if policy is not None else None
        if policy is not None and rules is None:
            return []
        return [_Case(model, str(version), target, rules, evidence_of or (model, str(version)))]

    def _trusted_evidence(self, name: str, version: str) -> tuple[Evidence | None, str | None]:
        model_version = self.get_model_version(name, version)
        try:
            artifact = version_artifact(model_version, self)
            return self._bound_evidence(model_version.tags.get(EVIDENCE_TAG), model_version.run_id, artifact), None
        except MlflowException as error:
            return None, f"{name} version {version}: {error.message}"

    def _incumbent(self, model: str, target: Target, session: Session) -> Incumbent | None:
        if target.kind == "alias":
            holder = self.get_registered_model(model).aliases.get(target.name) or self._last_holder(model, target, session)
        else:
            query = session.query(SqlModelVersion.version).filter(
                SqlModelVersion.name == model, SqlModelVersion.current_stage != STAGE_DELETED_INTERNAL
            )
            if target.kind == "stage":
                query = query.filter(SqlModelVersion.current_stage == target.name)
            holder = query.order_by(SqlModelVersion.version.desc()).limit(1).scalar()
        if holder is None:
            return None
        evidence, problem = self._trusted_evidence(model, str(holder))
        return Incumbent(str(holder), evidence, problem)

    def _last_holder(self, model: str, target: Target, session: Session) -> str | None:
        """The version last allowed onto an alias that is now unset, if it still exists.

        Removing an alias first must not turn the churn rule off for the next promotion.
        """
        version = audit.last_allowed_version(session, model, target.key, action="set_alias")
        if version is None:
            return None
        try:
            self.get_model_version(model, version)
        except MlflowException:  # deleted since
            return None
        return version

    def _take_break_glass(self, name: str, version: str) -> str | None:
        """The armed justification on a version, consumed by this promotion whatever its verdict."""
        justification = self.get_model_version(name, version).tags.get(BREAK_GLASS_TAG)
        if justification is not None:
            super().delete_model_version_tag(name, version, BREAK_GLASS_TAG)
        return justification

    def _judge(self, case: _Case, session: Session) -> Verdict:
        policy, policy_problem = self._policy()
        problems = [policy_problem] if policy_problem else []
        evidence, evidence_problem = self._trusted_evidence(*case.evidence_of)
        if evidence_problem:
            problems.append(evidence_problem)
        wants_incumbent = case.rules is not None and case.rules.max_churn is not None
        incumbent = self._incumbent(case.model, case.target, session) if wants_incumbent else None
        glass = self._take_break_glass(*case.evidence_of)
        if glass is not None and (policy is None or not policy.allow_break_glass):
            why = "the policy is unreadable" if policy is None else "the policy sets allow_break_glass: false"
            problems.append(f"break-glass is not available: {why}")
            glass = None
        return decide(case.model, case.version, case.target, case.rules, evidence,
                      problems=tuple(problems), incumbent=incumbent, break_glass=glass)

    # -- deciding ----------------------------------------------------------------------

    def _enforce(self, action: str, cases: list[_Case], apply: Callable[[], Any], *,
                 lock: tuple[str, ...] = (), tag_verdicts: bool = True, drop_if_pristine: str | None = None) -> Any:
        """Judge every case in one locked transaction; apply the change only if all are allowed."""
        if not cases:
            return apply()
        with self._transaction([c.model for c in cases] + list(lock)) as session:
            verdicts = [self._judge(case, session) for case in cases]
            for verdict in verdicts:
                audit.record_verdict(session, verdict, action)
                if tag_verdicts:
                    tag = ModelVersionTag(verdict.target.verdict_tag, verdict.summary()[:5000])
                    super().set_model_version_tag(verdict.model, verdict.version, tag)
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
            " To override with a recorded justification: `tabcons promote NAME VERSION ALIAS --break-glass TEXT`,"
            f" or set the tag {BREAK_GLASS_TAG}=TEXT on the version and retry.)"
        )

    def _drop_if_pristine(self, name: str, session: Session) -> None:
        """Remove a registered model created only to receive a refused version: no versions ever, no tags, no aliases."""
        model = self.get_registered_model(name)
        ever_versions = session.query(SqlModelVersion).filter(SqlModelVersion.name == name).count()
        if not ever_versions and not model.tags and not model.aliases and not model.description:
            super().delete_registered_model(name)

    # -- promotion paths ---------------------------------------------------------------

    def set_registered_model_alias(self, name, alias, version):
        cases = self._cases_needed(name, Target("alias", alias), str(version))
        return self._enforce("set_alias", cases, functools.partial(super().set_registered_model_alias, name, alias, version))

    def delete_registered_model_alias(self, name, alias):
        """Allowed; audited for a protected alias, whose next promotion is still compared with the version that held it."""
        target = Target("alias", alias)
        if not self._cases_needed(name, target, ""):
            return super().delete_registered_model_alias(name, alias)
        with self._transaction([name]) as session:
            holder = self.get_registered_model(name).aliases.get(alias)
            audit.record(session, action="delete_alias", model=name, version=holder, target=target.key, allowed=True,
                         summary=f"alias @{alias} removed from version {holder}", detail={})
            return super().delete_registered_model_alias(name, alias)

    def transition_model_version_stage(self, name, version, stage, archive_existing_versions):
        target = Target("stage", get_canonical_stage(stage))
        apply = functools.partial(super().transition_model_version_stage, name, version, stage, archive_existing_versions)
        return self._enforce("transition_stage", self._cases_needed(name, target, str(version)), apply)

    def _registered_source(self, source: str) -> tuple[str, str] | None:
        """(model, version) when ``source`` names a registered model version (models:/NAME/1, @alias, /Stage)."""
        if urllib.parse.urlparse(source).scheme != "models":
            return None
        resolved = get_model_name_and_version(self, source)
        return None if len(resolved) == 1 else (resolved[0], str(resolved[1]))

    def create_model_version(self, name, source, run_id=None, tags=None, run_link=None, description=None,
                             local_model_path=None, model_id=None):
        origin = self._registered_source(source)
        artifact = model_id or (version_artifact(self.get_model_version(*origin), self) if origin else source)
        tags = self._checked_initial_tags(tags or [], run_id, artifact, copied=origin is not None)
        apply = functools.partial(
            super().create_model_version, name, source, run_id=run_id, tags=tags, run_link=run_link,
            description=description, local_model_path=local_model_path, model_id=model_id,
        )
        if origin is None:
            return apply()
        cases = self._cases_needed(name, Target("copy", origin[0]), origin[1], evidence_of=origin)
        return self._enforce("copy", cases, apply, tag_verdicts=False, drop_if_pristine=name)

    def copy_model_version(self, src_mv, dst_name):
        """Gate before creating anything, so a refused copy into a new name leaves no empty model behind."""

        def create() -> Any:
            with self.ManagedSessionMaker(read_only=False) as session:
                exists = session.query(SqlRegisteredModel.name).filter(SqlRegisteredModel.name == dst_name).first()
            if exists is None:
                super(GatedRegistryStore, self).create_registered_model(dst_name)
            return super(GatedRegistryStore, self).create_model_version(
                name=dst_name, source=f"models:/{src_mv.name}/{src_mv.version}", run_id=src_mv.run_id,
                tags=self._checked_initial_tags(
                    [ModelVersionTag(k, v) for k, v in src_mv.tags.items()], src_mv.run_id,
                    version_artifact(src_mv, self), copied=True,
                ),
                run_link=src_mv.run_link, description=src_mv.description, model_id=src_mv.model_id,
            )

        origin = (src_mv.name, str(src_mv.version))
        cases = self._cases_needed(dst_name, Target("copy", src_mv.name), origin[1], evidence_of=origin)
        return self._enforce("copy", cases, create, tag_verdicts=False, lock=(src_mv.name,))

    def rename_registered_model(self, name, new_name):
        """A rename keeps aliases and stages: every protected one must pass the new name's rules."""
        model = self.get_registered_model(name)
        held = {Target("alias", alias): str(version) for alias, version in model.aliases.items()}
        for mv in self.get_latest_versions(name, ["Staging", "Production"]):
            held[Target("stage", mv.current_stage)] = str(mv.version)
        cases = [
            dataclasses.replace(case, model=name)
            for target, version in held.items()
            for case in self._cases_needed(new_name, target, version, evidence_of=(name, version))
        ]
        apply = functools.partial(super().rename_registered_model, name, new_name)
        return self._enforce("rename", cases, apply, lock=(new_name,), tag_verdicts=False)

    # -- tags the gate owns ------------------------------------------------------------

    def _checked_initial_tags(self, tags: list, run_id: str | None, artifact: str, *, copied: bool) -> list:
        """Initial version tags: evidence must verify for this run and model; a copy drops the source's verdicts and break-glass."""
        kept = []
        for tag in tags:
            if copied and (tag.key.startswith(VERDICT_TAG_PREFIX) or tag.key == BREAK_GLASS_TAG):
                continue
            if tag.key == EVIDENCE_TAG:
                self._bound_evidence(tag.value, run_id, artifact)
            elif tag.key == BREAK_GLASS_TAG or is_reserved_tag(tag.key):
                raise GateRefusal(f"tag {tag.key!r} cannot be set when creating a version; only the tabcons gate writes it")
            kept.append(tag)
        return kept

    @staticmethod
    def _bound_evidence(value: str | None, run_id: str | None, artifact: str) -> Evidence:
        """Verified evidence measured on this very run and model artifact; anything else is refused."""
        evidence = verify_evidence(value, evidence_key())
        if evidence.run_id != run_id:
            raise GateRefusal(
                f"tabcons evidence refused: tampered evidence: it is for run {evidence.run_id}, "
                f"the model version comes from run {run_id}"
            )
        if evidence.artifact != artifact:
            raise GateRefusal(
                f"tabcons evidence refused: it was measured on model {evidence.artifact or '(unbound)'}, "
                f"the model version serves {artifact}"
            )
        return evidence

    def set_model_version_tag(self, name, version, tag):
        if tag.key == EVIDENCE_TAG:
            return self._set_evidence(name, str(version), tag)
        if tag.key == BREAK_GLASS_TAG:
            return self._arm_break_glass(name, str(version), tag)
        if is_reserved_tag(tag.key):
            raise GateRefusal(f"tag {tag.key!r} is written only by the tabcons gate; it cannot be set by hand")
        return super().set_model_version_tag(name, version, tag)

    def _set_evidence(self, name: str, version: str, tag: ModelVersionTag) -> None:
        with self._transaction([name]) as session:
            try:
                model_version = self.get_model_version(name, version)
                evidence = self._bound_evidence(tag.value, model_version.run_id, version_artifact(model_version, self))
                refusal = None
            except MlflowException as error:
                refusal = error.message
            summary = refusal or f"evidence accepted: certified fraction {evidence.certified_fraction:.4f} on {evidence.eval_digest}"
            audit.record(session, action="set_evidence", model=name, version=version, target=EVIDENCE_TAG,
                         allowed=refusal is None, summary=summary, detail={"refusal": refusal})
            if refusal is None:
                super().set_model_version_tag(name, version, tag)
        if refusal is not None:
            raise GateRefusal(refusal)

    def _arm_break_glass(self, name: str, version: str, tag: ModelVersionTag) -> None:
        justification = (tag.value or "").strip()
        if not justification:
            raise MlflowException(f"{BREAK_GLASS_TAG} needs a justification text", error_code=INVALID_PARAMETER_VALUE)
        policy, problem = self._policy()
        if policy is None or not policy.allow_break_glass:
            raise GateRefusal("break-glass is not available: " + (problem or "the policy sets allow_break_glass: false"))
        with self._transaction([name]) as session:
            self.get_model_version(name, version)
            audit.record(session, action="arm_break_glass", model=name, version=version, target=BREAK_GLASS_TAG,
                         allowed=True, summary=f"break-glass armed: {justification}", detail={},
                         break_glass=justification)
            super().set_model_version_tag(name, version, ModelVersionTag(BREAK_GLASS_TAG, justification))

    def delete_model_version_tag(self, name, version, key):
        if is_reserved_tag(key):
            raise GateRefusal(f"tag {key!r} is written only by the tabcons gate; it cannot be deleted by hand")
        return super().delete_model_version_tag(name, version, key)

    def create_registered_model(self, name, tags=None, description=None, deployment_job_id=None):
        for tag in tags or []:
            self._refuse_reserved_model_tag(tag.key)
        return super().create_registered_model(name, tags=tags, description=description, deployment_job_id=deployment_job_id)

    def set_registered_model_tag(self, name, tag):
        self._refuse_reserved_model_tag(tag.key)
        return super().set_registered_model_tag(name, tag)

    def delete_registered_model_tag(self, name, key):
        self._refuse_reserved_model_tag(key)
        return super().delete_registered_model_tag(name, key)

    @staticmethod
    def _refuse_reserved_model_tag(key: str) -> None:
        if is_reserved_tag(key) or key == BREAK_GLASS_TAG:
            raise GateRefusal(f"tag {key!r} belongs to the tabcons gate; registered-model tags may not use it")
