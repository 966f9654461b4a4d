"""The gated registry store: MLflow's SqlAlchemyStore with every promotion path sent through the ``Gatekeeper``.

This module only translates MLflow's store methods (aliases, stage
transitions, copies, ``models:/`` sources, renames, the gate's own tags) into
cases for ``decisions.Gatekeeper``, which judges them in one locked
transaction. A refusal commits its audit row alone and raises
PERMISSION_DENIED (HTTP 403). No state is kept between calls except the parsed
policy, re-read whenever its file changes.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersionTag
from mlflow.entities.model_registry.model_version_stages import STAGE_DELETED_INTERNAL, STAGE_NONE, get_canonical_stage
from mlflow.store.artifact.utils.models import get_model_name_and_version
from mlflow.store.model_registry.dbmodels.models import SqlModelVersion, SqlRegisteredModel
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

from mlflow_tabcons.errors import TabconsInputError
from mlflow_tabcons.gate import audit
from mlflow_tabcons.gate.binding import storage_location
from mlflow_tabcons.gate.decisions import ROLE_OF_TAG, Case, GateRefusal, Gatekeeper
from mlflow_tabcons.gate.evidence import is_break_glass_tag, is_reserved_tag
from mlflow_tabcons.gate.loading import PolicyFile, policy_path_from_env
from mlflow_tabcons.gate.rules import Target
from mlflow_tabcons.gate.transactions import SharedSessions

SCHEME_PREFIX = "tabcons+"
# Every new version lands in stage None ungated, so holding it promotes nothing; deleted versions hold nothing.
UNGATED_STAGES = (STAGE_NONE, STAGE_DELETED_INTERNAL)

__all__ = ["GateRefusal", "GatedRegistryStore", "database_uri"]


def database_uri(store_uri: str) -> str:
    """``tabcons+postgresql://...`` -> ``postgresql://...``."""
    if not store_uri.startswith(SCHEME_PREFIX):
        raise TabconsInputError(f"a tabcons registry URI starts with {SCHEME_PREFIX!r}, got {store_uri!r}")
    return store_uri[len(SCHEME_PREFIX):]


