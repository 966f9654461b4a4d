"""Every side door around the promotion gate we could find, tried against a real gated store.

Each attack tries to get a version that fails the policy (or whose evidence
is not its own) to @champion or the Production stage of the protected model
``credit``. It must be refused with PERMISSION_DENIED, leave the protected
target as it was, and leave a refusal in the audit trail where the gate
audits that path. ``ATTACKS`` is also run by benchmarks/reliability_gate.py,
which counts attempts, refusals and bypasses for reliability.json.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from gate_support import KEY, POLICY, evidence, new_version
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

from mlflow_tabcons.gate.evidence import BREAK_GLASS_TAG, EVIDENCE_TAG, FORMAT_VERSION, sign_evidence
from mlflow_tabcons.gate import audit_trail

MODEL = "credit"


@dataclass
class Arena:
    """A fresh gated store on SQLite, its policy file, and a client going through the gate."""

    client: MlflowClient
    uri: str
    policy: Path
    target: str | None = None  # the version the attack tries to promote in MODEL

    def aim(self, version):
        self.target = str(version.version)
        return version

    def refusals(self) -> int:
        return sum(not record.allowed for record in audit_trail("tabcons+" + self.uri))

    def champion(self) -> str | None:
        """Read from the database: MLflow hides models tagged as prompts from get_registered_model."""
        engine = sa.create_engine(self.uri)
        try:
            with engine.connect() as connection:
                row = connection.execute(
                    sa.text("select version from registered_model_aliases where name = :name and alias = 'champion'"),
                    {"name": MODEL},
                ).first()
        finally:
            engine.dispose()
        return None if row is None else str(row[0])

    def production(self) -> list[str]:
        try:
            return [v.version for v in self.client.get_latest_versions(MODEL, ["Production"])]
        except MlflowException:
            return []


def _weak(arena: Arena, **fields: object):
    return arena.aim(new_version(arena.client, MODEL, lower=0.5, accuracy=0.5, arbitrariness=0.4, **fields))


def forged_unsigned_evidence(arena: Arena) -> None:
    weak = _weak(arena)
    payload = json.dumps({"format": FORMAT_VERSION, "evidence": evidence(weak.run_id, lower=0.99).to_dict()})
    arena.client.set_model_version_tag(MODEL, weak.version, EVIDENCE_TAG, payload)


def forged_evidence_own_key(arena: Arena) -> None:
    weak = _weak(arena)
    forged = sign_evidence(evidence(weak.run_id, lower=0.99), b"attacker-key-0123456789abcdef0123")
    arena.client.set_model_version_tag(MODEL, weak.version, EVIDENCE_TAG, forged)


def evidence_of_another_run_at_creation(arena: Arena) -> None:
    good = new_version(arena.client, "other-model", lower=0.99)
    stolen = arena.client.get_model_version("other-model", good.version).tags[EVIDENCE_TAG]
    run_id = arena.client.create_run("0").info.run_id
    arena.client.create_registered_model(MODEL)
    arena.target = "1"
    arena.client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id, tags={EVIDENCE_TAG: stolen})


def hand_set_verdict_tag(arena: Arena) -> None:
    weak = _weak(arena)
    arena.client.set_model_version_tag(MODEL, weak.version, "tabcons.verdict.champion", "allowed")


def evidence_tag_deleted(arena: Arena) -> None:
    weak = _weak(arena)
    arena.client.delete_model_version_tag(MODEL, weak.version, EVIDENCE_TAG)


def alias_direct(arena: Arena) -> None:
    weak = _weak(arena)
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def alias_with_padded_version(arena: Arena) -> None:
    weak = _weak(arena)
    arena.client.set_registered_model_alias(MODEL, "champion", f"0{weak.version}")


def alias_on_unsigned_version(arena: Arena) -> None:
    weak = arena.aim(new_version(arena.client, MODEL, signed=False))
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def alias_after_tagging_the_model_a_prompt(arena: Arena) -> None:
    weak = _weak(arena)
    arena.client.set_registered_model_tag(MODEL, "mlflow.prompt.is_prompt", "true")
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def stage_transition_any_case(arena: Arena) -> None:
    weak = _weak(arena)
    for stage in ("production", "PRODUCTION", "Production"):
        try:
            arena.client.transition_model_version_stage(MODEL, weak.version, stage)
        except MlflowException as error:
            if error.error_code != "PERMISSION_DENIED":
                raise
    if weak.version not in arena.production():
        raise MlflowException("tabcons gate refused every spelling", error_code=PERMISSION_DENIED)


def copy_weak_into_protected(arena: Arena) -> None:
    weak = new_version(arena.client, "dev-credit", lower=0.5)
    arena.target = "1"
    arena.client.copy_model_version(f"models:/dev-credit/{weak.version}", MODEL)


def models_source_into_protected(arena: Arena) -> None:
    weak = new_version(arena.client, "dev-credit", lower=0.5)
    arena.client.create_registered_model(MODEL)
    arena.target = "1"
    arena.client.create_model_version(MODEL, f"models:/dev-credit/{weak.version}", weak.run_id)


def rename_sandbox_champion_into_protected(arena: Arena) -> None:
    weak = new_version(arena.client, "sandbox-credit", signed=False)
    arena.client.set_registered_model_alias("sandbox-credit", "champion", weak.version)
    arena.target = weak.version
    arena.client.rename_registered_model("sandbox-credit", MODEL)


def delete_and_recreate(arena: Arena) -> None:
    good = new_version(arena.client, MODEL, lower=0.95)
    arena.client.set_registered_model_alias(MODEL, "champion", good.version)
    arena.client.delete_registered_model(MODEL)
    weak = _weak(arena)  # version 1 again, in a model of the same name
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def break_glass_without_justification(arena: Arena) -> None:
    weak = _weak(arena)
    try:
        arena.client.set_model_version_tag(MODEL, weak.version, BREAK_GLASS_TAG, "  ")
    except MlflowException:
        pass
    arena.client.set_registered_model_alias(MODEL, "champion", weak.version)


def _policy_made_unusable(how: Callable[[Path], None]) -> Callable[[Arena], None]:
    def attack(arena: Arena) -> None:
        good = new_version(arena.client, MODEL, lower=0.95)  # passes the policy while it is readable
        how(arena.policy)
        arena.aim(good)
        arena.client.set_registered_model_alias(MODEL, "champion", good.version)

    return attack


def _removed(path: Path) -> None:
    path.unlink()


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _dangling_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("gone.yaml"))


def _unreadable(path: Path) -> None:
    path.chmod(0)


def _emptied(path: Path) -> None:
    path.write_text("")


def evidence_replayed_on_another_artifact(arena: Arena) -> None:
    """Genuine evidence, copied onto a new version of the same run whose source is any other model."""
    good = new_version(arena.client, MODEL, lower=0.95)
    genuine = arena.client.get_model_version(MODEL, good.version).tags[EVIDENCE_TAG]
    other = arena.aim(arena.client.create_model_version(MODEL, "file:///somewhere/else/model", good.run_id,
                                                        tags={EVIDENCE_TAG: genuine}))
    arena.client.set_registered_model_alias(MODEL, "champion", other.version)


def churn_dodged_by_removing_the_alias_first(arena: Arena) -> None:
    good = new_version(arena.client, MODEL, lower=0.95, predictions="0000")
    arena.client.set_registered_model_alias(MODEL, "champion", good.version)
    churny = arena.aim(new_version(arena.client, MODEL, lower=0.95, predictions="1111"))  # churn 1.0 > max_churn 0.3
    arena.client.delete_registered_model_alias(MODEL, "champion")
    arena.client.set_registered_model_alias(MODEL, "champion", churny.version)


# attack -> whether its refusal must be in the audit trail (hand-written reserved tags are refused before any audit)
ATTACKS: dict[str, tuple[Callable[[Arena], None], bool]] = {
    "forged unsigned evidence": (forged_unsigned_evidence, True),
    "evidence signed with an attacker's key": (forged_evidence_own_key, True),
    "another run's evidence in create_model_version tags": (evidence_of_another_run_at_creation, False),
    "hand-set verdict tag": (hand_set_verdict_tag, False),
    "evidence tag deleted": (evidence_tag_deleted, False),
    "alias set directly": (alias_direct, True),
    "alias with version '0N'": (alias_with_padded_version, True),
    "alias on an unsigned version": (alias_on_unsigned_version, True),
    # MLflow itself then treats the model as a prompt and no longer finds it: refused before the gate is asked
    "alias after tagging the model as a prompt": (alias_after_tagging_the_model_a_prompt, False),
    "stage transition, any spelling of Production": (stage_transition_any_case, True),
    "copy_model_version into the protected model": (copy_weak_into_protected, True),
    "create_model_version with a models:/ source": (models_source_into_protected, True),
    "rename a sandbox holding @champion": (rename_sandbox_champion_into_protected, True),
    "delete the model and recreate it": (delete_and_recreate, True),
    "break-glass without justification": (break_glass_without_justification, True),
    "policy file removed": (_policy_made_unusable(_removed), True),
    "policy path replaced by a directory": (_policy_made_unusable(_directory), True),
    "policy path a dangling symlink": (_policy_made_unusable(_dangling_link), True),
    "policy file emptied": (_policy_made_unusable(_emptied), True),
    # evidence names the model it was measured on: the replay is refused when the version is created
    "evidence replayed onto another artifact of the same run": (evidence_replayed_on_another_artifact, False),
    "churn rule dodged by deleting the alias first": (churn_dodged_by_removing_the_alias_first, True),
}
if os.geteuid() != 0:  # root reads a mode-000 file anyway
    ATTACKS["policy file mode 000"] = (_policy_made_unusable(_unreadable), True)


@dataclass
class Outcome:
    refused: bool
    promoted: bool
    audited: bool
    message: str


def new_arena(folder: Path, template: Path | None = None) -> Arena:
    """Needs TABCONS_POLICY and TABCONS_EVIDENCE_KEY pointing at ``folder``'s policy (see ``gate_environment``).

    ``template``: an empty, already migrated database to start from (MLflow's migrations take seconds).
    """
    if template is not None:
        shutil.copyfile(template, folder / "gate.db")
    uri = f"sqlite:///{folder / 'gate.db'}"
    return Arena(MlflowClient(tracking_uri=uri, registry_uri="tabcons+" + uri), uri, folder / "policy.yaml")


def gate_environment(folder: Path) -> dict[str, str]:
    (folder / "policy.yaml").write_text(POLICY)
    return {"TABCONS_POLICY": str(folder / "policy.yaml"), "TABCONS_EVIDENCE_KEY": KEY.decode(),
            "MLFLOW_TRACKING_USERNAME": "attacker"}


def run_attack(arena: Arena, attack: Callable[[Arena], None]) -> Outcome:
    before = arena.refusals()
    try:
        attack(arena)
        refused, message = False, ""
    except MlflowException as error:  # refused, by the gate (PERMISSION_DENIED) or by MLflow itself
        refused, message = True, f"{error.error_code}: {error.message}"
    promoted = arena.target is not None and (arena.champion() == arena.target or arena.target in arena.production())
    return Outcome(refused, promoted, arena.refusals() > before, message)


@pytest.fixture(scope="module")
def empty_database(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gate-template")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in gate_environment(folder).items():
            patch.setenv(key, value)
        new_arena(folder).client.search_registered_models()  # creates and migrates the tables, gate's included
    return folder / "gate.db"


@pytest.fixture()
def arena(tmp_path, monkeypatch, empty_database) -> Arena:
    for key, value in gate_environment(tmp_path).items():
        monkeypatch.setenv(key, value)
    return new_arena(tmp_path, empty_database)


@pytest.mark.parametrize("name", [pytest.param(name, id=name.replace(" ", "-")) for name in ATTACKS])
def test_attack_is_refused_changes_nothing_and_is_audited(arena, name):
    attack, audited = ATTACKS[name]
    outcome = run_attack(arena, attack)
    assert outcome.refused and not outcome.promoted, f"bypass: {name}"
    if audited:
        assert outcome.audited, f"refused but not audited: {name}"