class GatedRegistryStore(SqlAlchemyStore):
    def __init__(self, store_uri: str, policy_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(database_uri(store_uri))
        policy_file = PolicyFile(Path(policy_path) if policy_path else policy_path_from_env())
        policy_file.current()  # a malformed policy is a startup error, with its line
        audit.ensure_tables(self.engine)
        self.sessions = SharedSessions(self.ManagedSessionMaker)
        self.ManagedSessionMaker = self.sessions.session
        self.gate = Gatekeeper(self, policy_file, self.sessions)

    @property
    def policy_file(self) -> PolicyFile:
        return self.gate.policy_file

    # -- promotion paths ---------------------------------------------------------------

    def set_registered_model_alias(self, name, alias, version):
        cases = self.gate.cases_needed(name, Target("alias", alias), str(version))
        return self.gate.enforce("set_alias", cases, functools.partial(super().set_registered_model_alias, name, alias, version))

    def delete_registered_model_alias(self, name, alias):
        """Allowed; audited for a protected alias (its next promotion is still compared with the last allowed holder)."""
        target = Target("alias", alias)
        if not self.gate.cases_needed(name, target, ""):
            return super().delete_registered_model_alias(name, alias)
        with self.sessions.transaction([name]) as session:
            holder = {a.lower(): v for a, v in self.get_registered_model(name).aliases.items()}.get(target.name)
            audit.record(session, action="delete_alias", model=name, version=holder, target=target.key, allowed=True,
                         summary=f"alias @{alias} removed from version {holder}", detail={})
            return super().delete_registered_model_alias(name, alias)

    def transition_model_version_stage(self, name, version, stage, archive_existing_versions):
        target = Target("stage", get_canonical_stage(stage))
        apply = functools.partial(super().transition_model_version_stage, name, version, stage, archive_existing_versions)
        return self.gate.enforce("transition_stage", self.gate.cases_needed(name, target, str(version)), apply)

    def _registered_source(self, source: str) -> tuple[str, str] | None:
        """(model, version) when ``source`` names a registered model version (models:/NAME/1, @alias, /Stage)."""
        if urllib.parse.urlparse(source).scheme != "models":
            return None
        resolved = get_model_name_and_version(self, source)
        return None if len(resolved) == 1 else (resolved[0], str(resolved[1]))

    def create_model_version(self, name, source, run_id=None, tags=None, run_link=None, description=None,
                             local_model_path=None, model_id=None):
        origin = self._registered_source(source)
        location = storage_location(self, *origin) if origin else None
        tags = self.gate.checked_initial_tags(tags or [], run_id, location)
        apply = functools.partial(
            super().create_model_version, name, source, run_id=run_id, tags=tags, run_link=run_link,
            description=description, local_model_path=local_model_path, model_id=model_id,
        )
        if origin is None:
            return apply()
        cases = self.gate.cases_needed(name, Target("copy", origin[0]), origin[1], evidence_of=origin)
        return self.gate.enforce("copy", cases, apply, tag_verdicts=False, drop_if_pristine=name)

    def copy_model_version(self, src_mv, dst_name):
        """Gate before creating anything, so a refused copy into a new name leaves no empty model behind."""

        def create() -> Any:
            with self.ManagedSessionMaker(read_only=False) as session:
                exists = session.query(SqlRegisteredModel.name).filter(SqlRegisteredModel.name == dst_name).first()
            if exists is None:
                super(GatedRegistryStore, self).create_registered_model(dst_name)
            return super(GatedRegistryStore, self).create_model_version(
                name=dst_name, source=f"models:/{src_mv.name}/{src_mv.version}", run_id=src_mv.run_id,
                tags=self.gate.checked_initial_tags(
                    [ModelVersionTag(k, v) for k, v in src_mv.tags.items()], src_mv.run_id,
                    storage_location(self, src_mv.name, src_mv.version),
                ),
                run_link=src_mv.run_link, description=src_mv.description, model_id=src_mv.model_id,
            )

        origin = (src_mv.name, str(src_mv.version))
        cases = self.gate.cases_needed(dst_name, Target("copy", src_mv.name), origin[1], evidence_of=origin)
        return self.gate.enforce("copy", cases, create, tag_verdicts=False, lock=(src_mv.name,))

    def rename_registered_model(self, name, new_name):
        """A rename promotes every alias and stage holder into the new name: each is judged as the new name's own
        (its rules, protocol and last allowed holder), so a rename cannot dodge a pattern, a protocol or max_churn."""
        def cases() -> list[Case]:
            return [
                case
                for target, version in self._held_targets(name)
                for case in self.gate.cases_needed(new_name, target, version, evidence_of=(name, version))
            ]

        apply = functools.partial(super().rename_registered_model, name, new_name)
        return self.gate.enforce("rename", cases, apply, lock=(name, new_name), tag_verdicts=False)

    def _held_targets(self, name: str) -> list[tuple[Target, str]]:
        """Every alias and every stage holder of ``name``: all versions in a stage, not only its newest."""
        held = [(Target("alias", alias), str(version)) for alias, version in self.get_registered_model(name).aliases.items()]
        with self.ManagedSessionMaker() as session:
            rows = session.query(SqlModelVersion.version, SqlModelVersion.current_stage).filter(
                SqlModelVersion.name == name, SqlModelVersion.current_stage.notin_(UNGATED_STAGES)
            ).all()
        return held + [(Target("stage", stage), str(version)) for version, stage in rows]

    # -- tags the gate owns ------------------------------------------------------------

    def set_model_version_tag(self, name, version, tag):
        if tag.key in ROLE_OF_TAG:
            return self.gate.set_evidence(name, str(version), tag)
        if is_break_glass_tag(tag.key):
            return self.gate.arm_break_glass(name, str(version), tag.key, tag.value)
        if is_reserved_tag(tag.key):
            raise GateRefusal(f"tag {tag.key!r} is written only by the tabcons gate; it cannot be set by hand")
        return super().set_model_version_tag(name, version, tag)

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
        if is_reserved_tag(key) or is_break_glass_tag(key):
            raise GateRefusal(f"tag {key!r} belongs to the tabcons gate; registered-model tags may not use it")
